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
"""

from __future__ import annotations

import math

import torch

from routing_kernels.batch_invariant import elementwise
from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = ["attention", "attention_reference"]

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
    kwargs = dict(scale=scale, first_position=first_position)
    return with_reference_backward(
        lambda q, k, v: attention_reference(q, k, v, **kwargs),
        lambda q, k, v: _torch_attention(q, k, v, **kwargs),
        q_QND,
        k_CGD,
        v_CGD,
    )
