"""Batch-invariant RMSNorm with HF transformers' formula, reduced in a fixed order.

Legend: T rows (tokens), H normalised size.

``weight * (x32 * rsqrt(mean(x32 ** 2) + eps)).to(dtype)`` with ``x32 = x.float()``, as HF
computes it, except that the mean is ``rows.tree_sum`` of the squares divided by H and the
reciprocal square root is ``1 / sqrt`` (both exactly rounded), so a row's result depends on the
row alone: ``rms_norm_reference`` (any device; the CPU path). ``rms_norm_triton`` (CUDA): one
program per row holding the whole row, its sum of squares reduced by one ``tl.sum`` whose
shape depends on H only. The gradient is torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_triton"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"weight: expected shape ({x.shape[-1] if x.dim() else '?'},) for x of shape "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (x's), got {weight.device}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps}")


def rms_norm_reference(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x_TH`` over its last axis, in ``x_TH``'s dtype (module docstring)."""
    _check(x_TH, weight_H, eps)
    x32_TH = x_TH.float()
    mean_T = tree_sum(x32_TH * x32_TH) / x_TH.shape[-1]
    inv_T = 1.0 / torch.sqrt(mean_T + eps)
    return weight_H.to(x_TH.dtype) * (x32_TH * inv_T[..., None]).to(x_TH.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_out, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols_H = tl.arange(0, BLOCK_H)
    mask_H = cols_H < H
    x_H = tl.load(x_ptr + row * stride_x + cols_H, mask=mask_H, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x_H * x_H, axis=0) / H + eps)
    dtype = out_ptr.dtype.element_ty
    w_H = tl.load(w_ptr + cols_H, mask=mask_H, other=0.0).to(dtype)
    tl.store(out_ptr + row * stride_out + cols_H, w_H * (x_H * inv).to(dtype), mask=mask_H)


def rms_norm_triton(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` as one Triton program per row (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    _check(x_TH, weight_H, eps)
    hidden = x_TH.shape[-1]
    x_RH = x_TH.reshape(-1, hidden)
    if x_RH.stride(-1) != 1:
        x_RH = x_RH.contiguous()
    weight_H = weight_H.to(x_TH.dtype).contiguous()
    out_RH = torch.empty_like(x_RH)
    if x_RH.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x_RH.shape[0],)](
            x_RH, weight_H, out_RH, hidden, x_RH.stride(0), out_RH.stride(0), float(eps),
            BLOCK_H=block, num_warps=max(1, min(16, block // 256)),
        )  # fmt: skip
    return out_RH.reshape(x_TH.shape)


def _torch_rms_norm(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    x32_TH = x_TH.float()
    x32_TH = x32_TH * torch.rsqrt(x32_TH.pow(2).mean(-1, keepdim=True) + eps)
    return weight_H.to(x_TH.dtype) * x32_TH.to(x_TH.dtype)


def rms_norm(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch-invariant RMSNorm (module docstring); differentiable.

    Raises:
        TypeError, ValueError: a non-tensor, a bad dtype, shape, device or eps, naming it.
    """
    _check(x_TH, weight_H, eps)
    forward = rms_norm_triton if x_TH.is_cuda else rms_norm_reference
    return with_reference_backward(
        lambda x, w: forward(x, w, eps),
        lambda x, w: _torch_rms_norm(x, w, eps),
        x_TH,
        weight_H,
    )
