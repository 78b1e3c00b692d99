"""Attention backends of the deterministic mode: the engine's paged one and a training forward's.

Legend: T tokens in the step, B sequences, N query heads, G KV heads, D head dim, Q a
sequence's new tokens, C its context.

Both compute each sequence with ``routing_kernels.batch_invariant.attention``, whose output for
a query depends only on the keys and values at positions up to its own, reduced in an order
aligned to position 0. So the same token gets the same bits whichever backend computes it:

- ``InvariantAttentionBackend`` (``rollout.LLM(deterministic=True)``): writes the step's K/V
  into the paged cache and attends each sequence's new tokens over its pages in position
  order: one forward, any chunk of a chunked prefill, a decode step, a prefix-cache hit or a
  recompute after preemption give the bits of one forward.
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
    _check_cache,
)
from rollout.layers.kv_store import store_kv
from routing_kernels import batch_invariant

__all__ = ["InvariantAttentionBackend", "SequenceAttentionBackend"]


@dataclass(slots=True, frozen=True)
class _InvariantState:
    max_query_len: int


class InvariantAttentionBackend(TorchAttentionBackend):
    """Paged attention by ``batch_invariant.paged_attention`` (module docstring): the step's
    K/V are written into the cache (slot -1 skipped), then every sequence attends over its
    pages; the Triton kernel on CUDA (decode steps capturable in CUDA graphs), the reference
    elsewhere."""

    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> _InvariantState:
        """The step's longest query run (the kernel's grid). A decode step may be captured in
        a CUDA graph on CUDA: its inputs are the runner's static buffers, the kernels read
        them without a host synchronisation, and a padding row (length 0) gets zeros."""
        if cuda_graph and not (batch.is_decode and batch.input_ids.is_cuda):
            raise ValueError(
                "cuda_graph: expected a decode batch on CUDA for a CUDA-graph plan, got "
                f"{'a decode' if batch.is_decode else 'a prefill'} batch on "
                f"{batch.input_ids.device}"
            )
        starts = batch.query_start_loc_cpu
        longest = int((starts[1:] - starts[:-1]).max()) if starts.shape[0] > 1 else 0
        return _InvariantState(max_query_len=longest)

    def forward(
        self,
        q_TND: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        _check_cache(kv_cache, q_TND, self.spec)
        store_kv(k_TGD, v_TGD, kv_cache, batch.slot_mapping)
        return batch_invariant.paged_attention(
            q_TND,
            kv_cache[:, 0],
            kv_cache[:, 1],
            query_start_B1=batch.query_start_loc,
            seq_lens_B=batch.seq_lens,
            block_tables_BM=batch.block_tables,
            scale=self.spec.scale,
            max_query_len=batch.attn_state.max_query_len,
        )


@dataclass(slots=True, frozen=True)
class _SequenceState:
    query_start: tuple[int, ...]
    seq_lens: tuple[int, ...]
    # Each sequence's tokens as pages of one token: row b lists its flat token indices.
    tables_BM: torch.Tensor
    max_query_len: int


class SequenceAttentionBackend(AttentionBackend):
    """Attention within each whole sequence of a step, without a KV cache (module docstring).

    A planned batch's sequence ``i`` owns tokens ``query_start_loc[i]:query_start_loc[i + 1]``
    and has ``seq_lens[i]`` equal to that count (a whole sequence from position 0), or 0 for a
    run of padding tokens. The deterministic path hands the step's own K/V to
    ``batch_invariant.paged_attention`` as pages of one token each.

    Args:
        spec: the model's attention shape.
        deterministic: ``batch_invariant.paged_attention`` (True) or plain torch attention.
    """

    needs_kv_cache = False

    def __init__(self, spec: AttentionSpec, *, deterministic: bool) -> None:
        self.spec = spec
        self.deterministic = deterministic

    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> _SequenceState:
        if cuda_graph:
            raise ValueError(
                "cuda_graph: SequenceAttentionBackend has no CUDA-graph plan, got True"
            )
        query_start = tuple(batch.query_start_loc_cpu.tolist())
        seq_lens = tuple(batch.seq_lens_cpu.tolist())
        for i, context in enumerate(seq_lens):
            count = query_start[i + 1] - query_start[i]
            if context not in (0, count):
                raise ValueError(
                    f"seq_lens[{i}]: expected {count} (a whole sequence) or 0 (padding), "
                    f"got {context}"
                )
        longest = max(seq_lens, default=0)
        starts_B = torch.tensor(query_start[:-1], dtype=torch.int32)
        tables_BM = starts_B[:, None] + torch.arange(max(longest, 1), dtype=torch.int32)
        return _SequenceState(
            query_start=query_start,
            seq_lens=seq_lens,
            tables_BM=tables_BM.to(batch.input_ids.device),
            max_query_len=max((b - a for a, b in zip(query_start, query_start[1:])), default=0),
        )

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
        if self.deterministic:
            return batch_invariant.paged_attention(
                q_TND,
                k_TGD[:, None],
                v_TGD[:, None],
                query_start_B1=batch.query_start_loc,
                seq_lens_B=batch.seq_lens,
                block_tables_BM=state.tables_BM,
                scale=self.spec.scale,
                max_query_len=state.max_query_len,
            )
        group = self.spec.num_heads // self.spec.num_kv_heads
        pieces = []
        for i, context in enumerate(state.seq_lens):
            start, end = state.query_start[i], state.query_start[i + 1]
            if context == 0:
                pieces.append(q_TND.new_zeros((end - start, *q_TND.shape[1:])))
                continue
            pieces.append(
                _causal_attention(
                    q_TND[start:end], k_TGD[start:end], v_TGD[start:end],
                    scale=self.spec.scale, group=group,
                ).to(q_TND.dtype)
            )  # fmt: skip
        return torch.cat(pieces) if pieces else q_TND.new_zeros(q_TND.shape)
