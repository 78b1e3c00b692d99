"""Batch-invariant ``linear``: row ``m`` of ``x @ w.T`` depends on row ``m`` of ``x`` only.

Legend: M rows (tokens), N output features, K input features (the reduction).

A BLAS GEMM picks its blocking, its kernel (GEMV for one row, GEMM for many) and its split of
the K reduction by the matrix shape, so the bits of a token's output change with the number of
tokens beside it. Here every output element is reduced over K in one fixed order that depends
on K alone:

- ``linear_reference`` (any device; the CPU path): the K products of an output element, formed
  in float32 (exact for bfloat16 / float16 inputs), summed by ``rows.tree_sum``; rows and
  columns are processed in blocks that bound the memory of the ``[rows, cols, K]`` products.
- ``linear_triton`` (CUDA): a persistent Triton GEMM whose tiles are chosen from N and K only,
  never from M, and that never splits K (``matmul_triton``).

Both accumulate in float32, add the bias in float32 and round once to ``x``'s dtype. Weights
of another dtype (float32 master weights of a bfloat16 forward) are rounded to ``x``'s dtype
first, as the engine holding them in that dtype computes. The gradient is torch's
(``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = ["linear", "linear_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements of one block of products [rows, cols, padded K] (64 MiB of float32).
_PRODUCTS_PER_BLOCK = 1 << 24


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", w), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected [N, {x.shape[-1] if x.dim() else '?'}] for x of shape "
            f"{tuple(x.shape)}, got {tuple(w.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias: expected shape ({w.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")


def _weights_as(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(x.dtype)


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` [..., N] in ``x``'s dtype, reduced by the fixed tree over K."""
    _check(x, weight, bias)
    weight, bias = _weights_as(x, weight), _weights_as(x, bias)
    k = x.shape[-1]
    n = weight.shape[0]
    x_KM = x.reshape(-1, k).float().T.contiguous()
    w_KN = weight.float().T.contiguous()
    padded = 1 << max(0, (k - 1).bit_length())
    if padded != k:  # exact zeros: the tree of the padded length is the fixed order
        x_KM = F.pad(x_KM, (0, 0, 0, padded - k))
        w_KN = F.pad(w_KN, (0, 0, 0, padded - k))
    m = x_KM.shape[1]
    out_MN = x_KM.new_empty((m, n))
    cols = max(1, min(n, _PRODUCTS_PER_BLOCK // padded))
    rows = max(1, _PRODUCTS_PER_BLOCK // (cols * padded))
    for r in range(0, m, rows):
        for c in range(0, n, cols):
            # [K, rows, cols], K leading: the tree's halvings are contiguous adds.
            products_KRC = x_KM[:, r : r + rows, None] * w_KN[:, None, c : c + cols]
            out_MN[r : r + rows, c : c + cols] = tree_sum(products_KRC, dim=0)
    if bias is not None:
        out_MN = out_MN + bias.float()
    return out_MN.to(x.dtype).reshape(*x.shape[:-1], n)


def _torch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch-invariant ``F.linear(x, weight, bias)`` (module docstring); differentiable.

    Args:
        x: [..., K] float16 / bfloat16 / float32.
        weight: [N, K], any float dtype (rounded to ``x``'s).
        bias: [N] or None.

    Raises:
        TypeError, ValueError: a non-tensor, a bad dtype, shape or device, naming the argument.
    """
    _check(x, weight, bias)
    return with_reference_backward(linear_reference, _torch_linear, x, weight, bias)
