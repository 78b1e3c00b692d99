"""Rotary position embedding (RoPE), NeoX "rotate half" style, optionally on a leading part of
each head (partial rotary).

Legend: T tokens, N heads, D head dim, R rotary dim (<= D).

Numerics follow HF transformers: angles ``position * inv_freq`` in float32, cos/sin cast to the
activations' dtype, then ``x * cos + rotate_half(x) * sin`` in that dtype. cos/sin are computed
per step from the positions (a [T, R] elementwise op shared by all layers), so no table bounds
the context length and the op is CUDA-graph safe. On CUDA the rotation is one compiled kernel
(``cuda_compiled``, with eager's rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rollout.layers.compiled import cuda_compiled
from routing_kernels import batch_invariant

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_theta_from_parameters", "rotate"]


def rope_theta_from_parameters(rope_parameters: Mapping[str, Any] | None) -> float:
    """``rope_theta`` of an HF ``config.rope_parameters`` of the default type.

    Raises:
        ValueError: the RoPE type is not ``default`` (scaled variants such as yarn, linear,
            dynamic, llama3 or longrope are not implemented), or ``rope_theta`` is missing.
    """
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"rope_parameters.rope_type: expected 'default' (the only RoPE type implemented), "
            f"got {rope_type!r}"
        )
    if "rope_theta" not in params:
        raise ValueError(f"rope_parameters.rope_theta: expected a number, got parameters {params}")
    return float(params["rope_theta"])


class RotaryEmbedding(nn.Module):
    """Default RoPE over the first ``rotary_dim`` channels of each head.

    Args:
        head_dim: D.
        rotary_dim: R, even and <= D (``int(D * partial_rotary_factor)`` for partial rotary).
        base: ``rope_theta``.

    ``deterministic`` (set by ``MoECausalLM``): cos and sin by ``batch_invariant``'s portable
    functions, whose value for an angle does not depend on the tensor it sits in.
    """

    deterministic = False

    def __init__(self, *, head_dim: int, rotary_dim: int, base: float) -> None:
        super().__init__()
        if rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(
                f"rotary_dim: expected an even value in (0, {head_dim}], got {rotary_dim}"
            )
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        # Computed on the host like HF does, so the frequencies match it bit for bit on any device.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim
        inv_freq = 1.0 / (base**exponents)
        self.inv_freq = nn.Buffer(inv_freq.to(torch.get_default_device()), persistent=False)

    def cos_sin(
        self, positions_T: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, R] in ``dtype`` for the int64 ``positions_T``."""
        freqs_TR2 = positions_T.float()[:, None] * self.inv_freq[None, :]
        emb_TR = torch.cat((freqs_TR2, freqs_TR2), dim=-1)
        if self.deterministic:
            return batch_invariant.cos(emb_TR).to(dtype), batch_invariant.sin(emb_TR).to(dtype)
        return emb_TR.cos().to(dtype), emb_TR.sin().to(dtype)


def rotate(x_TND: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """``x_TND`` with the first R channels of every head rotated (R = ``cos_TR.shape[-1]``),
    eager: each op rounds exactly, so an element's result depends on its inputs only."""
    rotary_dim = cos_TR.shape[-1]
    cos_T1R, sin_T1R = cos_TR[:, None, :], sin_TR[:, None, :]
    rot_TNR = x_TND[..., :rotary_dim]
    half = rotary_dim // 2
    rotated_TNR = torch.cat((-rot_TNR[..., half:], rot_TNR[..., :half]), dim=-1)
    out_TNR = rot_TNR * cos_T1R + rotated_TNR * sin_T1R
    if rotary_dim == x_TND.shape[-1]:
        return out_TNR
    return torch.cat((out_TNR, x_TND[..., rotary_dim:]), dim=-1)


# One compiled kernel on CUDA (the engine's fast path); eager on CPU.
apply_rotary = cuda_compiled(rotate)
