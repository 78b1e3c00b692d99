"""Batch-invariant routed experts: a token's output depends on the token, its ids and weights.

Legend: T tokens, H hidden size, L experts held, I expert intermediate size, K experts per
token (slots, best first as ``route`` lists them).

Weights in HF transformers v5's fused layout (``gate_up_proj`` [L, 2I, H], gate rows then up
rows; ``down_proj`` [L, H, I]). The (token, slot) pairs are grouped by expert, and each expert
computes ``down(silu(gate(x)) * up(x))`` with the batch-invariant ``linear`` and ``silu``, so a
pair's output does not depend on which other tokens chose that expert. The weighted outputs
``y * weight`` (float32) are then added slot after slot, 0 to K - 1: one fixed order for every
token, whichever experts it chose. The sum is rounded once to the activations' dtype.

With ``masked``, an id of ``MASKED_ID`` (-1) marks a pair whose expert another rank holds: it
contributes an exact zero. Differentiable with respect to the activations, both expert weights
and the gate weights (torch's formula: ``fused_experts_reference``).

On CUDA the experts are ``fused_experts_triton(..., invariant=True)``: the grouped-GEMM kernels
with one tile shape for every token count (a pair's output does not depend on the pairs
sharing its expert's blocks) and the slots added in slot order; no host synchronisation.
"""

from __future__ import annotations

import torch

from routing_kernels.batch_invariant import elementwise
from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.matmul import linear
from routing_kernels.fused_moe import MASKED_ID, fused_experts_reference, fused_experts_triton

__all__ = ["MASKED_ID", "experts", "experts_reference"]


def experts(
    hidden_TH: torch.Tensor,
    gate_up_proj_LFH: torch.Tensor,
    down_proj_LHI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    *,
    masked: bool = False,
) -> torch.Tensor:
    """The routed experts' weighted sum per token, [T, H] in ``hidden_TH``'s dtype, batch-invariant
    (module docstring); the fused Triton kernels on CUDA, ``experts_reference`` elsewhere.

    Raises:
        ValueError: inconsistent shapes, or (reference) ids outside ``[0, L)`` (``[-1, L)``
            when ``masked``), naming the argument.
    """
    if hidden_TH.is_cuda:

        def forward(x, gate_up, down, weights):
            return fused_experts_triton(
                x, gate_up.to(x.dtype), down.to(x.dtype), weights, ids_TK,
                masked=masked, invariant=True,
            )  # fmt: skip

    else:

        def forward(x, gate_up, down, weights):
            return experts_reference(x, gate_up, down, weights, ids_TK, masked=masked)

    def reference(x, gate_up, down, weights):
        return fused_experts_reference(
            x, gate_up.to(x.dtype), down.to(x.dtype), weights, ids_TK, masked=masked
        )

    return with_reference_backward(
        forward, reference, hidden_TH, gate_up_proj_LFH, down_proj_LHI, weights_TK
    )


def experts_reference(
    hidden_TH: torch.Tensor,
    gate_up_proj_LFH: torch.Tensor,
    down_proj_LHI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
    *,
    masked: bool = False,
) -> torch.Tensor:
    """``experts`` by the portable ops (any device; the CPU path and the kernels' reference).

    Raises:
        ValueError: inconsistent shapes, or ids outside ``[0, L)`` (``[-1, L)`` when
            ``masked``), naming the argument.
    """
    num_tokens, hidden = hidden_TH.shape
    held = gate_up_proj_LFH.shape[0]
    size = down_proj_LHI.shape[2]
    if gate_up_proj_LFH.shape != (held, 2 * size, hidden) or down_proj_LHI.shape != (
        held,
        hidden,
        size,
    ):
        raise ValueError(
            f"gate_up_proj, down_proj: expected [L, 2I, {hidden}] and [L, {hidden}, I], got "
            f"{tuple(gate_up_proj_LFH.shape)} and {tuple(down_proj_LHI.shape)}"
        )
    if ids_TK.dim() != 2 or ids_TK.shape[0] != num_tokens or weights_TK.shape != ids_TK.shape:
        raise ValueError(
            f"weights, ids: expected equal shapes [{num_tokens}, K], got "
            f"{tuple(weights_TK.shape)} and {tuple(ids_TK.shape)}"
        )
    ids_TK = ids_TK.long()
    top_k = ids_TK.shape[1]
    experts_used = torch.unique(ids_TK).tolist()
    lowest = MASKED_ID if masked else 0
    if experts_used and (experts_used[0] < lowest or experts_used[-1] >= held):
        raise ValueError(
            f"ids: expected values in [{lowest}, {held}), got min {experts_used[0]} and max "
            f"{experts_used[-1]}"
        )
    out_TKH = hidden_TH.new_zeros((num_tokens, top_k, hidden), dtype=torch.float32)
    for expert in experts_used:
        if expert == MASKED_ID:
            continue
        token_P, slot_P = torch.where(ids_TK == expert)
        gate_up_PF = linear(hidden_TH[token_P], gate_up_proj_LFH[expert])
        act_PI = elementwise.silu(gate_up_PF[:, :size]) * gate_up_PF[:, size:]
        down_PH = linear(act_PI, down_proj_LHI[expert])
        weighted_PH = down_PH.float() * weights_TK[token_P, slot_P, None].float()
        out_TKH = out_TKH.index_put((token_P, slot_P), weighted_PH)
    out_TH = out_TKH[:, 0]
    for slot in range(1, top_k):
        out_TH = out_TH + out_TKH[:, slot]
    return out_TH.to(hidden_TH.dtype)
