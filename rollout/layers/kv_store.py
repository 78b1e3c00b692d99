"""Write a step's keys and values into the paged KV cache by slot, skipping ``-1`` slots.

Legend: T tokens, N KV heads, D head dim, P pages (blocks), S page size (block_size).

The per-layer cache is FlashInfer's NHD paged layout ``[P, 2, S, N, D]``; slot ``s`` is page
``s // S``, offset ``s % S``. Padding tokens carry slot ``-1`` and are not written, so a
CUDA-graph batch padded to its bucket size never touches blocks it does not own.

``store_kv`` runs a Triton kernel on CUDA (one program per token, no host synchronisation, so
it is CUDA-graph safe) and ``store_kv_reference`` (plain torch) elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["store_kv", "store_kv_reference", "store_kv_triton"]


def _check(
    k_TND: torch.Tensor, v_TND: torch.Tensor, kv_cache: torch.Tensor, slots_T: torch.Tensor
) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(
            "kv_cache: expected shape [pages, 2, page_size, heads, dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    n, d = kv_cache.shape[3], kv_cache.shape[4]
    t = slots_T.shape[0]
    for name, x in (("k", k_TND), ("v", v_TND)):
        if tuple(x.shape) != (t, n, d):
            raise ValueError(f"{name}: expected shape {(t, n, d)}, got {tuple(x.shape)}")
        if x.dtype != kv_cache.dtype:
            raise ValueError(
                f"{name}: expected dtype {kv_cache.dtype} (the cache's), got {x.dtype}"
            )
    if slots_T.dim() != 1 or slots_T.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping: expected a 1-D int64 tensor, got {slots_T.dtype} {tuple(slots_T.shape)}"
        )


def store_kv_reference(
    k_TND: torch.Tensor, v_TND: torch.Tensor, kv_cache: torch.Tensor, slots_T: torch.Tensor
) -> None:
    """Plain-torch ``store_kv`` (the CPU path and the test oracle); syncs on CUDA."""
    _check(k_TND, v_TND, kv_cache, slots_T)
    page_size = kv_cache.shape[2]
    keep_T = slots_T >= 0
    slots = slots_T[keep_T]
    pages, offsets = slots // page_size, slots % page_size
    kv_cache[pages, 0, offsets] = k_TND[keep_T]
    kv_cache[pages, 1, offsets] = v_TND[keep_T]


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    k_stride_t,
    v_stride_t,
    cache_stride_page,
    cache_stride_kv,
    cache_stride_slot,
    page_size,
    ND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        page = slot // page_size
        offset = slot % page_size
        cols = tl.arange(0, BLOCK)
        mask = cols < ND
        dst = cache_ptr + page * cache_stride_page + offset * cache_stride_slot + cols
        k = tl.load(k_ptr + t * k_stride_t + cols, mask=mask)
        v = tl.load(v_ptr + t * v_stride_t + cols, mask=mask)
        tl.store(dst, k, mask=mask)
        tl.store(dst + cache_stride_kv, v, mask=mask)


def store_kv_triton(
    k_TND: torch.Tensor, v_TND: torch.Tensor, kv_cache: torch.Tensor, slots_T: torch.Tensor
) -> None:
    """Triton ``store_kv``: needs each token's [N, D] contiguous in k, v and the cache."""
    _check(k_TND, v_TND, kv_cache, slots_T)
    n, d = kv_cache.shape[3], kv_cache.shape[4]
    for name, x in (("k", k_TND), ("v", v_TND), ("kv_cache", kv_cache)):
        if x.stride(-1) != 1 or x.stride(-2) != d:
            raise ValueError(
                f"{name}: expected contiguous [heads, dim] rows, got strides {x.stride()}"
            )
    t = slots_T.shape[0]
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k_TND,
        v_TND,
        kv_cache,
        slots_T,
        k_TND.stride(0),
        v_TND.stride(0),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.shape[2],
        ND=n * d,
        BLOCK=triton.next_power_of_2(n * d),
    )


def store_kv(
    k_TND: torch.Tensor, v_TND: torch.Tensor, kv_cache: torch.Tensor, slots_T: torch.Tensor
) -> None:
    """Write ``k_TND`` / ``v_TND`` into ``kv_cache`` [P, 2, S, N, D] at ``slots_T`` (-1 skipped)."""
    if kv_cache.is_cuda:
        store_kv_triton(k_TND, v_TND, kv_cache, slots_T)
    else:
        store_kv_reference(k_TND, v_TND, kv_cache, slots_T)
