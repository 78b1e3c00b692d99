"""A step's rollouts (``Batch``) and their padded training tensors (``TrainBatch``).

``Batch`` holds, per answer, the prompt and generated token ids, the rollout engine's logprob
of every generated token and, when the engine captured routing, the sequence's
``RoutedExperts`` trace (rows for tokens ``0 .. N-2`` of its ``N`` prompt + generated tokens,
start 0: DESIGN.md's row convention, the layout ``ReplayController.replay`` expects).

``TrainBatch`` is the right-padded ``[B, S]`` form a training forward takes. Position ``t``
of ``rollout_logp_BS`` holds the engine's logprob of token ``t`` (0 outside answers), aligned
with ``replay.trainer.grpo.token_logprobs``.

Legend: B sequences, S token positions (the longest sequence of the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replay.routed_experts import RoutedExperts
from rollout import RequestOutput, RoutingSpec

__all__ = ["Batch", "TrainBatch"]


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainBatch:
    """Right-padded tensors of a batch (padding: ``attention_mask_BS == 0``).

    Attributes:
        input_ids_BS: int64 prompt + generated tokens (padding holds ``pad_token_id``).
        attention_mask_BS: int64 1 on real tokens.
        answer_mask_BS: bool, the generated tokens (the loss and mismatch metrics' tokens).
        rollout_logp_BS: float32 engine logprobs of the generated tokens, 0 elsewhere.
        lengths_B: int64 tokens per sequence.
    """

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    answer_mask_BS: torch.Tensor
    rollout_logp_BS: torch.Tensor
    lengths_B: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real tokens of the batch."""
        return int(self.lengths_B.sum())


@dataclass(kw_only=True, slots=True, frozen=True, eq=False)
class Batch:
    """Rollouts of one step, in request order.

    Attributes:
        prompt_token_ids: per answer, its prompt.
        token_ids: per answer, the generated tokens (an eos or stop token included).
        logprobs: per answer, float32 ``[len(token_ids)]`` engine logprobs.
        finish_reasons: per answer, ``"stop"``, ``"length"`` or ``"abort"``.
        texts: per answer, the decoded answer (None without a tokenizer).
        traces: per answer, its routing trace; None when the engine returned no routing.
    """

    prompt_token_ids: tuple[tuple[int, ...], ...]
    token_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[np.ndarray, ...]
    finish_reasons: tuple[str, ...]
    texts: tuple[str | None, ...]
    traces: tuple[RoutedExperts, ...] | None

    def __post_init__(self) -> None:
        n = len(self.prompt_token_ids)
        for name in ("token_ids", "logprobs", "finish_reasons", "texts"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name}: expected {n} entries (one per answer, as prompt_token_ids), "
                    f"got {len(getattr(self, name))}"
                )
        for i, (prompt, answer, logp) in enumerate(
            zip(self.prompt_token_ids, self.token_ids, self.logprobs, strict=True)
        ):
            if not prompt or not answer:
                raise ValueError(
                    f"token_ids[{i}]: expected a non-empty prompt and answer, got "
                    f"{len(prompt)} prompt and {len(answer)} answer tokens"
                )
            if logp.shape != (len(answer),):
                raise ValueError(
                    f"logprobs[{i}]: expected shape ({len(answer)},) (one per generated token), "
                    f"got {logp.shape}"
                )
        if self.traces is not None:
            if len(self.traces) != n:
                raise ValueError(f"traces: expected {n} (one per answer), got {len(self.traces)}")
            for i, trace in enumerate(self.traces):
                rows = len(self.prompt_token_ids[i]) + len(self.token_ids[i]) - 1
                if trace.start != 0 or trace.num_rows != rows:
                    raise ValueError(
                        f"traces[{i}]: expected start 0 and {rows} rows (prompt + answer - 1), "
                        f"got start {trace.start} and {trace.num_rows} rows"
                    )

    @classmethod
    def from_outputs(
        cls, outputs: Sequence[RequestOutput], routing_spec: RoutingSpec | None = None
    ) -> Batch:
        """Wrap engine outputs. Their ``routed_experts`` (all present or all None) become
        ``RoutedExperts`` of ``routing_spec`` (required when present)."""
        routed = [out.routed_experts is not None for out in outputs]
        traces = None
        if any(routed):
            if not all(routed):
                missing = routed.index(False)
                raise ValueError(
                    f"outputs[{missing}].routed_experts: expected routing for every output "
                    f"(the others have it), got None"
                )
            if routing_spec is None:
                raise ValueError(
                    "routing_spec: expected the engine's spec to wrap routing, got None"
                )
            traces = tuple(
                RoutedExperts(
                    out.routed_experts, routing_spec.moe_layers, routing_spec.num_experts, start=0
                )
                for out in outputs
            )
        return cls(
            prompt_token_ids=tuple(tuple(out.prompt_token_ids) for out in outputs),
            token_ids=tuple(tuple(out.token_ids) for out in outputs),
            logprobs=tuple(np.asarray(out.logprobs, dtype=np.float32) for out in outputs),
            finish_reasons=tuple(out.finish_reason for out in outputs),
            texts=tuple(out.text for out in outputs),
            traces=traces,
        )

    @classmethod
    def concat(cls, batches: Sequence[Batch]) -> Batch:
        """The answers of ``batches`` in order (all with traces or all without)."""
        if not batches:
            raise ValueError("batches: expected at least one batch, got none")
        with_traces = [b.traces is not None for b in batches]
        if any(with_traces) and not all(with_traces):
            raise ValueError(
                f"batches[{with_traces.index(False)}].traces: expected traces like the others, "
                f"got None"
            )
        return cls(
            prompt_token_ids=sum((b.prompt_token_ids for b in batches), ()),
            token_ids=sum((b.token_ids for b in batches), ()),
            logprobs=sum((b.logprobs for b in batches), ()),
            finish_reasons=sum((b.finish_reasons for b in batches), ()),
            texts=sum((b.texts for b in batches), ()),
            traces=sum((b.traces for b in batches), ()) if all(with_traces) else None,
        )

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """Generated tokens over all answers."""
        return sum(len(t) for t in self.token_ids)

    @property
    def finished(self) -> list[bool]:
        """Per answer, whether it stopped on its own (eos or a stop token)."""
        return [reason == "stop" for reason in self.finish_reasons]

    def require_traces(self, what: str) -> tuple[RoutedExperts, ...]:
        """The traces, or ValueError saying that ``what`` needs the rollout's routing."""
        if self.traces is None:
            raise ValueError(
                f"{what}: expected the rollout's routed experts in the batch, got none; build "
                f"the engine with capture_routing=True and sample with "
                f"SamplingParams(return_routed_experts=True)"
            )
        return self.traces

    def select(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """The answers at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < len(self):
                raise ValueError(f"indices: expected values in [0, {len(self)}), got {i}")
        return Batch(
            prompt_token_ids=tuple(self.prompt_token_ids[i] for i in idx),
            token_ids=tuple(self.token_ids[i] for i in idx),
            logprobs=tuple(self.logprobs[i] for i in idx),
            finish_reasons=tuple(self.finish_reasons[i] for i in idx),
            texts=tuple(self.texts[i] for i in idx),
            traces=None if self.traces is None else tuple(self.traces[i] for i in idx),
        )

    def to_tensors(
        self, device: torch.device | str | None = None, *, pad_token_id: int = 0
    ) -> TrainBatch:
        """Right-padded training tensors of every answer (``S`` = the longest sequence)."""
        lengths = [
            len(p) + len(a) for p, a in zip(self.prompt_token_ids, self.token_ids, strict=True)
        ]
        batch, seq_len = len(self), max(lengths)
        input_ids_BS = np.full((batch, seq_len), pad_token_id, dtype=np.int64)
        attention_mask_BS = np.zeros((batch, seq_len), dtype=np.int64)
        answer_mask_BS = np.zeros((batch, seq_len), dtype=bool)
        rollout_logp_BS = np.zeros((batch, seq_len), dtype=np.float32)
        for b, (prompt, answer, logp) in enumerate(
            zip(self.prompt_token_ids, self.token_ids, self.logprobs, strict=True)
        ):
            p, n = len(prompt), len(prompt) + len(answer)
            input_ids_BS[b, :p] = prompt
            input_ids_BS[b, p:n] = answer
            attention_mask_BS[b, :n] = 1
            answer_mask_BS[b, p:n] = True
            rollout_logp_BS[b, p:n] = logp
        return TrainBatch(
            input_ids_BS=torch.from_numpy(input_ids_BS).to(device),
            attention_mask_BS=torch.from_numpy(attention_mask_BS).to(device),
            answer_mask_BS=torch.from_numpy(answer_mask_BS).to(device),
            rollout_logp_BS=torch.from_numpy(rollout_logp_BS).to(device),
            lengths_B=torch.tensor(lengths, dtype=torch.int64, device=device),
        )
