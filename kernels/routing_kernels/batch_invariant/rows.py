"""Reductions along the last axis in one fixed order that depends only on the axis length.

``tree_sum`` zero-pads the axis to the next power of two and adds the upper half onto the lower
half until one element is left: a binary tree whose shape is fixed by the padded length, built
from elementwise additions (exactly rounded, so the layout, the number of rows, SIMD paths and
threads cannot change a bit). Appending exact zeros never changes the result: zeros beyond the
last nonzero element stay in the upper halves, which are added as exact zeros until the array
shrinks to the data's own power of two. That is what makes attention over a chunk whose later
keys are masked (zero probability) give the bits of attention over the visible keys only.

``softmax`` and ``logsumexp`` build on it with ``amax`` (exact in any order) and the portable
``exp`` / ``log`` of ``elementwise``. All run on any device (on CUDA they are the reference of
the Triton row kernels) and are differentiable: the backward is torch's own formula (``autograd``).
"""

from __future__ import annotations

import torch

from routing_kernels.batch_invariant import elementwise
from routing_kernels.batch_invariant.autograd import with_reference_backward

__all__ = ["logsumexp", "softmax", "tree_sum"]


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum of ``x`` along ``dim`` (removed) by the fixed pairwise tree (module docstring).

    The tree runs over the leading axis of a contiguous copy (each halving is then one
    contiguous add); a tensor already laid out with ``dim`` leading and contiguous is not
    copied. The layout never changes the result, only the speed.
    """
    x = x.movedim(dim, 0)
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(x.shape[1:])
    size = 1 << (n - 1).bit_length()
    if size != n:
        x = torch.cat((x, x.new_zeros((size - n, *x.shape[1:]))))
    x = x.contiguous()
    while size > 1:
        size //= 2
        x = x[:size] + x[size : 2 * size]
    return x[0]


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = elementwise.exp(x - x.amax(dim=-1, keepdim=True))
    return e / tree_sum(e)[..., None]


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    m = x.amax(dim=-1)
    # An all -inf row: exp(-inf - -inf) would be NaN; its sum is 0 and its logsumexp -inf.
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m + elementwise.log(tree_sum(elementwise.exp(x - m[..., None])))


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax along the last axis, in ``x``'s dtype; differentiable."""
    return with_reference_backward(_softmax, lambda t: torch.softmax(t, dim=-1), x)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(x)))`` along the last axis (removed), in ``x``'s dtype; differentiable."""
    return with_reference_backward(_logsumexp, lambda t: torch.logsumexp(t, dim=-1), x)
