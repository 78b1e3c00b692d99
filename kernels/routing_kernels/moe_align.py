"""Token sorting for the fused MoE: (token, slot) pairs grouped by expert in GEMM row blocks.

Legend: T tokens, K experts per token, P = T*K (token, slot) pairs, E experts, B row blocks of
``block_m`` sorted positions; ``_TK`` / ``_P`` / ``_B`` suffixes.

Pair ``p = t * K + s`` is token ``t``'s ``s``-th routed expert. The layout written here feeds the
grouped GEMMs of ``routing_kernels.fused_moe``:

- ``sorted_pair_ids``: the pairs of expert 0 in increasing ``p``, padded with the sentinel ``P``
  up to a multiple of ``block_m``, then those of expert 1, and so on. Experts that receive no
  pair take no block.
- ``expert_ids_B``: the expert of each block.
- ``num_post_padded``: one int32, the number of sorted positions in use (a multiple of
  ``block_m``); blocks at or beyond it hold garbage and the GEMMs skip them.

Everything stays on the device, with no host synchronisation, and the buffers are sized by the
worst case ``P + min(E, P) * (block_m - 1)`` (fixed for fixed ``T``), so the sort can be
captured in a CUDA graph. Ids are expected in ``[0, E)`` (they come from
``routing_kernels.route``) and are not range-checked here, which would need a host sync; a pair
with an id outside the range is left out of the layout.

The Triton path builds a one-hot ``[CHUNK, E]`` matrix per chunk of pairs: its column sums are
the per-expert counts and its column-wise prefix sums give each pair's rank among the pairs of
its expert. Small ``P`` (decode) runs in one program, one launch; larger ``P`` runs a count
kernel and a scatter kernel over all chunks in parallel around a one-program layout kernel.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

__all__ = ["MoeAlignment", "max_padded_pairs", "moe_align", "moe_align_reference"]

# One-hot tiles of at most this many int32 elements keep the align kernels in registers.
_ONEHOT_ELEMENTS = 16384
# Up to this many chunks one program does everything, so that decode batches (P up to a few
# hundred) pay a single launch; beyond, the chunks' serial cost in one program (estimated at
# about one launch each) favours the parallel three-kernel path.
_SINGLE_PROGRAM_MAX_CHUNKS = 4
# Blocks whose expert is resolved per step of the layout loop.
_LAYOUT_BLOCKS_PER_STEP = 64


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class MoeAlignment:
    """The expert-sorted layout of the (token, slot) pairs; see the module docstring.

    ``sorted_pair_ids`` has ``max_padded_pairs(P, E, block_m)`` entries and ``expert_ids_B``
    ``ceil(that / block_m)``, both int32; only the first ``num_post_padded`` positions (and
    ``num_post_padded // block_m`` blocks) are meaningful.
    """

    sorted_pair_ids: torch.Tensor
    expert_ids_B: torch.Tensor
    num_post_padded: torch.Tensor
    block_m: int


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case sorted positions: each expert that gets a pair may leave ``block_m - 1`` unused.

    At most ``min(E, P)`` experts get a pair. The tighter bound matters in decode, where the
    GEMM grids (sized by it) would otherwise be mostly programs that exit at once.
    """
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Sort the (token, slot) pairs of ``topk_ids_TK`` by expert into ``block_m``-row blocks.

    Runs the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); no host sync.
    """
    num_pairs = _check_inputs(topk_ids_TK, num_experts, block_m)
    ids_P = topk_ids_TK.reshape(-1)
    if not ids_P.is_contiguous():
        ids_P = ids_P.contiguous()
    alignment = _empty_alignment(num_pairs, num_experts, block_m, topk_ids_TK.device)
    experts_pow2 = triton.next_power_of_2(num_experts)
    chunk = max(16, min(128, _ONEHOT_ELEMENTS // experts_pow2, triton.next_power_of_2(num_pairs)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    common = dict(CHUNK=chunk, E_POW2=experts_pow2)
    layout_args = (alignment.sorted_pair_ids, alignment.expert_ids_B, alignment.num_post_padded)
    layout_params = dict(BLOCK_M=block_m, BLOCKS_PER_STEP=_LAYOUT_BLOCKS_PER_STEP)
    if num_chunks <= _SINGLE_PROGRAM_MAX_CHUNKS:
        _align_single_program_kernel[(1,)](
            ids_P, *layout_args, num_pairs, num_experts, **layout_params, **common
        )
        return alignment
    # Per-chunk counts, then (in place) each chunk's first sorted position per expert.
    counts_CE = torch.empty((num_chunks, experts_pow2), dtype=torch.int32, device=ids_P.device)
    _align_count_kernel[(num_chunks,)](ids_P, counts_CE, num_pairs, num_experts, **common)
    rows_per_step = max(1, _ONEHOT_ELEMENTS // experts_pow2)
    _align_layout_kernel[(1,)](
        counts_CE,
        *layout_args,
        num_pairs,
        num_chunks,
        ROWS_PER_STEP=rows_per_step,
        **layout_params,
        **common,
    )
    _align_scatter_kernel[(num_chunks,)](
        ids_P, counts_CE, alignment.sorted_pair_ids, num_pairs, num_experts, **common
    )
    return alignment


def moe_align_reference(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """``moe_align`` in plain torch (any device, no host sync), with the same buffers and layout.

    Unused positions and blocks are filled with the sentinel ``P`` and ``-1`` where the Triton
    path leaves them unwritten.
    """
    num_pairs = _check_inputs(topk_ids_TK, num_experts, block_m)
    device = topk_ids_TK.device
    alignment = _empty_alignment(num_pairs, num_experts, block_m, device)
    ids_P = topk_ids_TK.reshape(-1).long()
    in_range_P = (ids_P >= 0) & (ids_P < num_experts)
    # Out-of-range pairs go to a virtual expert E that never gets a block.
    key_P = torch.where(in_range_P, ids_P, num_experts)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, key_P, torch.ones_like(key_P))
    counts_E = counts_E[:num_experts]
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    padded_end_E = torch.cumsum(padded_E, dim=0)
    count_start_E = torch.cumsum(counts_E, dim=0) - counts_E
    order_P = torch.sort(key_P, stable=True).indices
    sorted_key_P = key_P[order_P]
    kept_P = sorted_key_P < num_experts
    expert_P = sorted_key_P.clamp(max=num_experts - 1)
    rank_P = torch.arange(num_pairs, device=device) - count_start_E[expert_P]
    # Dropped pairs land in one extra trailing slot (a boolean index would sync with the host).
    max_padded = alignment.sorted_pair_ids.numel()
    dest_P = torch.where(kept_P, padded_end_E[expert_P] - padded_E[expert_P] + rank_P, max_padded)
    sorted_with_dump = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_with_dump.scatter_(0, dest_P, order_P.to(torch.int32))
    alignment.sorted_pair_ids.copy_(sorted_with_dump[:max_padded])
    block_start_B = torch.arange(alignment.expert_ids_B.numel(), device=device) * block_m
    owner_B = torch.searchsorted(padded_end_E, block_start_B, right=True)
    total = padded_end_E[-1]
    alignment.expert_ids_B.copy_(torch.where(block_start_B < total, owner_B, -1))
    alignment.num_post_padded.copy_(total.reshape(1))
    return alignment


def _check_inputs(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> int:
    """Validate the align inputs; return the number of pairs."""
    if not isinstance(topk_ids_TK, torch.Tensor):
        raise TypeError(f"topk_ids_TK: expected a torch.Tensor, got {type(topk_ids_TK).__name__}")
    if topk_ids_TK.ndim != 2:
        raise ValueError(
            f"topk_ids_TK: expected 2 dims [T, K], got shape {tuple(topk_ids_TK.shape)}"
        )
    if (
        topk_ids_TK.dtype.is_floating_point
        or topk_ids_TK.dtype.is_complex
        or topk_ids_TK.dtype == torch.bool
    ):
        raise ValueError(f"topk_ids_TK: expected an integer dtype, got {topk_ids_TK.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
    if isinstance(block_m, bool) or not isinstance(block_m, int):
        raise TypeError(f"block_m: expected an int, got {type(block_m).__name__}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two >= 16, got {block_m}")
    num_pairs = topk_ids_TK.numel()
    if num_pairs >= 2**31 - num_experts * block_m:
        raise ValueError(
            f"topk_ids_TK: expected fewer than 2**31 entries with padding, got {num_pairs}"
        )
    return num_pairs


def _empty_alignment(
    num_pairs: int, num_experts: int, block_m: int, device: torch.device
) -> MoeAlignment:
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    return MoeAlignment(
        sorted_pair_ids=torch.empty(max_padded, dtype=torch.int32, device=device),
        expert_ids_B=torch.empty(
            triton.cdiv(max_padded, block_m), dtype=torch.int32, device=device
        ),
        num_post_padded=torch.empty(1, dtype=torch.int32, device=device),
        block_m=block_m,
    )


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _chunk_onehot(
    ids_ptr, start, num_pairs, num_experts, CHUNK: tl.constexpr, E_POW2: tl.constexpr
):
    """One-hot [CHUNK, E_POW2] int32 of pairs ``start + [0, CHUNK)``; bad ids match no column."""
    offs = start + tl.arange(0, CHUNK)
    # The pair mask goes into the match too: ``other`` would wrap to a valid id for uint8 ids.
    in_range = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0).to(tl.int32)
    experts = tl.arange(0, E_POW2)
    hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts) & in_range[:, None]
    return hit.to(tl.int32), offs


@triton.jit
def _scatter_chunk(
    ids_ptr,
    sorted_ptr,
    start,
    num_pairs,
    num_experts,
    base_E,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """Store the chunk's pairs at ``base_E[e]`` + their rank within expert ``e``; return counts."""
    onehot, offs = _chunk_onehot(ids_ptr, start, num_pairs, num_experts, CHUNK, E_POW2)
    # Only a pair's own column is nonzero in ``onehot``, so the row sum picks its destination.
    dest = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1 + base_E[None, :]), axis=1)
    tl.store(sorted_ptr + dest, offs, mask=tl.sum(onehot, axis=1) > 0)
    return tl.sum(onehot, axis=0)


@triton.jit
def _write_layout(
    counts_E,
    sorted_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    """From the per-expert counts, write everything but the pair ids; return each expert's start."""
    padded_E = (counts_E + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end_E = tl.cumsum(padded_E, axis=0)
    start_E = end_E - padded_E
    total = tl.sum(padded_E, axis=0)
    tl.store(num_post_padded_ptr, total)
    # The sentinel fills the short tail of each expert's last block.
    tail_EM = (start_E + counts_E)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    sentinel_EM = tl.zeros([E_POW2, BLOCK_M], dtype=tl.int32) + num_pairs
    tl.store(sorted_ptr + tail_EM, sentinel_EM, mask=tail_EM < end_E[:, None])
    # Block b belongs to the expert whose range holds b * BLOCK_M: the count of ranges ending
    # at or before it (empty experts' ranges included, ranges being contiguous and in order).
    num_blocks = total // BLOCK_M
    for first in range(0, num_blocks, BLOCKS_PER_STEP):
        blocks = first + tl.arange(0, BLOCKS_PER_STEP)
        owner = tl.sum((end_E[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < num_blocks)
    return start_E


@triton.jit
def _align_single_program_kernel(
    ids_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    num_experts,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    counts_E = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        onehot, _ = _chunk_onehot(ids_ptr, start, num_pairs, num_experts, CHUNK, E_POW2)
        counts_E += tl.sum(onehot, axis=0)
    base_E = _write_layout(
        counts_E,
        sorted_ptr,
        expert_ids_ptr,
        num_post_padded_ptr,
        num_pairs,
        BLOCK_M,
        E_POW2,
        BLOCKS_PER_STEP,
    )
    for start in range(0, num_pairs, CHUNK):
        base_E += _scatter_chunk(
            ids_ptr, sorted_ptr, start, num_pairs, num_experts, base_E, CHUNK, E_POW2
        )


@triton.jit
def _align_count_kernel(
    ids_ptr, counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, E_POW2: tl.constexpr
):
    chunk = tl.program_id(0)
    onehot, _ = _chunk_onehot(ids_ptr, chunk * CHUNK, num_pairs, num_experts, CHUNK, E_POW2)
    tl.store(counts_ptr + chunk * E_POW2 + tl.arange(0, E_POW2), tl.sum(onehot, axis=0))


@triton.jit
def _align_layout_kernel(
    counts_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    num_chunks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    E_POW2: tl.constexpr,
    ROWS_PER_STEP: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    """Total the chunk counts, write the layout, and turn each count row into its chunk's base."""
    experts = tl.arange(0, E_POW2)
    counts_E = tl.zeros([E_POW2], dtype=tl.int32)
    for first in range(0, num_chunks, ROWS_PER_STEP):
        rows = first + tl.arange(0, ROWS_PER_STEP)
        ptrs = counts_ptr + rows[:, None] * E_POW2 + experts[None, :]
        counts_E += tl.sum(tl.load(ptrs, mask=rows[:, None] < num_chunks, other=0), axis=0)
    base_E = _write_layout(
        counts_E,
        sorted_ptr,
        expert_ids_ptr,
        num_post_padded_ptr,
        num_pairs,
        BLOCK_M,
        E_POW2,
        BLOCKS_PER_STEP,
    )
    for first in range(0, num_chunks, ROWS_PER_STEP):
        rows = first + tl.arange(0, ROWS_PER_STEP)
        ptrs = counts_ptr + rows[:, None] * E_POW2 + experts[None, :]
        mask = rows[:, None] < num_chunks
        counts_RE = tl.load(ptrs, mask=mask, other=0)
        inclusive_RE = tl.cumsum(counts_RE, axis=0)
        tl.store(ptrs, base_E[None, :] + inclusive_RE - counts_RE, mask=mask)
        base_E += tl.sum(counts_RE, axis=0)


@triton.jit
def _align_scatter_kernel(
    ids_ptr, base_ptr, sorted_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, E_POW2: tl.constexpr
):
    chunk = tl.program_id(0)
    base_E = tl.load(base_ptr + chunk * E_POW2 + tl.arange(0, E_POW2))
    _scatter_chunk(
        ids_ptr, sorted_ptr, chunk * CHUNK, num_pairs, num_experts, base_E, CHUNK, E_POW2
    )
