"""The dense SwiGLU MLP of a decoder layer (also the shared expert of an MoE layer).

Legend: T tokens, H hidden size, I intermediate size.

``gate_up_proj`` holds HF's ``gate_proj`` and ``up_proj`` stacked (one GEMM instead of two),
so ``down_proj(silu(gate) * up)`` runs as two GEMMs and one elementwise op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.layers.compiled import cuda_compiled
from rollout.layers.linear import Linear
from routing_kernels import batch_invariant

__all__ = ["GatedMLP", "silu_and_mul"]


@cuda_compiled
def silu_and_mul(gate_up_TF: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the stacked [T, 2I] projection (one kernel on CUDA)."""
    gate_TI, up_TI = gate_up_TF.chunk(2, dim=-1)
    return F.silu(gate_TI) * up_TI


class GatedMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with gate and up fused.

    ``deterministic`` (set by ``MoECausalLM``): the portable ``batch_invariant.silu``, eager.
    """

    deterministic = False

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, (intermediate_size, intermediate_size), shard_names=("gate", "up")
        )
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        gate_up_TF = self.gate_up_proj(x_TH)
        if self.deterministic:
            gate_TI, up_TI = gate_up_TF.chunk(2, dim=-1)
            return self.down_proj(batch_invariant.silu(gate_TI) * up_TI)
        return self.down_proj(silu_and_mul(gate_up_TF))
