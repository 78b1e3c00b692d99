"""Attention backends of the deterministic mode: the engine's paged one and a training forward's.

Legend: T tokens in the step, B sequences, N query heads, G KV heads, D head dim, Q a
sequence's new tokens, C its context.

Both compute each sequence with ``routing_kernels.batch_invariant.attention``, whose output for
a query depends only on the keys and values at positions up to its own, reduced in an order
aligned to position 0. So the same token gets the same bits whichever backend computes it:

- ``InvariantAttentionBackend`` (``rollout.LLM(deterministic=True)``): writes the step's K/V
  into the paged cache, gathers each sequence's keys and values from it in position order and
  attends its new tokens: one forward, any chunk of a chunked prefill, a decode step, a
  prefix-cache hit or a recompute after preemption give the bits of one forward.
- ``SequenceAttentionBackend`` (the policy of ``rollout.load_policy``): no KV cache; every
  sequence of the step is whole (its context is its own tokens), and a "sequence" of context
  length 0 stands for padding tokens, whose output is zero. Differentiable. With
  ``deterministic=False`` it is the plain torch attention (an ablation of the mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import (
    AttentionBackend,
    AttentionSpec,
    TorchAttentionBackend,
    _causal_attention,
)
from routing_kernels import batch_invariant

__all__ = ["InvariantAttentionBackend", "SequenceAttentionBackend"]


class InvariantAttentionBackend(TorchAttentionBackend):
    """Paged attention by ``batch_invariant.attention`` (module docstring); any device, eager
    (no CUDA graphs)."""

    def _attend(
        self, q_QND: torch.Tensor, k_CGD: torch.Tensor, v_CGD: torch.Tensor
    ) -> torch.Tensor:
        first = k_CGD.shape[0] - q_QND.shape[0]
        return batch_invariant.attention(
            q_QND, k_CGD, v_CGD, scale=self.spec.scale, first_position=first
        )


@dataclass(slots=True, frozen=True)
class _SequenceState:
    query_start: tuple[int, ...]
    seq_lens: tuple[int, ...]


class SequenceAttentionBackend(AttentionBackend):
    """Attention within each whole sequence of a step, without a KV cache (module docstring).

    A planned batch's sequence ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i + 1]``
    and has ``seq_lens[i]`` equal to that count (a whole sequence from position 0), or 0 for a
    run of padding tokens.

    Args:
        spec: the model's attention shape.
        deterministic: ``batch_invariant.attention`` (True) or plain torch attention.
    """

    needs_kv_cache = False

    def __init__(self, spec: AttentionSpec, *, deterministic: bool) -> None:
        self.spec = spec
        self.deterministic = deterministic

    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> _SequenceState:
        if cuda_graph:
            raise ValueError("cuda_graph: SequenceAttentionBackend has no CUDA-graph plan, got True")
        query_start = tuple(batch.query_start_loc_cpu.tolist())
        seq_lens = tuple(batch.seq_lens_cpu.tolist())
        for i, context in enumerate(seq_lens):
            count = query_start[i + 1] - query_start[i]
            if context not in (0, count):
                raise ValueError(
                    f"seq_lens[{i}]: expected {count} (a whole sequence) or 0 (padding), "
                    f"got {context}"
                )
        return _SequenceState(query_start=query_start, seq_lens=seq_lens)

    def forward(
        self,
        q_TND: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        kv_cache: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Attention [T, N, D] of every token within its sequence (``kv_cache`` unused)."""
        state: _SequenceState = batch.attn_state
        pieces = []
        for i, context in enumerate(state.seq_lens):
            start, end = state.query_start[i], state.query_start[i + 1]
            if context == 0:
                pieces.append(q_TND.new_zeros((end - start, *q_TND.shape[1:])))
                continue
            q_QND, k_CGD, v_CGD = q_TND[start:end], k_TGD[start:end], v_TGD[start:end]
            if self.deterministic:
                out_QND = batch_invariant.attention(
                    q_QND, k_CGD, v_CGD, scale=self.spec.scale, first_position=0
                )
            else:
                group = self.spec.num_heads // self.spec.num_kv_heads
                out_QND = _causal_attention(
                    q_QND, k_CGD, v_CGD, scale=self.spec.scale, group=group
                ).to(q_TND.dtype)
            pieces.append(out_QND)
        return torch.cat(pieces) if pieces else q_TND.new_zeros(q_TND.shape)
