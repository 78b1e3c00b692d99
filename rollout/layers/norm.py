"""RMSNorm with HF transformers' numerics, optionally fused with the residual add before it.

Legend: T tokens, H normalised size.

HF computes ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`` with ``x32 = x.float()``;
the same expression here, compiled into one kernel on CUDA (``cuda_compiled``). With a
residual, the decoder's ``x = x + delta`` is folded in: the layer passes ``(delta, residual)``
and gets back ``(norm(delta + residual), delta + residual)``, one kernel instead of two. The sum
is the same single add HF does, so the numerics do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.layers.compiled import cuda_compiled
from routing_kernels import batch_invariant

__all__ = ["RMSNorm", "add_rms_norm", "rms_norm"]


def rms_norm(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of ``x_TH`` over its last dim (eager)."""
    x32_TH = x_TH.float()
    x32_TH = x32_TH * torch.rsqrt(x32_TH.pow(2).mean(-1, keepdim=True) + eps)
    return weight_H * x32_TH.to(x_TH.dtype)


@cuda_compiled
def _rms_norm(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x_TH, weight_H, eps)


@cuda_compiled
def add_rms_norm(
    delta_TH: torch.Tensor, residual_TH: torch.Tensor, weight_H: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(delta + residual), delta + residual)``."""
    sum_TH = residual_TH + delta_TH
    return rms_norm(sum_TH, weight_H, eps), sum_TH


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; ``forward(x, residual)`` also adds the residual first.

    The weight is left uninitialised (``torch.empty``): it is always loaded or dummy-initialised.
    ``deterministic`` (set by ``MoECausalLM``): ``routing_kernels.batch_invariant.rms_norm``
    (the same formula, reduced in a fixed order), the add an eager one.
    """

    deterministic = False

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or ``(norm(x + residual), x + residual)`` when a residual is given."""
        if self.deterministic:
            if residual is None:
                return batch_invariant.rms_norm(x, self.weight, self.eps)
            sum_TH = residual + x
            return batch_invariant.rms_norm(sum_TH, self.weight, self.eps), sum_TH
        if residual is None:
            return _rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
