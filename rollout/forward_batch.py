"""The plain-data contract between the model runner and the model for one forward step.

Legend: T tokens in the step (all sequences' new tokens, flattened), B sequences, M max
blocks per sequence, L MoE layers, K top-k.

The runner flattens the new tokens of every scheduled sequence into one row of T tokens
(prefill chunks and decode tokens may be mixed), builds a ``ForwardBatch``, lets the attention
backend ``plan`` it once, and calls ``model.forward(batch)``. Nothing here is model specific.

**KV cache.** The runner allocates one tensor for all layers with
``rollout.layers.attention.allocate_kv_cache`` ::

    kv_cache = [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]

and hands each attention layer its own view ``kv_cache[i]`` through ``model.bind_kv_cache``.
Per layer that is FlashInfer's "NHD" paged layout (``[:, 0]`` keys, ``[:, 1]`` values), so the
FlashInfer wrappers read it directly. A KV *slot* is ``block * block_size + offset``; token
``t`` of the step writes its key and value into slot ``slot_mapping[t]``, and ``-1`` marks a
padding token whose K/V are never written.

**Routing capture.** ``capture`` is the step's ``rollout.capture.RoutedExpertsCapturer`` (its
buffer a static input of CUDA graphs), through whose API MoE layer ``l`` writes its top-k ids
into rows ``[:T]`` of layer ``l``; ``None`` means capture off: nothing is written and nothing is
allocated. The story: ``rollout.capture``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rollout.capture import RoutedExpertsCapturer
    from rollout.layers.attention import AttentionBackend

__all__ = ["ForwardBatch"]


@dataclass(kw_only=True, slots=True)
class ForwardBatch:
    """Inputs of one forward step (device tensors unless the name ends in ``_cpu``).

    Sequence ``i`` owns tokens ``query_start_loc[i] : query_start_loc[i + 1]`` of the flat
    token row; they are its newest ``q_i`` tokens, so its first new token sits at position
    ``seq_lens[i] - q_i`` (the number of tokens already in its KV cache).

    Attributes:
        input_ids: [T] int64 token ids.
        positions: [T] int64 position of each token in its sequence (0-based; drives RoPE).
        slot_mapping: [T] int64 KV slot (``block * block_size + offset``) each token's K/V
            is written to before attention; ``-1`` marks padding (kernels skip it).
        query_start_loc: [B + 1] int32 cumulative query lengths, ``query_start_loc[0] == 0``
            and ``query_start_loc[B] == T``.
        seq_lens: [B] int32 context length of each sequence after this step (cached + new
            tokens); the attention of its new tokens covers KV positions ``[0, seq_lens[i])``
            with the causal rule. A padding sequence (CUDA-graph batch padding) has length 0.
        block_tables: [B, M] int32 KV block ids of each sequence in order, ``-1`` padded.
        query_start_loc_cpu, seq_lens_cpu, block_tables_cpu: host (CPU) copies of the three
            above. Backends plan from them without a device-to-host synchronisation; on a CPU
            device they may be the very same tensors.
        is_decode: every sequence has exactly one new token (``T == B``); such batches may
            run through CUDA graphs and FlashInfer's decode kernels.
        attn_backend: the ``AttentionBackend`` that planned this batch; attention layers call
            ``attn_backend.forward``.
        attn_state: what ``attn_backend.plan(batch)`` returned (the backend's per-step state:
            FlashInfer wrappers, host lists of lengths); opaque to everyone else.
        capture: ``None`` (capture off) or the capturer whose buffer [>= T, L, K] the MoE
            layers write their expert ids into (``RoutedExpertsCapturer``).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_tables_cpu: torch.Tensor
    is_decode: bool
    attn_backend: AttentionBackend | None = None
    attn_state: Any = None
    capture: RoutedExpertsCapturer | None = None

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens in the step."""
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        """B, the number of sequences in the step."""
        return self.seq_lens.shape[0]

    def validate(self, *, num_moe_layers: int | None = None, top_k: int | None = None) -> None:
        """Check shapes and dtypes (not values, which would need a device sync).

        Meant for tests and for the runner's debug path; the model does not call it per step.

        Raises:
            ValueError: a field has the wrong shape, dtype or device, naming it.
        """
        t, b = self.num_tokens, self.num_seqs
        expect = {
            "input_ids": (self.input_ids, (t,), torch.int64),
            "positions": (self.positions, (t,), torch.int64),
            "slot_mapping": (self.slot_mapping, (t,), torch.int64),
            "query_start_loc": (self.query_start_loc, (b + 1,), torch.int32),
            "seq_lens": (self.seq_lens, (b,), torch.int32),
            "query_start_loc_cpu": (self.query_start_loc_cpu, (b + 1,), torch.int32),
            "seq_lens_cpu": (self.seq_lens_cpu, (b,), torch.int32),
        }
        for name, (tensor, shape, dtype) in expect.items():
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: expected shape {shape} dtype {dtype}, "
                    f"got shape {tuple(tensor.shape)} dtype {tensor.dtype}"
                )
        for name in ("block_tables", "block_tables_cpu"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.shape[0] != b or tensor.dtype != torch.int32:
                raise ValueError(
                    f"{name}: expected shape ({b}, max_blocks) dtype torch.int32, "
                    f"got shape {tuple(tensor.shape)} dtype {tensor.dtype}"
                )
        for name in ("query_start_loc_cpu", "seq_lens_cpu", "block_tables_cpu"):
            if getattr(self, name).device.type != "cpu":
                raise ValueError(
                    f"{name}: expected a CPU tensor, got device {getattr(self, name).device}"
                )
        if self.is_decode and t != b:
            raise ValueError(f"is_decode: expected T == B for a decode batch, got T={t}, B={b}")
        if self.capture is not None:
            cap = self.capture
            if cap.max_num_tokens < t:
                raise ValueError(
                    f"capture: expected a capturer of >= {t} rows, got {cap.max_num_tokens}"
                )
            if num_moe_layers is not None and cap.num_moe_layers != num_moe_layers:
                raise ValueError(
                    f"capture: expected {num_moe_layers} MoE layers, got {cap.num_moe_layers}"
                )
            if top_k is not None and cap.top_k != top_k:
                raise ValueError(f"capture: expected top_k {top_k}, got {cap.top_k}")
