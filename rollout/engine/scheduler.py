"""Continuous batching with chunked prefill and preemption by recompute, one batch ahead.

Each ``schedule()`` builds one batch under ``max_num_batched_tokens`` tokens:

1. running sequences that decode, oldest first, one token each;
2. running sequences part-way through a (re)fill, oldest first, one chunk each;
3. waiting sequences, first in first out, one chunk each (after their prefix-cache hits),
   while fewer than ``max_num_seqs`` run and no sequence was preempted in this step; the
   first one whose chunk does not fit the free blocks stops admission.

When a running sequence needs a block and none is free, the most recently arrived running
sequence not yet in the batch is preempted: ``capture.on_preempt(seq)`` runs while its block
table and ``num_computed_tokens`` are intact (capture saves its routing rows there), then its
blocks are freed and it goes back to the front of the waiting queue with
``num_computed_tokens = 0``. Its generated tokens stay: they are re-fed like a prompt and
still count towards ``max_tokens``. A request that could never fit in the cache is refused
by ``add``, so the oldest running sequence can always progress and ``schedule`` never stalls.

A batch's life is ``schedule`` -> ``advance`` -> ``postprocess``. The engine schedules batch
N+1 while batch N still runs on the device (its host work overlaps the device's), so batch N is
*in flight* (advanced, not yet postprocessed) when batch N+1 is built; one batch at most.

- ``advance(batch)``, right after the runner launched it: each entry's sequence has
  ``num_computed_tokens = entry.end``, and each sampling sequence gets a placeholder token
  (``sequence.PLACEHOLDER``, logprob NaN) for the token the batch samples, with the batch row
  that holds it (``seq.pending_rows``). The count of tokens is known before their values: a
  decode entry of the next batch feeds the placeholder (``ScheduledBatch.placeholder_indices``
  and ``placeholder_rows`` tell the runner which row of the in-flight batch's sampled ids to
  put there, on the device), a sequence whose placeholder reaches ``max_tokens`` is not
  scheduled again (it finishes when the token arrives; nor does it count towards
  ``max_num_seqs``), and a block completed by a placeholder is hashed for the prefix cache
  when the token arrives.
- ``postprocess(batch, tokens, logprobs)`` takes the tokens sampled for the entries whose chunk
  reached the sequence's last token (``ScheduledBatch.sample_indices``), fills the
  placeholders (also of a sequence preempted meanwhile: its recompute feeds the real token),
  applies the stop rules and frees finished sequences. A sequence that stops on a stop token
  was usually scheduled in the next batch already: its trailing placeholder is dropped, so its
  tokens, logprobs and ``num_computed_tokens`` are those of a synchronous step, and the next
  batch's postprocess skips it like any sequence finished while its batch was in flight.
  Called on a batch that was never advanced, ``postprocess`` advances it first: the
  synchronous step (``schedule`` -> run -> ``postprocess``).

The lookahead schedules a sequence that stops on a stop token once more (one wasted entry), and
a finishing sequence keeps its KV blocks until its last token arrives, one schedule longer than
synchronously: so the schedule differs from a synchronous one after a stop token, and where
the held blocks change a preemption; otherwise it is the same. A sequence of the in-flight
batch may be preempted by the next schedule: its blocks are reused only by later batches,
which the runner runs after batch N on the same device stream.

Every finish (stop, length or ``abort``) first calls ``capture.on_finish(seq)`` with
``seq.finish_reason`` set, the placeholders dropped and the block table still intact (a
sequence preempted while in flight finishes from the waiting queue, holding no blocks): after a
stop or length finish, positions ``[0, len(seq) - 1)`` (all but the newest token) have their
KV, and so their routing rows, at ``seq.slots(0, len(seq) - 1)``, and ``num_computed_tokens
<= len(seq) - 1``; capture reads them there before the blocks return to the pool.

After a failed step (an exception anywhere between ``schedule`` and ``postprocess``, a
``KeyboardInterrupt`` included) the engine calls ``abort_all``: every sequence is dropped, no
batch is in flight, and the KV pool is rebuilt empty, its prefix cache forgotten (the failed
step may have registered blocks whose KV it never finished writing).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from rollout.config import EngineConfig, EngineState
from rollout.engine.block_manager import BlockManager
from rollout.engine.sequence import FinishReason, Sequence, SequenceStatus
from rollout.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rollout.capture import RoutingCapture

logger = logging.getLogger(__name__)


class ScheduledEntry(NamedTuple):
    """One sequence's share of a step: it feeds tokens ``[start, start + num_new_tokens)``.

    ``samples`` is True when that range ends at the sequence's last token, so the step
    produces logits for that last token and samples the next one.
    """

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool

    @property
    def end(self) -> int:
        """One past the last position fed: the KV length after this step."""
        return self.start + self.num_new_tokens


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """What the model runner needs for one step, flattened in entry order.

    The runner must run every entry (also one aborted after scheduling) and write the KV of
    all new tokens of a layer before that layer's attention reads the cache: an entry may
    read blocks that an earlier entry of the same batch computes (a same-step prefix hit).

    Attributes:
        entries: the scheduled sequences and their token ranges.
        input_ids: the tokens fed, ``num_tokens`` of them.
        positions: the position of each fed token.
        slot_mapping: the KV slot each fed token writes (also where capture stores its row).
        query_start_loc: ``len(entries) + 1`` offsets of each entry's tokens in ``input_ids``.
        seq_lens: per entry, the KV length its attention covers after this step
            (``entry.end``: cached plus new tokens).
        block_tables: per entry, a copy of the sequence's block table.
        sample_indices: indices into ``entries`` of the entries that sample, in order.
        logits_indices: per sampling entry, the index in ``input_ids`` of its last token
            (the only rows whose logits are needed).
        is_decode: every entry feeds exactly one token (``num_tokens == len(entries)``):
            decode kernels and CUDA graphs apply. Usually all of them sample; a one-token
            chunk in the middle of a prompt does not, so always sample by ``sample_indices``.
        placeholder_indices: indices into ``input_ids`` that hold a placeholder (a token the
            batch in flight samples): the runner writes the real token there on the device.
        placeholder_rows: for each, its row in the in-flight batch's sampled tokens.
    """

    entries: tuple[ScheduledEntry, ...]
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    sample_indices: list[int]
    logits_indices: list[int]
    is_decode: bool
    placeholder_indices: list[int]
    placeholder_rows: list[int]

    @classmethod
    def build(cls, entries: Iterable[ScheduledEntry]) -> ScheduledBatch:
        """Flatten ``entries`` into the runner's inputs."""
        entries = tuple(entries)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        placeholder_indices: list[int] = []
        placeholder_rows: list[int] = []
        for entry in entries:
            seq = entry.seq
            input_ids.extend(seq.token_ids[entry.start : entry.end])
            positions.extend(range(entry.start, entry.end))
            slot_mapping.extend(seq.slots(entry.start, entry.end))
            query_start_loc.append(query_start_loc[-1] + entry.num_new_tokens)
            if entry.end > seq.num_resolved_tokens:
                # Only the batch in flight has unresolved tokens, and only a decode entry
                # feeds one: its single token, whose source row is then known.
                assert entry.num_new_tokens == 1 and len(seq.pending_rows) == 1, (
                    entry,
                    seq,
                )
                placeholder_indices.append(query_start_loc[-1] - 1)
                placeholder_rows.append(seq.pending_rows[0])
        sample_indices = [i for i, entry in enumerate(entries) if entry.samples]
        return cls(
            entries=entries,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=[entry.end for entry in entries],
            block_tables=[list(entry.seq.block_table) for entry in entries],
            sample_indices=sample_indices,
            logits_indices=[query_start_loc[i + 1] - 1 for i in sample_indices],
            is_decode=all(entry.num_new_tokens == 1 for entry in entries),
            placeholder_indices=placeholder_indices,
            placeholder_rows=placeholder_rows,
        )

    @property
    def is_prefill(self) -> bool:
        """At least one entry feeds more than one token (``not is_decode``)."""
        return not self.is_decode

    @property
    def num_tokens(self) -> int:
        """Tokens fed in this step."""
        return len(self.input_ids)


class Scheduler:
    """Admits requests, builds each step's batch and applies its sampled tokens.

    Args:
        config: static settings (``max_num_seqs``, ``max_num_batched_tokens``,
            ``block_size``, ``enable_prefix_caching``).
        state: run-time values, read once here (``num_kv_blocks``, ``max_model_len``,
            ``eos_token_ids``).
        capture: routed-expert capture (``rollout.capture.RoutingCapture``, ``CaptureOff()``
            when off), told of a sequence about to be preempted (``on_preempt``) and of one
            that finishes (``on_finish``, ``finish_reason`` set), each before its blocks are
            freed.

    Attributes:
        block_manager: the KV-block pool (prefix-cache counters, ``reset_prefix_cache``).
        waiting: sequences without blocks, in admission order (preempted ones in front).
        running: sequences holding blocks, in arrival order.
        num_preemptions: preemptions so far.
    """

    def __init__(
        self,
        config: EngineConfig,
        state: EngineState,
        *,
        capture: RoutingCapture,
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = state.max_model_len
        self.eos_token_ids = frozenset(state.eos_token_ids)
        self.block_size = config.block_size
        self.block_manager = BlockManager(
            state.num_kv_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.capture = capture
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._unfinished: dict[int, Sequence] = {}
        self._next_id = itertools.count()
        # The batch returned by schedule and not yet advanced; the advanced batches not yet
        # postprocessed, oldest first (at most one when the next batch is scheduled).
        self._scheduled: ScheduledBatch | None = None
        self._in_flight: deque[ScheduledBatch] = deque()

    # ------------------------------------------------------------------ requests

    def add(self, prompt_token_ids: Iterable[int], params: SamplingParams) -> Sequence:
        """Queue a request and return its sequence.

        Raises ValueError for an empty prompt, prompt + ``max_tokens`` beyond
        ``max_model_len``, or a request needing more KV blocks than the cache has.
        """
        seq = Sequence(next(self._next_id), prompt_token_ids, params, block_size=self.block_size)
        total = len(seq) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"max_tokens: expected prompt length {len(seq)} + max_tokens "
                f"{params.max_tokens} <= max_model_len {self.max_model_len}, got {total}"
            )
        # Every token but the last generated one is fed forward and needs a KV slot.
        blocks = self.block_manager.num_blocks_for(total - 1)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt_token_ids: expected a request that fits the KV cache of "
                f"{self.block_manager.num_blocks} blocks of {self.block_size} tokens, got prompt "
                f"length {len(seq)} + max_tokens {params.max_tokens} needing {blocks} blocks"
            )
        self.waiting.append(seq)
        self._unfinished[seq.seq_id] = seq
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished sequence with reason "abort" and free its blocks.

        Returns the sequence, or None when ``seq_id`` is not unfinished (already finished or
        unknown). A batch in flight may still hold it; ``postprocess`` then skips it.
        """
        seq = self._unfinished.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return seq

    def abort_all(self) -> None:
        """Drop every unfinished sequence (finish reason "abort") and the batches scheduled or
        in flight, and empty the KV pool and the prefix cache (``BlockManager.reset``): the
        state after a failed step, whatever transition it interrupted. ``capture.on_finish`` is
        not called (an aborted sequence has nothing to save).
        """
        for seq in self._unfinished.values():
            seq.drop_placeholders()
            seq.block_table = []
            seq.finish_reason = "abort"
            seq.status = SequenceStatus.FINISHED
        self._unfinished.clear()
        self.waiting.clear()
        self.running.clear()
        self._scheduled = None
        self._in_flight.clear()
        self.block_manager.reset()

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self._unfinished)

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting or running."""
        return len(self._unfinished)

    # ------------------------------------------------------------------ steps

    def schedule(self) -> ScheduledBatch | None:
        """Build the next batch (allowed while one batch is in flight); None when there is
        nothing to feed: no sequence is unfinished, or the unfinished ones wait for the tokens
        of the batch in flight.

        Raises RuntimeError if the previous batch was neither advanced nor postprocessed, or
        two batches are in flight.
        """
        if self._scheduled is not None or len(self._in_flight) > 1:
            raise RuntimeError(
                "schedule: the previous batch has not been advanced or postprocessed "
                f"({len(self._in_flight)} in flight)"
            )
        bm = self.block_manager
        entries: list[ScheduledEntry] = []
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions
        # Running sequences whose last token is in flight: they take no entry and no seat.
        finishing = 0

        budget = self.max_num_batched_tokens

        def take(seq: Sequence, num_new_tokens: int) -> None:
            nonlocal budget
            budget -= num_new_tokens
            start = seq.num_computed_tokens
            bm.cache_full_blocks(seq, start, start + num_new_tokens)
            samples = start + num_new_tokens == len(seq)
            entries.append(ScheduledEntry(seq, start, num_new_tokens, samples))
            scheduled.add(seq.seq_id)

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            if _finishes_in_flight(seq):
                finishing += 1
                continue
            if self._make_room(seq, 1, scheduled):
                bm.may_append(seq, 1)
                take(seq, 1)
            else:
                self._preempt(seq)

        for seq in list(self.running):
            if budget == 0:
                break
            if (
                seq.status is not SequenceStatus.RUNNING
                or seq.seq_id in scheduled
                or _finishes_in_flight(seq)
            ):
                continue
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            if not self._make_room(seq, num_new, scheduled):
                # No newer sequence is left to preempt: feed what the free blocks hold.
                num_new = min(num_new, bm.max_appendable_tokens(seq))
                if num_new <= 0:
                    continue
            bm.may_append(seq, num_new)
            take(seq, num_new)

        # No admission after a preemption also keeps out a sequence preempted in flight,
        # whose tokens are not all known yet; `finishing` is exact when nothing was preempted.
        while (
            self.waiting
            and self.num_preemptions == preemptions_before
            and len(self.running) - finishing < self.max_num_seqs
            and budget > 0
        ):
            seq = self.waiting[0]
            num_tokens = min(bm.cached_prefix_len(seq) + budget, len(seq))
            if not bm.can_allocate(seq, num_tokens):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            # Victims are the newest running and re-enter first in first out, so appending
            # keeps `running` in arrival order.
            self.running.append(seq)
            take(seq, num_tokens - seq.num_computed_tokens)

        if not entries:
            # Without a batch in flight every unfinished sequence has something to feed.
            assert not self._unfinished or self._in_flight, (
                "schedule: unfinished sequences but nothing scheduled"
            )
            return None
        self._scheduled = ScheduledBatch.build(entries)
        return self._scheduled

    def advance(self, batch: ScheduledBatch) -> None:
        """Mark the batch returned by the last ``schedule`` as launched (its tokens are not
        known yet): its entries count as computed and each sampling sequence gets a
        placeholder for the token it samples (see the module docstring).

        Raises RuntimeError for any other batch.
        """
        if batch is not self._scheduled:
            raise RuntimeError("advance: expected the batch returned by the last schedule")
        self._scheduled = None
        self._in_flight.append(batch)
        # Sequences aborted since schedule are finished: nothing to record for them.
        for entry in batch.entries:
            if entry.seq.status is SequenceStatus.RUNNING:
                entry.seq.num_computed_tokens = entry.end
        for row, index in enumerate(batch.sample_indices):
            seq = batch.entries[index].seq
            if seq.status is SequenceStatus.RUNNING:
                seq.append_placeholder(row)

    def postprocess(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: SequenceOf[int],
        logprobs: SequenceOf[float],
    ) -> list[Sequence]:
        """Apply a batch's sampled tokens; return the sequences that finished.

        Args:
            batch: the oldest batch in flight, or the batch returned by the last ``schedule``
                and not advanced (it is advanced first: the synchronous step).
            sampled_token_ids: one token per entry of ``batch.sample_indices``, in order.
            logprobs: the log-probability of each of those tokens.
        """
        if batch is self._scheduled:
            self.advance(batch)
        if not self._in_flight or batch is not self._in_flight[0]:
            raise RuntimeError(
                "postprocess: expected the oldest batch in flight (or the batch returned by the "
                "last schedule)"
            )
        expected = len(batch.sample_indices)
        for name, values in (
            ("sampled_token_ids", sampled_token_ids),
            ("logprobs", logprobs),
        ):
            if len(values) != expected:
                raise ValueError(
                    f"{name}: expected one value per sampling entry ({expected}), got {len(values)}"
                )
        self._in_flight.popleft()
        bs = self.block_size
        finished: list[Sequence] = []
        for index, token_id, logprob in zip(batch.sample_indices, sampled_token_ids, logprobs):
            seq = batch.entries[index].seq
            if seq.is_finished:
                continue  # aborted, or stopped by the batch before, while this one was in flight
            token_id = int(token_id)
            position = seq.resolve_placeholder(token_id, float(logprob))
            reason = self._stop_reason(seq, token_id, position)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
            elif seq.num_computed_tokens > position and (position + 1) % bs == 0:
                # The batch since scheduled feeds this token and completes its block: hash it.
                self.block_manager.cache_full_blocks(seq, position, position + 1)
        return finished

    # ------------------------------------------------------------------ internals

    def _stop_reason(self, seq: Sequence, token_id: int, position: int) -> FinishReason | None:
        if token_id in seq.params.stop_token_ids or (
            not seq.params.ignore_eos and token_id in self.eos_token_ids
        ):
            return "stop"
        # add() ensured prompt + max_tokens <= max_model_len, so this also bounds the length.
        if position + 1 - seq.num_prompt_tokens >= seq.params.max_tokens:
            return "length"
        return None

    def _make_room(self, seq: Sequence, num_new_tokens: int, scheduled: set[int]) -> bool:
        """Preempt newer unscheduled sequences until ``seq`` can grow; False if it cannot."""
        while not self.block_manager.can_append(seq, num_new_tokens):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            if victim is seq:
                return False
            self._preempt(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.capture.on_preempt(seq)
        self.block_manager.deallocate(seq)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (free blocks: %d)", seq, self.block_manager.num_free_blocks)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        # Tokens sampled after the finishing one were never asked for; nor is their KV kept.
        seq.drop_placeholders()
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq) - 1)
        seq.finish_reason = reason
        self.capture.on_finish(seq)
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.block_manager.deallocate(seq)
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        del self._unfinished[seq.seq_id]


def _finishes_in_flight(seq: Sequence) -> bool:
    """Whether the placeholder of the batch in flight is the sequence's last token (it reaches
    ``max_tokens``): nothing is left to feed. (Without placeholders such a sequence has
    finished already.)"""
    return seq.num_generated_tokens >= seq.params.max_tokens
