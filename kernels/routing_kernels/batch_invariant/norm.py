"""Batch-invariant RMSNorm with HF transformers' formula, reduced in a fixed order.

Legend: T rows (tokens), H normalised size.

``weight * (x32 * rsqrt(mean(x32 ** 2) + eps)).to(dtype)`` with ``x32 = x.float()``, as HF
computes it, except that the mean is ``rows.tree_sum`` of the squares divided by H and the
reciprocal square root is ``1 / sqrt`` (both exactly rounded), so a row's result depends on the
row alone: ``rms_norm_reference`` (any device; the CPU path). The gradient is torch's.
"""

from __future__ import annotations

import torch

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import tree_sum

__all__ = ["rms_norm", "rms_norm_reference"]

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
    return with_reference_backward(
        lambda x, w: rms_norm_reference(x, w, eps),
        lambda x, w: _torch_rms_norm(x, w, eps),
        x_TH,
        weight_H,
    )
