"""Batch-invariant ``linear``: row ``m`` of ``x @ w.T`` depends on row ``m`` of ``x`` only.

Legend: M rows (tokens), N output features, K input features (the reduction).

A BLAS GEMM picks its blocking, its kernel (GEMV for one row, GEMM for many) and its split of
the K reduction by the matrix shape, so the bits of a token's output change with the number of
tokens beside it. Here every output element is reduced over K in one fixed order that depends
on K alone:

- ``linear_reference`` (any device; the CPU path): the K products of an output element, formed
  in float32 (exact for bfloat16 / float16 inputs), summed by ``rows.tree_sum``; rows and
  columns are processed in blocks that bound the memory of the ``[rows, cols, K]`` products.
- ``linear_triton`` (CUDA): a persistent Triton GEMM whose tiles depend on the dtype only
  (``matmul_tiles``), never on M, N or K, and that never splits K: every output element is
  accumulated over K in ``block_k`` steps in increasing order by one program, whatever the
  matrix shape and whichever tile it falls in. fp32 inputs are multiplied in IEEE fp32 (not
  TF32).

Both accumulate in float32, add the bias in float32 and round once to ``x``'s dtype. Weights
of another dtype (float32 master weights of a bfloat16 forward) are rounded to ``x``'s dtype
first, as the engine holding them in that dtype computes. The gradient is torch's
(``F.linear``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = ["MatmulTiles", "linear", "linear_reference", "linear_triton", "matmul_tiles"]

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


@dataclasses.dataclass(frozen=True, slots=True)
class MatmulTiles:
    """``linear_triton``'s tiles: ``block_m`` x ``block_n`` outputs per tile, ``block_k`` per
    reduction step, ``group_m`` row tiles swept per column tile (L2 reuse of weights)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# One tile shape per dtype, whatever the matrix: the per-element reduction order is fixed.
_TILES = {
    torch.bfloat16: MatmulTiles(block_m=64, block_n=128, block_k=64),
    torch.float16: MatmulTiles(block_m=64, block_n=128, block_k=64),
    torch.float32: MatmulTiles(block_m=32, block_n=64, block_k=32),
}


def matmul_tiles(dtype: torch.dtype) -> MatmulTiles:
    """The tiles ``linear_triton`` uses for activations of ``dtype`` (independent of shapes)."""
    return _TILES[dtype]


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    num_programs,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Persistent GEMM: program ``pid`` computes tiles ``pid, pid + num_programs, ...``; each
    tile's outputs are reduced over K in BLOCK_K steps, in order, into an fp32 accumulator."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_programs):
        first_m = (tile // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_size
        pid_n = (tile % per_group) // group_size
        rows_M = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc_MN = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks_K = k0 + tl.arange(0, BLOCK_K)
            x_MK = tl.load(
                x_ptr + rows_M[:, None] * stride_xm + ks_K[None, :] * stride_xk,
                mask=(rows_M[:, None] < M) & (ks_K[None, :] < K),
                other=0.0,
            )
            w_KN = tl.load(
                w_ptr + cols_N[None, :] * stride_wn + ks_K[:, None] * stride_wk,
                mask=(cols_N[None, :] < N) & (ks_K[:, None] < K),
                other=0.0,
            )
            acc_MN = tl.dot(x_MK, w_KN, acc_MN, input_precision="ieee")
        if HAS_BIAS:
            bias_N = tl.load(bias_ptr + cols_N, mask=cols_N < N, other=0.0)
            acc_MN += bias_N.to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows_M[:, None] * stride_om + cols_N[None, :] * stride_on,
            acc_MN.to(out_ptr.dtype.element_ty),
            mask=(rows_M[:, None] < M) & (cols_N[None, :] < N),
        )


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on CPU


def linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear`` as one persistent Triton GEMM (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x, weight, bias)
    weight, bias = _weights_as(x, weight), _weights_as(x, bias)
    k, n = x.shape[-1], weight.shape[0]
    x_MK = x.reshape(-1, k)
    m = x_MK.shape[0]
    out_MN = x.new_empty((m, n))
    if m and n:
        tiles = matmul_tiles(x.dtype)
        num_tiles = triton.cdiv(m, tiles.block_m) * triton.cdiv(n, tiles.block_n)
        programs = max(1, min(num_tiles, _num_programs(x.device)))
        _linear_kernel[(programs,)](
            x_MK,
            weight,
            bias if bias is not None else out_MN,
            out_MN,
            m,
            n,
            k,
            x_MK.stride(0),
            x_MK.stride(1),
            weight.stride(0),
            weight.stride(1),
            out_MN.stride(0),
            out_MN.stride(1),
            programs,
            HAS_BIAS=bias is not None,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            GROUP_M=tiles.group_m,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
    return out_MN.reshape(*x.shape[:-1], n)


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant ``F.linear(x, weight, bias)`` (module docstring); differentiable.

    Args:
        x: [..., K] float16 / bfloat16 / float32.
        weight: [N, K], any float dtype (rounded to ``x``'s).
        bias: [N] or None.

    Raises:
        TypeError, ValueError: a non-tensor, a bad dtype, shape or device, naming the argument.
    """
    _check(x, weight, bias)
    forward = linear_triton if x.is_cuda else linear_reference
    return with_reference_backward(forward, _torch_linear, x, weight, bias)
