"""Paged attention: the per-layer attention op and its backends (plain torch, FlashInfer).

Legend: T tokens in the step, B sequences, N query heads, G KV heads, D head dim,
P KV pages (blocks), S page size (block_size), C context length of one sequence.

Per step the runner calls ``backend.plan(batch)`` once and stores the result in
``batch.attn_state`` (with ``batch.attn_backend = backend``); every attention layer then calls
``backend.forward(q, k, v, kv_cache, batch)``, which first writes this step's K/V into the
layer's paged cache by ``batch.slot_mapping`` (slot ``-1`` skipped) and then attends each new
token to its sequence's cached context causally (new tokens sit at the end of the context).

Backends:

- ``TorchAttentionBackend``: any device, no CUDA graphs. Gathers each sequence's K/V from its
  block table and computes attention in float32 per sequence. The CPU path and the reference.
- ``FlashInferAttentionBackend``: CUDA, fp16/bf16, head_dim 64, 128 or 256. ``BatchPrefillWithPagedKVCacheWrapper`` for
  prefill and mixed batches, ``BatchDecodeWithPagedKVCacheWrapper`` for decode batches, and one
  CUDA-graph decode wrapper per captured batch size over shared static index buffers
  (``plan(batch, cuda_graph=True)``). K/V are written by a Triton kernel (``kv_store``).
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rollout.forward_batch import ForwardBatch
from rollout.layers.kv_store import store_kv, store_kv_reference

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionSpec",
    "FlashInferAttentionBackend",
    "TorchAttentionBackend",
    "allocate_kv_cache",
    "kv_cache_bytes_per_block",
    "make_attention_backend",
    "paged_kv_metadata",
]

logger = logging.getLogger(__name__)

# The head sizes FlashInfer 0.7's paged decode, prefill and state-merge kernels are built for.
FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass(kw_only=True, slots=True, frozen=True)
class AttentionSpec:
    """The attention shape of a model, all layers alike (what the KV cache and backends need).

    Attributes:
        num_layers: decoder layers, one KV cache view each.
        num_heads: N query heads.
        num_kv_heads: G KV heads (N is a multiple of G).
        head_dim: D.
        scale: softmax scale (``head_dim ** -0.5`` for every supported family).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                f"got {self.num_heads}"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale: expected a finite positive float, got {self.scale}")


def kv_cache_bytes_per_block(spec: AttentionSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (for sizing the cache from free memory)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def allocate_kv_cache(
    spec: AttentionSpec,
    *,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """The whole paged KV cache ``[num_layers, num_blocks, 2, block_size, G, D]``, zero-filled.

    ``kv_cache[i]`` is layer ``i``'s view in FlashInfer's NHD layout; hand the tensor to
    ``model.bind_kv_cache``. Zero-filled so that padding rows, which read a dummy position,
    stay finite.
    """
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(
            f"num_blocks, block_size: expected positive ints, got {num_blocks}, {block_size}"
        )
    shape = (
        spec.num_layers,
        num_blocks,
        2,
        block_size,
        spec.num_kv_heads,
        spec.head_dim,
    )
    return torch.zeros(shape, dtype=dtype, device=device)


def _check_cache(kv_cache: torch.Tensor, q_TND: torch.Tensor, spec: AttentionSpec) -> None:
    if (
        kv_cache.dim() != 5
        or kv_cache.shape[1] != 2
        or kv_cache.shape[3:] != (spec.num_kv_heads, spec.head_dim)
    ):
        raise ValueError(
            f"kv_cache: expected [pages, 2, page_size, {spec.num_kv_heads}, {spec.head_dim}], "
            f"got {tuple(kv_cache.shape)}"
        )
    if q_TND.shape[1:] != (spec.num_heads, spec.head_dim):
        raise ValueError(
            f"q: expected [T, {spec.num_heads}, {spec.head_dim}], got {tuple(q_TND.shape)}"
        )


class AttentionBackend(abc.ABC):
    """Plans a step once (``plan``) and runs every layer's paged attention (``forward``)."""

    spec: AttentionSpec
    # Whether forward reads and writes the layer's paged KV cache (a backend that attends within
    # the step's own tokens, such as a training forward's, needs none).
    needs_kv_cache = True

    @abc.abstractmethod
    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> Any:
        """Per-step state for ``batch``; the runner stores it in ``batch.attn_state``.

        ``cuda_graph=True`` asks for state whose device buffers are static, so that a decode
        step captured in a CUDA graph replays correctly after a fresh ``plan`` (call ``plan``
        before capture and before every replay, outside the graph).
        """

    @abc.abstractmethod
    def forward(
        self,
        q_TND: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Write k, v into ``kv_cache`` [P, 2, S, G, D] at ``batch.slot_mapping``; return the
        attention output [T, N, D]."""


@dataclass(slots=True, frozen=True)
class _TorchState:
    query_start: tuple[int, ...]
    seq_lens: tuple[int, ...]


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch paged attention: per sequence, gather K/V by block table, attend in float32.

    Works on any device (one host read of the lengths per step in ``plan``); not CUDA-graph
    capturable (the K/V write compacts away ``-1`` slots).
    """

    def __init__(self, spec: AttentionSpec, *, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        self.spec = spec
        self.block_size = block_size

    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> _TorchState:
        if cuda_graph:
            raise ValueError(
                "cuda_graph: TorchAttentionBackend cannot be captured in a CUDA graph, got True"
            )
        return _TorchState(
            query_start=tuple(batch.query_start_loc_cpu.tolist()),
            seq_lens=tuple(batch.seq_lens_cpu.tolist()),
        )

    def forward(
        self,
        q_TND: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        _check_cache(kv_cache, q_TND, self.spec)
        state: _TorchState = batch.attn_state
        store_kv_reference(k_TGD, v_TGD, kv_cache, batch.slot_mapping)
        out_TND = torch.zeros_like(q_TND)
        page_size = kv_cache.shape[2]
        group = self.spec.num_heads // self.spec.num_kv_heads
        for i, context in enumerate(state.seq_lens):
            start, end = state.query_start[i], state.query_start[i + 1]
            if end == start or context == 0:
                continue
            num_pages = -(-context // page_size)
            pages = batch.block_tables[i, :num_pages].long()
            k_CGD = kv_cache[pages, 0].reshape(num_pages * page_size, *kv_cache.shape[3:])[:context]
            v_CGD = kv_cache[pages, 1].reshape(num_pages * page_size, *kv_cache.shape[3:])[:context]
            out_TND[start:end] = _causal_attention(
                q_TND[start:end], k_CGD, v_CGD, scale=self.spec.scale, group=group
            ).to(q_TND.dtype)
        return out_TND


def _causal_attention(
    q_QND: torch.Tensor,
    k_CGD: torch.Tensor,
    v_CGD: torch.Tensor,
    *,
    scale: float,
    group: int,
) -> torch.Tensor:
    """Attention of the last Q positions of a C-long context, float32 [Q, N, D]."""
    num_q, context = q_QND.shape[0], k_CGD.shape[0]
    # HF's repeat_kv: query head h reads KV head h // group.
    k_CND = k_CGD.float().repeat_interleave(group, dim=1)
    v_CND = v_CGD.float().repeat_interleave(group, dim=1)
    scores_NQC = torch.einsum("qnd,cnd->nqc", q_QND.float(), k_CND) * scale
    query_pos_Q = torch.arange(context - num_q, context, device=q_QND.device)
    key_pos_C = torch.arange(context, device=q_QND.device)
    visible_QC = key_pos_C[None, :] <= query_pos_Q[:, None]
    scores_NQC = scores_NQC.masked_fill(~visible_QC, float("-inf"))
    probs_NQC = torch.softmax(scores_NQC, dim=-1)
    return torch.einsum("nqc,cnd->qnd", probs_NQC, v_CND)


@dataclass(slots=True, frozen=True)
class _FlashInferState:
    wrapper: Any
    decode: bool


class FlashInferAttentionBackend(AttentionBackend):
    """FlashInfer paged attention on CUDA (fp16 / bf16 caches).

    Args:
        spec: the model's attention shape.
        block_size: KV page size S.
        dtype: query and KV cache dtype (float16 or bfloat16).
        device: the CUDA device.
        workspace_bytes: FlashInfer's float workspace (split-KV partial results), shared by
            all wrappers.
        use_tensor_cores: decode through the tensor-core (prefill) kernels; default: when the
            GQA group N / G is >= 4, where they are faster.
        cuda_graph_max_batch_size: largest decode batch captured in a CUDA graph (0: none).
        max_blocks_per_seq: the block-table width M the runner uses (bounds the static page
            index buffer of the CUDA-graph wrappers: ``cuda_graph_max_batch_size * M``).

    flashinfer is imported here, lazily: the rest of the package runs without it.
    """

    def __init__(
        self,
        spec: AttentionSpec,
        *,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        workspace_bytes: int = 256 * 1024 * 1024,
        use_tensor_cores: bool | None = None,
        cuda_graph_max_batch_size: int = 0,
        max_blocks_per_seq: int = 0,
    ) -> None:
        import flashinfer

        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device: expected a CUDA device for FlashInfer, got {device}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"dtype: expected torch.float16 or torch.bfloat16 for FlashInfer, got {dtype}"
            )
        if block_size <= 0:
            raise ValueError(f"block_size: expected a positive int, got {block_size}")
        if cuda_graph_max_batch_size < 0 or (cuda_graph_max_batch_size and max_blocks_per_seq <= 0):
            raise ValueError(
                "cuda_graph_max_batch_size, max_blocks_per_seq: expected max_blocks_per_seq > 0 "
                f"when graphs are on, got {cuda_graph_max_batch_size}, {max_blocks_per_seq}"
            )
        self.spec = spec
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.use_tensor_cores = (
            spec.num_heads // spec.num_kv_heads >= 4
            if use_tensor_cores is None
            else use_tensor_cores
        )
        self._flashinfer = flashinfer
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=self.use_tensor_cores
        )
        # Static buffers shared by the CUDA-graph decode wrappers: only one graph replays at a
        # time and plan() refills them before each replay.
        self.cuda_graph_max_batch_size = cuda_graph_max_batch_size
        self._graph_wrappers: dict[int, Any] = {}
        if cuda_graph_max_batch_size:
            n = cuda_graph_max_batch_size
            self._graph_indptr = torch.zeros(n + 1, dtype=torch.int32, device=device)
            self._graph_last_page_len = torch.zeros(n, dtype=torch.int32, device=device)
            self._graph_indices = torch.zeros(
                n * max_blocks_per_seq, dtype=torch.int32, device=device
            )

    def _graph_wrapper(self, batch_size: int) -> Any:
        if batch_size > self.cuda_graph_max_batch_size:
            raise ValueError(
                "batch size: expected <= cuda_graph_max_batch_size="
                f"{self.cuda_graph_max_batch_size} for a CUDA-graph plan, got {batch_size}"
            )
        wrapper = self._graph_wrappers.get(batch_size)
        if wrapper is None:
            wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=self.use_tensor_cores,
                paged_kv_indptr_buffer=self._graph_indptr[: batch_size + 1],
                paged_kv_indices_buffer=self._graph_indices,
                paged_kv_last_page_len_buffer=self._graph_last_page_len[:batch_size],
            )
            self._graph_wrappers[batch_size] = wrapper
        return wrapper

    def plan(self, batch: ForwardBatch, *, cuda_graph: bool = False) -> _FlashInferState:
        if cuda_graph and not batch.is_decode:
            raise ValueError(
                "cuda_graph: only decode batches run in CUDA graphs, got a prefill batch"
            )
        indptr, indices, last_page_len = paged_kv_metadata(
            batch.seq_lens_cpu, batch.block_tables_cpu, self.block_size
        )
        spec = self.spec
        common = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=spec.scale)
        if batch.is_decode:
            wrapper = self._graph_wrapper(batch.num_seqs) if cuda_graph else self._decode
            if cuda_graph:
                # FlashInfer copies host page indices into the graph's buffer with a blocking
                # copy, which would wait for the step in flight; a device tensor is copied
                # asynchronously (pinned staging keeps the upload itself asynchronous too).
                indices = indices.pin_memory().to(self.device, non_blocking=True)
            wrapper.plan(
                indptr,
                indices,
                last_page_len,
                spec.num_heads,
                spec.num_kv_heads,
                spec.head_dim,
                self.block_size,
                pos_encoding_mode="NONE",
                **common,
            )
            return _FlashInferState(wrapper=wrapper, decode=True)
        self._prefill.plan(
            batch.query_start_loc_cpu,
            indptr,
            indices,
            last_page_len,
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            self.block_size,
            causal=True,
            **common,
        )
        return _FlashInferState(wrapper=self._prefill, decode=False)

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
        state: _FlashInferState = batch.attn_state
        return state.wrapper.run(q_TND.contiguous(), kv_cache)


def make_attention_backend(
    spec: AttentionSpec,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    cuda_graph_max_batch_size: int = 0,
    max_blocks_per_seq: int = 0,
) -> AttentionBackend:
    """FlashInfer on CUDA for fp16 / bf16 and head sizes it has kernels for, when flashinfer is
    installed; else the torch backend (CPU, float32, another head size, or no flashinfer: then
    no CUDA graphs either)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if spec.head_dim not in FLASHINFER_HEAD_DIMS:
            # FlashInfer's decode and merge kernels are instantiated for these sizes only; any
            # other fails at the first decode step, deep inside the library.
            logger.info(
                "attention: torch backend (FlashInfer has no kernels for head_dim %d; it has %s)",
                spec.head_dim,
                FLASHINFER_HEAD_DIMS,
            )
            return TorchAttentionBackend(spec, block_size=block_size)
        try:
            return FlashInferAttentionBackend(
                spec,
                block_size=block_size,
                dtype=dtype,
                device=device,
                cuda_graph_max_batch_size=cuda_graph_max_batch_size,
                max_blocks_per_seq=max_blocks_per_seq,
            )
        except ImportError:
            pass
    return TorchAttentionBackend(spec, block_size=block_size)


def paged_kv_metadata(
    seq_lens_cpu: torch.Tensor, block_tables_cpu: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's CSR page metadata from lengths and block tables, on the host.

    Returns ``(kv_indptr [B + 1], kv_indices [sum pages], kv_last_page_len [B])``, int32.
    A padding sequence (length 0) is given one dummy position (page 0, length 1) so that its
    output stays finite; it is discarded by the runner anyway.

    Raises:
        ValueError: a sequence needs more pages than its block-table row holds, or a used
            entry is ``-1``.
    """
    seq_B = seq_lens_cpu.to(torch.int64)
    padding_B = seq_B == 0
    pages_B = torch.where(padding_B, 1, (seq_B + block_size - 1) // block_size)
    last_B = torch.where(padding_B, 1, seq_B - (pages_B - 1) * block_size)
    tables_BM = block_tables_cpu.to(torch.int32)
    if tables_BM.shape[1] == 0:
        tables_BM = torch.zeros(tables_BM.shape[0], 1, dtype=torch.int32)
    width = tables_BM.shape[1]
    if bool((pages_B > width).any()):
        raise ValueError(
            f"block_tables: expected at least {int(pages_B.max())} columns for seq_lens "
            f"{seq_lens_cpu.tolist()}, got {width}"
        )
    cols_M = torch.arange(width)
    tables_BM = torch.where(padding_B[:, None] & (cols_M[None, :] == 0), 0, tables_BM)
    indices = tables_BM[cols_M[None, :] < pages_B[:, None]]
    if bool((indices < 0).any()):
        raise ValueError("block_tables: expected valid block ids for every used page, got -1")
    indptr = torch.zeros(seq_B.shape[0] + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages_B, 0)
    return indptr, indices.contiguous(), last_B.to(torch.int32)


class Attention(nn.Module):
    """The attention op of one decoder layer: owns its KV cache view, defers to the backend.

    ``kv_cache`` is a plain attribute (not a buffer: never in ``state_dict``), set by
    ``model.bind_kv_cache``.
    """

    def __init__(self, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.kv_cache: torch.Tensor | None = None

    def forward(
        self,
        q_TND: torch.Tensor,
        k_TGD: torch.Tensor,
        v_TGD: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if batch.attn_backend is None:
            raise ValueError("attn_backend: expected the backend that planned the batch, got None")
        if self.kv_cache is None and batch.attn_backend.needs_kv_cache:
            raise ValueError(
                f"kv_cache: layer {self.layer_index} has none; call model.bind_kv_cache first"
            )
        return batch.attn_backend.forward(q_TND, k_TGD, v_TGD, self.kv_cache, batch)
