"""A grouped-GEMM forward for HF transformers experts modules: the fast training path.

HF's eager experts loop over experts in Python with a boolean mask per expert. Here the
(token, slot) pairs are sorted by expert once and each projection is one grouped GEMM over the
sorted rows: ``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` on CUDA bfloat16 where
the running torch and GPU support it (checked at call time), else a loop over the experts'
contiguous row ranges (any device and dtype, the correct fallback). The experts' math is HF's:
``down(act(gate(x)) * up(x)) * weight``, summed over the k slots of each token.

Legend: T tokens, H hidden size, I expert intermediate size, E experts, K top_k,
S = T * K (token, slot) pairs, sorted by expert.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from replay.discovery import find_moe_layers

__all__ = ["Backend", "grouped_experts_forward", "use_grouped_experts"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "grouped_mm", "loop"]
_BACKENDS = ("auto", "grouped_mm", "loop")


def use_grouped_experts(model: nn.Module, *, backend: Backend = "auto") -> list[str]:
    """Give every experts module of ``model``'s MoE layers the grouped forward (per instance).

    Args:
        model: an HF transformers (>= 5) MoE model (the structure ``replay.patch`` accepts).
        backend: "auto" (grouped GEMM on CUDA bfloat16 where supported, else the loop),
            "grouped_mm" (always the grouped GEMM kernel; raises where torch has none) or
            "loop".

    Returns:
        The qualified names of the experts modules swapped.

    Raises:
        ValueError: an experts module whose weights are not HF's fused layout (``gate_up_proj``
            [E, 2I, H] gate then up, ``down_proj`` [E, H, I], no bias), naming the module.
    """
    _check_backend(backend)
    names = []
    for layer in find_moe_layers(model):
        name = f"{layer.name}.experts"
        _check_experts(layer.experts, name)
        layer.experts.forward = _GroupedForward(layer.experts, backend)
        names.append(name)
    logger.debug("grouped experts (%s) for %s", backend, names)
    return names


def grouped_experts_forward(
    experts: nn.Module,
    hidden_TH: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """HF experts' forward ``experts(hidden, top_k_index, top_k_weights)`` by grouped GEMMs.

    Returns ``[T, H]`` in ``hidden_TH``'s dtype; differentiable with respect to the hidden
    states, both expert weights and the gate weights.
    """
    _check_backend(backend)
    gate_up_E2IH, down_EHI = experts.gate_up_proj, experts.down_proj
    num_tokens, top_k = ids_TK.shape
    num_experts = gate_up_E2IH.shape[0]
    flat_ids_S = ids_TK.reshape(-1)
    order_S = torch.argsort(flat_ids_S, stable=True)
    x_SH = hidden_TH[order_S // top_k]
    # End offset of each expert's rows: how many sorted ids are <= e. Not bincount, which reads
    # the ids' min and max back to the host on CUDA (two synchronizations per layer).
    experts_E = torch.arange(
        num_experts, device=flat_ids_S.device, dtype=flat_ids_S.dtype
    )
    ends_E = torch.searchsorted(flat_ids_S[order_S], experts_E, right=True)

    if _use_grouped_mm(backend, x_SH, gate_up_E2IH, down_EHI):
        offsets_E = ends_E.to(torch.int32)
        gate_up_S2I = _grouped_linear(x_SH, gate_up_E2IH, offsets_E)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        out_SH = _grouped_linear(experts.act_fn(gate_SI) * up_SI, down_EHI, offsets_E)
    else:
        # One host sync: the fallback loops on the host anyway.
        counts = torch.diff(ends_E, prepend=ends_E.new_zeros(1)).tolist()
        parts = []
        for expert, x_NH in enumerate(torch.split(x_SH, counts)):
            if counts[expert]:
                gate_NI, up_NI = F.linear(x_NH, gate_up_E2IH[expert]).chunk(2, dim=-1)
                parts.append(
                    F.linear(experts.act_fn(gate_NI) * up_NI, down_EHI[expert])
                )
        out_SH = torch.cat(parts) if parts else x_SH.new_zeros(0, down_EHI.shape[1])

    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    out_TKH = out_SH[inverse_S].view(num_tokens, top_k, down_EHI.shape[1])
    # Summing the k slots per token (not index_add_) is deterministic on CUDA.
    return (out_TKH * weights_TK[..., None]).sum(dim=1).to(hidden_TH.dtype)


class _GroupedForward:
    """Installed as ``experts.forward`` on one instance (a callable object, so deepcopy of the
    model carries it over to the copy's module)."""

    __slots__ = ("backend", "experts")

    def __init__(self, experts: nn.Module, backend: Backend) -> None:
        self.experts = experts
        self.backend = backend

    def __call__(
        self, hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        return grouped_experts_forward(
            self.experts, hidden_TH, ids_TK, weights_TK, backend=self.backend
        )


# ---------------------------------------------------------------------- grouped GEMM


def _grouped_mm_function() -> Any:
    """``torch.nn.functional.grouped_mm`` (torch >= 2.10), else ``torch._grouped_mm``, or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _use_grouped_mm(
    backend: Backend,
    x_SH: torch.Tensor,
    gate_up_E2IH: torch.Tensor,
    down_EHI: torch.Tensor,
) -> bool:
    if backend == "loop":
        return False
    if backend == "grouped_mm":
        if _grouped_mm_function() is None:
            raise ValueError(
                f"backend: expected a torch with grouped_mm for 'grouped_mm', got torch "
                f"{torch.__version__} without one"
            )
        return True
    dims = (gate_up_E2IH.shape[-1], down_EHI.shape[-1])
    return (
        x_SH.is_cuda
        and _grouped_mm_function() is not None
        and x_SH.dtype == gate_up_E2IH.dtype == down_EHI.dtype == torch.bfloat16
        # The kernel needs 16-byte aligned rows: H and I multiples of 8 bfloat16 values.
        and all(d % 8 == 0 for d in dims)
        and torch.cuda.get_device_capability(x_SH.device) >= _min_capability()
    )


def _min_capability() -> tuple[int, int]:
    """torch >= 2.9 runs grouped GEMMs on SM80+, older releases on Hopper only."""
    return (8, 0) if torch.__version__ >= "2.9" else (9, 0)


def _grouped_linear(
    x_SD: torch.Tensor, weight_EOD: torch.Tensor, offsets_E: torch.Tensor
) -> torch.Tensor:
    """Rows ``[offsets[e-1], offsets[e])`` of ``x_SD`` times ``weight_EOD[e].T`` -> ``[S, O]``."""
    out_SO = _grouped_mm_function()(x_SD, weight_EOD.transpose(1, 2), offs=offsets_E)
    return _ContiguousGrad.apply(out_SO)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the grouped-GEMM backward
    rejects expanded gradients (e.g. the stride-0 gradient of a ``.sum()``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


# ---------------------------------------------------------------------- validation


def _check_backend(backend: object) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")


def _check_experts(experts: nn.Module, name: str) -> None:
    label = f"{name} ({type(experts).__name__})"
    gate_up, down = (
        getattr(experts, "gate_up_proj", None),
        getattr(experts, "down_proj", None),
    )
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        raise ValueError(
            f"{label}: expected 3-D `gate_up_proj` and `down_proj` weights (HF fused experts), "
            f"got {type(gate_up).__name__} and {type(down).__name__}"
        )
    num_experts, hidden = gate_up.shape[0], gate_up.shape[-1]
    if (
        gate_up.ndim != 3
        or down.ndim != 3
        or gate_up.shape[1] != 2 * down.shape[2]
        or (tuple(down.shape[:2]) != (num_experts, hidden))
    ):
        raise ValueError(
            f"{label}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
            f"{tuple(gate_up.shape)} and {tuple(down.shape)}"
        )
    layout = {
        "has_bias": (getattr(experts, "has_bias", False), False),
        "has_gate": (getattr(experts, "has_gate", True), True),
        "is_transposed": (getattr(experts, "is_transposed", False), False),
        "is_concatenated": (getattr(experts, "is_concatenated", True), True),
        "has_post_expert_norm": (
            getattr(experts, "has_post_expert_norm", False),
            False,
        ),
        "_is_expert_parallel": (getattr(experts, "_is_expert_parallel", False), False),
    }
    for field, (actual, expected) in layout.items():
        if bool(actual) is not expected:
            raise ValueError(f"{label}: expected {field}={expected}, got {actual!r}")
    if not callable(getattr(experts, "act_fn", None)):
        raise ValueError(f"{label}: expected an `act_fn` activation, got none")
