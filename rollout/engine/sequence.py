"""One request as the engine tracks it: tokens, KV progress, block table, status, outputs.

Token accounting. A sequence holds ``len(seq)`` tokens (prompt + generated).
``num_computed_tokens`` of them have their KV in the cache. A step feeds tokens
``[num_computed_tokens, num_computed_tokens + n)``; when that range reaches the last token the
step samples one new token. So a decoding sequence has ``num_computed_tokens == len(seq) - 1``
(the newest token is fed at the next step), and a sequence preempted by recompute (which
resets ``num_computed_tokens`` to 0) re-feeds its generated tokens like a prompt and then
samples the next one: nothing is generated twice.

Placeholders. The engine schedules a step before the previous step's sampled tokens reach the
host (``rollout.engine.scheduler``): the count of a sequence's tokens is known before their
values. So a token that is sampled but not yet seen is appended as a placeholder
(``PLACEHOLDER``, logprob NaN), with the row of its batch's sampled tokens that holds it
(``pending_rows``); the runner feeds it from that row on the device, and the scheduler fills it
in when the row arrives. Placeholders are always the trailing tokens, filled oldest first, and
never hashed for the prefix cache. A finished sequence has none.

Status transitions (all made by the ``Scheduler``)::

    WAITING --scheduled--> RUNNING --stop/length--> FINISHED
    RUNNING --preempted--> WAITING          (blocks freed, num_computed_tokens = 0)
    WAITING --stop/length--> FINISHED       (preempted while its last token was in flight)
    WAITING | RUNNING --abort--> FINISHED
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Literal

from rollout.config import check_int, check_token_ids
from rollout.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]

# The token id of a placeholder: outside every vocabulary, so it can never pass for a token.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life (see the module docstring for the transitions)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request being generated.

    Args:
        seq_id: identifier, unique within one scheduler (it also orders arrival).
        prompt_token_ids: the prompt, at least one non-negative int.
        params: sampling settings; ``params.routed_experts_start`` must not exceed the prompt
            length.
        block_size: tokens per KV block (for ``slot`` / ``slots``).

    Attributes:
        token_ids: prompt then generated tokens.
        num_prompt_tokens: prompt length.
        num_computed_tokens: tokens whose KV is in the cache.
        num_cached_tokens: prompt tokens served from the prefix cache at first admission.
        block_table: KV block ids, block ``i`` holding tokens ``[i * bs, (i + 1) * bs)``.
        block_hashes: chained prefix-cache hashes of the full blocks hashed so far (owned by
            the ``BlockManager``; they depend on the tokens only, so they survive preemption).
        logprobs: log-probability of each generated token (one per generated token; NaN for
            a placeholder).
        pending_rows: one per trailing placeholder token, oldest first: its row in the sampled
            tokens of the batch that samples it.
        status, finish_reason: see ``SequenceStatus``; ``finish_reason`` is None until the
            sequence finishes (it is set just before the scheduler tells capture it finished).
        num_preemptions: how often the sequence was preempted.
        saved_routing: rows kept across preemption by routed-expert capture: maps the first
            position of a saved range to a block of rows. The control plane never reads it.
        routed_experts: the rows its output returns, set by capture when it finishes (None:
            not asked for). The control plane never reads it.
    """

    __slots__ = (
        "block_hashes",
        "block_size",
        "block_table",
        "finish_reason",
        "logprobs",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "params",
        "pending_rows",
        "routed_experts",
        "saved_routing",
        "seq_id",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: Iterable[int],
        params: SamplingParams,
        *,
        block_size: int,
    ) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        prompt = check_token_ids("prompt_token_ids", prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids: expected at least 1 token, got 0")
        if params.routed_experts_start > len(prompt):
            raise ValueError(
                f"routed_experts_start: expected <= the prompt length {len(prompt)}, "
                f"got {params.routed_experts_start}"
            )
        self.seq_id = check_int("seq_id", seq_id, minimum=0)
        self.params = params
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.token_ids: list[int] = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.logprobs: list[float] = []
        self.pending_rows: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.saved_routing: dict[int, object] = {}
        self.routed_experts: object | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, len={len(self)}, "
            f"prompt={self.num_prompt_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)})"
        )

    @property
    def num_generated_tokens(self) -> int:
        """Tokens generated so far (those re-fed after a preemption included)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose values are known: all but the trailing placeholders."""
        return len(self.token_ids) - len(self.pending_rows)

    @property
    def prompt_token_ids(self) -> list[int]:
        """A copy of the prompt."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def generated_token_ids(self) -> list[int]:
        """A copy of the generated tokens."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        """True once the sequence stopped or was aborted."""
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        """True when only the newest token is left to feed (a one-token decode step)."""
        return self.num_computed_tokens == len(self.token_ids) - 1

    def block_token_ids(self, index: int) -> list[int]:
        """The tokens of block ``index`` (fewer than ``block_size`` for a partial last block)."""
        bs = self.block_size
        return self.token_ids[index * bs : (index + 1) * bs]

    def slot(self, position: int) -> int:
        """The KV slot of token ``position``: ``block_table[pos // bs] * bs + pos % bs``."""
        if not 0 <= position < len(self.block_table) * self.block_size:
            raise ValueError(
                f"position: expected in [0, {len(self.block_table) * self.block_size}) "
                f"(the allocated blocks of sequence {self.seq_id}), got {position}"
            )
        bs = self.block_size
        return self.block_table[position // bs] * bs + position % bs

    def slots(self, start: int, end: int) -> list[int]:
        """The KV slots of token positions ``[start, end)``, in order.

        Capture stores routing rows by KV slot, so these are also the rows' addresses.
        """
        if not 0 <= start <= end <= len(self.block_table) * self.block_size:
            raise ValueError(
                f"start, end: expected 0 <= start <= end <= "
                f"{len(self.block_table) * self.block_size} (the allocated blocks of sequence "
                f"{self.seq_id}), got {start}, {end}"
            )
        bs = self.block_size
        out: list[int] = []
        position = start
        while position < end:
            # One range per block keeps this loop per block rather than per token.
            offset = position % bs
            run = min(bs - offset, end - position)
            base = self.block_table[position // bs] * bs + offset
            out.extend(range(base, base + run))
            position += run
        return out

    def append_token(self, token_id: int, logprob: float) -> None:
        """Record a sampled token and its log-probability."""
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)

    def append_placeholder(self, row: int) -> None:
        """Append a placeholder for the token that row ``row`` of a batch in flight samples."""
        self.token_ids.append(PLACEHOLDER)
        self.logprobs.append(math.nan)
        self.pending_rows.append(row)

    def resolve_placeholder(self, token_id: int, logprob: float) -> int:
        """Fill the oldest placeholder with its sampled token; return its position."""
        assert self.pending_rows, f"{self}: no placeholder to fill"
        position = self.num_resolved_tokens
        self.token_ids[position] = token_id
        self.logprobs[position - self.num_prompt_tokens] = logprob
        del self.pending_rows[0]
        return position

    def drop_placeholders(self) -> None:
        """Remove the placeholders (their tokens would follow a finish)."""
        count = len(self.pending_rows)
        if count:
            del self.token_ids[-count:]
            del self.logprobs[-count:]
            self.pending_rows.clear()
