"""Batch-invariant causal attention of one sequence: the bits of a query's output depend on the
query, the keys and values at positions ``0 .. its own`` and nothing else.

Legend: Q queries, C keys (context), N query heads, G KV heads (N a multiple of G), D head dim.

Keys and values are given in position order from position 0: key ``j`` is at position ``j``;
query ``i`` is at position ``first_position + i`` and sees keys ``j <= first_position + i``.
Whatever the context holds beyond a query's position (later keys of a prefill chunk, a training
sequence's later tokens) is masked out exactly: its scores are -inf, its probabilities exact
zeros, and the reductions over keys are ``rows.tree_sum`` trees aligned to key position 0, in
which appended zeros change nothing (see ``rows``). So a token attends with the same bits in
one forward over the whole sequence, in any chunk of a chunked prefill, in a decode step over
the KV cache, and after its sequence's recompute.

``attention_reference`` (any device; the CPU path), per query and head: scores
``(q . k) * scale`` (the dot product a tree over D), ``m`` their maximum over visible keys,
``p = exp(s - m) / sum(exp(s - m))``, output ``sum_j p_j v_j`` (a tree over the keys), all in
float32, rounded once to ``q``'s dtype. The gradient is torch's attention formula's.

``paged_attention`` runs a whole step: sequences whose keys and values sit in pages
``[P, S, G, D]`` listed by a block table (the engine's KV cache; a training forward passes its
own K/V as pages of one token). ``paged_attention_reference`` loops over the sequences with
``attention_reference``; ``paged_attention_triton`` (CUDA) is one launch, a program per
(sequence, block of ``BLOCK_M`` queries, head), whose online softmax walks ``BLOCK_N``-key
tiles from key position 0 in increasing order. A tile beyond a query's position is all masked
for it: its scores are -inf, the running maximum stays, the rescale factor is ``exp(0) = 1``
and the tile adds exact zeros, so the number of tiles a program walks (set by its last query,
or the context) changes no query's bits. Tile sizes are constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from routing_kernels.batch_invariant import elementwise
from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = [
    "attention",
    "attention_reference",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_triton",
]

# Queries per program and keys per tile of the Triton kernel: constants, never chosen by shape.
_BLOCK_M = 16
_BLOCK_N = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of one block of [N, queries, C, D] products (64 MiB of float32).
_PRODUCTS_PER_BLOCK = 1 << 24


def _check(
    q_QND: torch.Tensor, k_CGD: torch.Tensor, v_CGD: torch.Tensor, scale: float, first: int
) -> None:
    for name, t in (("q", q_QND), ("k", k_CGD), ("v", v_CGD)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: expected a 3-D float16/bfloat16/float32 tensor, got {t.dtype} "
                f"{tuple(t.shape)}"
            )
    q, n, d = q_QND.shape
    c, g, _ = k_CGD.shape
    if k_CGD.shape[2] != d or v_CGD.shape != k_CGD.shape or g == 0 or n % g:
        raise ValueError(
            f"k, v: expected equal shapes [C, G, {d}] with G dividing {n} query heads, got "
            f"{tuple(k_CGD.shape)} and {tuple(v_CGD.shape)}"
        )
    if k_CGD.dtype != q_QND.dtype or v_CGD.dtype != q_QND.dtype:
        raise ValueError(
            f"k, v: expected dtype {q_QND.dtype} (q's), got {k_CGD.dtype} and {v_CGD.dtype}"
        )
    if k_CGD.device != q_QND.device or v_CGD.device != q_QND.device:
        raise ValueError(f"k, v: expected device {q_QND.device} (q's)")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= c - q:
        raise ValueError(
            f"first_position: expected an int in [0, {c - q}] (C - Q: every query's own key "
            f"is in the context), got {first!r}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite float > 0, got {scale}")


def attention_reference(
    q_QND: torch.Tensor,
    k_CGD: torch.Tensor,
    v_CGD: torch.Tensor,
    *,
    scale: float,
    first_position: int,
) -> torch.Tensor:
    """Causal attention [Q, N, D] in ``q``'s dtype by fixed-order reductions (module doc)."""
    _check(q_QND, k_CGD, v_CGD, scale, first_position)
    num_q, num_heads, head_dim = q_QND.shape
    context = k_CGD.shape[0]
    group = num_heads // k_CGD.shape[1]
    # Reduction axes lead each product tensor, so the trees' halvings are contiguous adds.
    q_DNQ = q_QND.float().permute(2, 1, 0)
    k_DNC = k_CGD.float().repeat_interleave(group, dim=1).permute(2, 1, 0)
    v_CND = v_CGD.float().repeat_interleave(group, dim=1)
    key_pos_C = torch.arange(context, device=q_QND.device)
    out_QND = q_QND.new_empty((num_q, num_heads, head_dim), dtype=torch.float32)
    padded = 1 << max(0, (context - 1).bit_length())
    rows = max(1, _PRODUCTS_PER_BLOCK // (num_heads * padded * head_dim))
    for start in range(0, num_q, rows):
        stop = min(num_q, start + rows)
        products_DNqC = q_DNQ[:, :, start:stop, None] * k_DNC[:, :, None, :]
        scores_NqC = tree_sum(products_DNqC, dim=0) * scale
        query_pos_q = first_position + torch.arange(start, stop, device=q_QND.device)
        visible_qC = key_pos_C[None, :] <= query_pos_q[:, None]
        scores_NqC = scores_NqC.masked_fill(~visible_qC, -math.inf)
        e_NqC = elementwise.exp(scores_NqC - scores_NqC.amax(dim=-1, keepdim=True))
        p_CNq = (e_NqC / tree_sum(e_NqC)[..., None]).permute(2, 0, 1)
        products_CqND = p_CNq.permute(0, 2, 1)[:, :, :, None] * v_CND[:, None, :, :]
        out_QND[start:stop] = tree_sum(products_CqND, dim=0)
    return out_QND.to(q_QND.dtype)


def _torch_attention(
    q_QND: torch.Tensor,
    k_CGD: torch.Tensor,
    v_CGD: torch.Tensor,
    *,
    scale: float,
    first_position: int,
) -> torch.Tensor:
    num_q, num_heads, _ = q_QND.shape
    context = k_CGD.shape[0]
    group = num_heads // k_CGD.shape[1]
    k_CND = k_CGD.float().repeat_interleave(group, dim=1)
    v_CND = v_CGD.float().repeat_interleave(group, dim=1)
    scores_NQC = torch.einsum("qnd,cnd->nqc", q_QND.float(), k_CND) * scale
    query_pos_Q = first_position + torch.arange(num_q, device=q_QND.device)
    visible_QC = torch.arange(context, device=q_QND.device)[None, :] <= query_pos_Q[:, None]
    probs_NQC = torch.softmax(scores_NQC.masked_fill(~visible_QC, -math.inf), dim=-1)
    return torch.einsum("nqc,cnd->qnd", probs_NQC, v_CND).to(q_QND.dtype)


def attention(
    q_QND: torch.Tensor,
    k_CGD: torch.Tensor,
    v_CGD: torch.Tensor,
    *,
    scale: float,
    first_position: int,
) -> torch.Tensor:
    """Batch-invariant causal attention of one sequence's queries (module docstring);
    differentiable with respect to q, k and v.

    Args:
        q_QND: the queries, at positions ``first_position .. first_position + Q - 1``.
        k_CGD, v_CGD: the sequence's keys and values at positions ``0 .. C - 1``.
        scale: the softmax scale.
        first_position: the position of the first query, in ``[0, C - Q]``.

    Raises:
        TypeError, ValueError: a non-tensor, a bad dtype, shape, device, scale or position.
    """
    _check(q_QND, k_CGD, v_CGD, scale, first_position)
    kwargs = {"scale": scale, "first_position": first_position}
    return with_reference_backward(
        lambda q, k, v: attention_reference(q, k, v, **kwargs),
        lambda q, k, v: _torch_attention(q, k, v, **kwargs),
        q_QND,
        k_CGD,
        v_CGD,
    )


# ---------------------------------------------------------------------- a whole step, paged


def _check_paged(
    q_TND: torch.Tensor,
    k_PSGD: torch.Tensor,
    v_PSGD: torch.Tensor,
    query_start_B1: torch.Tensor,
    seq_lens_B: torch.Tensor,
    block_tables_BM: torch.Tensor,
) -> None:
    if q_TND.dim() != 3 or k_PSGD.dim() != 4 or v_PSGD.shape != k_PSGD.shape:
        raise ValueError(
            f"q, k_pages, v_pages: expected [T, N, D] and two equal [P, S, G, D], got "
            f"{tuple(q_TND.shape)}, {tuple(k_PSGD.shape)} and {tuple(v_PSGD.shape)}"
        )
    if k_PSGD.shape[3] != q_TND.shape[2] or q_TND.shape[1] % k_PSGD.shape[2]:
        raise ValueError(
            f"k_pages: expected [P, S, G, {q_TND.shape[2]}] with G dividing {q_TND.shape[1]}, "
            f"got {tuple(k_PSGD.shape)}"
        )
    batch = seq_lens_B.shape[0]
    if query_start_B1.shape != (batch + 1,) or block_tables_BM.dim() != 2:
        raise ValueError(
            f"query_start, block_tables: expected [{batch + 1}] and [{batch}, M], got "
            f"{tuple(query_start_B1.shape)} and {tuple(block_tables_BM.shape)}"
        )


def _per_sequence(
    attend: Callable[..., torch.Tensor],
    q_TND: torch.Tensor,
    k_PSGD: torch.Tensor,
    v_PSGD: torch.Tensor,
    *,
    query_start_B1: torch.Tensor,
    seq_lens_B: torch.Tensor,
    block_tables_BM: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``attend(q, k, v, scale=, first_position=)`` of each sequence over its pages gathered
    in position order; zeros for a sequence of length 0."""
    page_size = k_PSGD.shape[1]
    starts, lens = query_start_B1.tolist(), seq_lens_B.tolist()
    pieces = []
    for b, context in enumerate(lens):
        q_QND = q_TND[starts[b] : starts[b + 1]]
        if context == 0:
            pieces.append(torch.zeros_like(q_QND))
            continue
        pages = block_tables_BM[b, : -(-context // page_size)].long()
        k_CGD = k_PSGD[pages].flatten(0, 1)[:context]
        v_CGD = v_PSGD[pages].flatten(0, 1)[:context]
        first = context - q_QND.shape[0]
        pieces.append(attend(q_QND, k_CGD, v_CGD, scale=scale, first_position=first))
    return torch.cat(pieces) if pieces else torch.zeros_like(q_TND)


def paged_attention_reference(
    q_TND: torch.Tensor,
    k_PSGD: torch.Tensor,
    v_PSGD: torch.Tensor,
    *,
    query_start_B1: torch.Tensor,
    seq_lens_B: torch.Tensor,
    block_tables_BM: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention [T, N, D] of a step (module docstring): sequence ``b``'s queries are tokens
    ``query_start[b]:query_start[b + 1]``, the last of its ``seq_lens[b]`` positions, whose keys
    and values are the pages ``block_tables[b]`` lists; a sequence of length 0 gets zeros."""
    _check_paged(q_TND, k_PSGD, v_PSGD, query_start_B1, seq_lens_B, block_tables_BM)
    return _per_sequence(
        attention_reference, q_TND, k_PSGD, v_PSGD,
        query_start_B1=query_start_B1, seq_lens_B=seq_lens_B, block_tables_BM=block_tables_BM,
        scale=scale,
    )  # fmt: skip


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    query_start_ptr,
    seq_lens_ptr,
    tables_ptr,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_table,
    page_size,
    scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if block * BLOCK_M < q_len:
        context = tl.load(seq_lens_ptr + b)
        rows_M = block * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_M = rows_M < q_len
        pos_M = context - q_len + rows_M
        dims_D = tl.arange(0, BLOCK_D)
        mask_D = dims_D < HEAD_DIM
        q_MD = tl.load(
            q_ptr + (q_start + rows_M)[:, None] * stride_qt + head * stride_qh + dims_D[None, :],
            mask=valid_M[:, None] & mask_D[None, :],
            other=0.0,
        )
        kv_head = head // GROUP
        m_M = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_M = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_MD = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # Keys up to the block's last query (or the context): tiles past a query are all
        # masked for it and leave its state exactly as it was.
        end = tl.minimum(context - q_len + tl.minimum((block + 1) * BLOCK_M, q_len), context)
        for n0 in range(0, end, BLOCK_N):
            keys_N = n0 + tl.arange(0, BLOCK_N)
            in_N = keys_N < context
            page_N = tl.load(
                tables_ptr + b * stride_table + keys_N // page_size, mask=in_N, other=0
            )
            slot_N = keys_N % page_size
            k_DN = tl.load(
                k_ptr + page_N[None, :] * stride_kp + slot_N[None, :] * stride_ks
                + kv_head * stride_kh + dims_D[:, None],
                mask=in_N[None, :] & mask_D[:, None],
                other=0.0,
            )  # fmt: skip
            s_MN = tl.dot(q_MD, k_DN, input_precision="ieee") * scale
            visible_MN = (keys_N[None, :] <= pos_M[:, None]) & in_N[None, :]
            s_MN = tl.where(visible_MN, s_MN, float("-inf"))
            m_new_M = tl.maximum(m_M, tl.max(s_MN, axis=1))
            # Key 0 is visible to every query, so after the first tile m is finite.
            alpha_M = tl.exp(m_M - m_new_M)
            p_MN = tl.exp(s_MN - m_new_M[:, None])
            l_M = l_M * alpha_M + tl.sum(p_MN, axis=1)
            v_ND = tl.load(
                v_ptr + page_N[:, None] * stride_vp + slot_N[:, None] * stride_vs
                + kv_head * stride_vh + dims_D[None, :],
                mask=in_N[:, None] & mask_D[None, :],
                other=0.0,
            )  # fmt: skip
            acc_MD = acc_MD * alpha_M[:, None] + tl.dot(
                p_MN.to(v_ND.dtype), v_ND, input_precision="ieee"
            )
            m_M = m_new_M
        out_MD = tl.where(l_M[:, None] > 0, acc_MD / l_M[:, None], 0.0)
        tl.store(
            out_ptr + (q_start + rows_M)[:, None] * stride_ot + head * stride_oh + dims_D[None, :],
            out_MD.to(out_ptr.dtype.element_ty),
            mask=valid_M[:, None] & mask_D[None, :],
        )


def paged_attention_triton(
    q_TND: torch.Tensor,
    k_PSGD: torch.Tensor,
    v_PSGD: torch.Tensor,
    *,
    query_start_B1: torch.Tensor,
    seq_lens_B: torch.Tensor,
    block_tables_BM: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """``paged_attention`` as one Triton launch (CUDA, or CPU under ``TRITON_INTERPRET=1``);
    ``max_query_len`` (the most queries of a sequence) sizes the grid, read from
    ``query_start_B1`` when not given (one host synchronisation)."""
    _check_paged(q_TND, k_PSGD, v_PSGD, query_start_B1, seq_lens_B, block_tables_BM)
    num_tokens, num_heads, head_dim = q_TND.shape
    for name, t in (("k_pages", k_PSGD), ("v_pages", v_PSGD), ("q", q_TND)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit stride on the head dim, got {t.stride()}")
    out_TND = torch.empty_like(q_TND)
    batch = seq_lens_B.shape[0]
    if max_query_len is None:
        max_query_len = int((query_start_B1[1:] - query_start_B1[:-1]).max()) if batch else 0
    if num_tokens and batch and max_query_len:
        grid = (batch, triton.cdiv(max_query_len, _BLOCK_M), num_heads)
        tables = (
            block_tables_BM if block_tables_BM.shape[1] else block_tables_BM.new_zeros(batch, 1)
        )
        _paged_attention_kernel[grid](
            q_TND, k_PSGD, v_PSGD, out_TND,
            query_start_B1.to(torch.int32), seq_lens_B.to(torch.int32), tables.to(torch.int32),
            q_TND.stride(0), q_TND.stride(1),
            k_PSGD.stride(0), k_PSGD.stride(1), k_PSGD.stride(2),
            v_PSGD.stride(0), v_PSGD.stride(1), v_PSGD.stride(2),
            out_TND.stride(0), out_TND.stride(1),
            tables.stride(0), k_PSGD.shape[1], float(scale),
            GROUP=num_heads // k_PSGD.shape[2], HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, num_warps=4,
        )  # fmt: skip
    return out_TND


def paged_attention(
    q_TND: torch.Tensor,
    k_PSGD: torch.Tensor,
    v_PSGD: torch.Tensor,
    *,
    query_start_B1: torch.Tensor,
    seq_lens_B: torch.Tensor,
    block_tables_BM: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Batch-invariant causal attention of a step's sequences over paged keys and values
    (``paged_attention_reference``'s semantics); the Triton kernel on CUDA. Differentiable
    with respect to q and the pages (torch's formula, sequence by sequence).

    Raises:
        ValueError: inconsistent shapes, naming the argument.
    """
    _check_paged(q_TND, k_PSGD, v_PSGD, query_start_B1, seq_lens_B, block_tables_BM)
    index = {
        "query_start_B1": query_start_B1,
        "seq_lens_B": seq_lens_B,
        "block_tables_BM": block_tables_BM,
    }

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda:
            return paged_attention_triton(
                q, k, v, scale=scale, max_query_len=max_query_len, **index
            )
        return paged_attention_reference(q, k, v, scale=scale, **index)

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _per_sequence(_torch_attention, q, k, v, scale=scale, **index)

    return with_reference_backward(forward, reference, q_TND, k_PSGD, v_PSGD)
