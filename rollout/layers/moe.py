"""The sparse MoE block: router -> ``kernels.route`` (ids captured in-kernel) -> fused experts,
plus optional shared experts, overlapped on a side CUDA stream when that is right and useful.

Legend: T tokens, H hidden size, E experts, K top-k, I expert intermediate size.

Expert weights use HF transformers v5's fused layout: ``gate_up_proj`` [E, 2I, H] (gate rows
then up rows) and ``down_proj`` [E, H, I]. The routing semantics are those of
``kernels.RoutingMethod`` (DESIGN.md); each family maps its HF router onto one method.

Shared-expert overlap: the shared experts read the same input as the routed experts and their
outputs are summed, so they can run concurrently on a side stream (fork/join with CUDA events:
capturable in CUDA graphs; the same kernels on the same data, so the result is identical).
``shared_experts_overlap`` decides from the parallel configuration, as vLLM does after its
PR 39222: off on CPU; off with expert-placement load balancing (EPLB) under an all-to-all
backend other than allgather/reduce-scatter (a correctness hazard there); off with two-sided
all-to-all kernels (no gain: they already overlap communication); on otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused_moe import fused_experts
from kernels.route import route
from kernels.routing_method import RoutingMethod
from rollout.layers.linear import Linear
from rollout.layers.mlp import GatedMLP

__all__ = [
    "ALL2ALL_BACKENDS",
    "Experts",
    "MoEParallelConfig",
    "Router",
    "RoutingParams",
    "SparseMoeBlock",
    "shared_experts_overlap",
]

ALL2ALL_BACKENDS = (
    "allgather_reducescatter",
    "naive",
    "pplx",
    "deepep_high_throughput",
    "deepep_low_latency",
    "flashinfer_all2allv",
)


@dataclass(kw_only=True, slots=True, frozen=True)
class RoutingParams:
    """How a model's routers choose experts (the routing spec of the captured ids).

    Attributes:
        method: the ``kernels.RoutingMethod``.
        top_k: K experts per token.
        num_experts: E routed experts.
        n_group: expert groups for group-limited top-k (DEEPSEEK_V3), ``None`` for no grouping.
        topk_group: groups kept per token when grouped.
        routed_scaling_factor: DEEPSEEK_V3 weight scale (1.0 for every other method).
    """

    method: RoutingMethod
    top_k: int
    num_experts: int
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.method, RoutingMethod):
            raise TypeError(f"method: expected a RoutingMethod, got {type(self.method).__name__}")
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise ValueError(f"num_experts: expected a positive int, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k: expected an int in [1, {self.num_experts}], got {self.top_k!r}"
            )
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                "n_group, topk_group: expected both set or both None, "
                f"got {self.n_group}, {self.topk_group}"
            )
        if self.n_group is not None:
            if self.method is not RoutingMethod.DEEPSEEK_V3:
                raise ValueError(
                    f"n_group: expected None for method {self.method.name}, got {self.n_group}"
                )
            if self.n_group <= 0 or self.num_experts % self.n_group:
                raise ValueError(
                    f"n_group: expected a positive divisor of num_experts={self.num_experts}, "
                    f"got {self.n_group}"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(
                    f"topk_group: expected an int in [1, {self.n_group}], got {self.topk_group}"
                )
        scale = self.routed_scaling_factor
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"routed_scaling_factor: expected a finite positive float, got {scale}"
            )
        if self.method is not RoutingMethod.DEEPSEEK_V3 and scale != 1.0:
            raise ValueError(
                f"routed_scaling_factor: expected 1.0 for method {self.method.name}, got {scale}"
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEParallelConfig:
    """The parts of the expert-parallel configuration that decide shared-expert overlap.

    Attributes:
        enable_eplb: expert-placement load balancing (redundant / moved experts) is on.
        all2all_backend: the token dispatch/combine backend, one of ``ALL2ALL_BACKENDS``.
        use_two_sided_all2all_kernels: dispatch/combine through two-sided all-to-all kernels
            (FlashInfer's NVLink two-sided kernels), which overlap communication themselves.
    """

    enable_eplb: bool = False
    all2all_backend: str = "allgather_reducescatter"
    use_two_sided_all2all_kernels: bool = False

    def __post_init__(self) -> None:
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(
                f"all2all_backend: expected one of {ALL2ALL_BACKENDS}, got {self.all2all_backend!r}"
            )


def shared_experts_overlap(*, device: torch.device | str, parallel: MoEParallelConfig) -> bool:
    """Whether shared experts should run on a side stream, overlapped with the routed experts."""
    if torch.device(device).type != "cuda":
        return False
    if parallel.enable_eplb and parallel.all2all_backend != "allgather_reducescatter":
        return False
    return not parallel.use_two_sided_all2all_kernels


class Router(nn.Module):
    """Router logits ``x @ weight.T`` [T, E], optionally in float32 (GLM4-MoE's router is);
    holds DEEPSEEK_V3's ``e_score_correction_bias`` [E] (float32) when the family has one."""

    def __init__(
        self, hidden_size: int, num_experts: int, *, float32: bool, correction_bias: bool
    ) -> None:
        super().__init__()
        self.float32 = float32
        dtype = torch.float32 if float32 else None
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=dtype), requires_grad=False
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TH.float() if self.float32 else x_TH, self.weight)


class Experts(nn.Module):
    """Routed experts' weights (HF v5): ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )


class SparseMoeBlock(nn.Module):
    """Router, routed experts and optional shared experts of one MoE decoder layer.

    Args:
        hidden_size: H.
        intermediate_size: I of each routed expert.
        routing: the routing method and its parameters.
        moe_index: this layer's index among the MoE layers (its slot in the capture buffer).
        router_float32: compute router logits in float32 (weight kept in float32).
        shared_intermediate_size: I of the shared expert MLP (0: none).
        shared_name: the HF attribute name of the shared MLP (``shared_expert`` for Qwen2-MoE,
            ``shared_experts`` for GLM4-MoE), kept so parameter names match HF's.
        shared_gate: Qwen2-MoE's ``shared_expert_gate``: the shared output is scaled by
            ``sigmoid(x @ shared_expert_gate.T)``.
        overlap: run the shared experts on a side CUDA stream (``shared_experts_overlap``).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        routing: RoutingParams,
        moe_index: int,
        router_float32: bool = False,
        shared_intermediate_size: int = 0,
        shared_name: str = "shared_experts",
        shared_gate: bool = False,
        overlap: bool = False,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.moe_index = moe_index
        self.gate = Router(
            hidden_size,
            routing.num_experts,
            float32=router_float32,
            correction_bias=routing.method is RoutingMethod.DEEPSEEK_V3,
        )
        self.experts = Experts(routing.num_experts, hidden_size, intermediate_size)
        self._shared_name = shared_name if shared_intermediate_size else None
        if shared_intermediate_size:
            self.add_module(shared_name, GatedMLP(hidden_size, shared_intermediate_size))
        if shared_gate and not shared_intermediate_size:
            raise ValueError(
                "shared_gate: expected shared experts (shared_intermediate_size > 0), got none"
            )
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_gate else None
        self._overlap = overlap and shared_intermediate_size > 0
        # Set by the model (one side stream shared by its MoE layers); events made on first use.
        self.aux_stream: torch.cuda.Stream | None = None
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    @property
    def shared_experts_overlap(self) -> bool:
        """Whether the shared experts run on the side stream ``aux_stream``."""
        return self._overlap

    def _shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        out_TH = getattr(self, self._shared_name)(x_TH)
        if self.shared_expert_gate is not None:
            out_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * out_TH
        return out_TH

    def _routed(self, x_TH: torch.Tensor, capture_TK: torch.Tensor | None) -> torch.Tensor:
        routing = self.routing
        logits_TE = self.gate(x_TH)
        weights_TK, ids_TK = route(
            logits_TE,
            routing.top_k,
            routing.method,
            correction_bias=self.gate.e_score_correction_bias,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            routed_scaling_factor=routing.routed_scaling_factor,
            capture_out=capture_TK,
        )
        return fused_experts(
            x_TH, self.experts.gate_up_proj, self.experts.down_proj, weights_TK, ids_TK
        )

    def forward(self, x_TH: torch.Tensor, capture_TK: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output [T, H]; the top-k ids are also written to ``capture_TK`` when given."""
        if self._shared_name is None:
            return self._routed(x_TH, capture_TK)
        if not (self._overlap and x_TH.is_cuda):
            return self._routed(x_TH, capture_TK) + self._shared(x_TH)
        if self.aux_stream is None:
            raise ValueError(
                "aux_stream: shared-expert overlap is on but no side stream was attached"
            )
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event())
        fork, join = self._events
        main = torch.cuda.current_stream(x_TH.device)
        fork.record(main)
        with torch.cuda.stream(self.aux_stream):
            self.aux_stream.wait_event(fork)
            shared_TH = self._shared(x_TH)
            join.record(self.aux_stream)
        routed_TH = self._routed(x_TH, capture_TK)
        main.wait_event(join)
        return routed_TH + shared_TH
