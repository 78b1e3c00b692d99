"""The sparse MoE block: router -> ``routing_kernels.route`` (ids captured in-kernel) -> fused
experts, plus optional shared experts, overlapped on a side CUDA stream when that is right and
useful. The block is single-device; the engine applies expert parallelism from outside
(``rollout.engine.expert_parallel``: the experts a block holds, its ``dispatch``).

Legend: T tokens (of this rank), H hidden size, E experts, L experts held by this rank (E
without expert parallelism), K top-k, I expert intermediate size, X tokens routed under a
dispatch (all ranks').

Expert weights use HF transformers v5's fused layout: ``gate_up_proj`` [L, 2I, H] (gate rows
then up rows) and ``down_proj`` [L, H, I], for a contiguous range of the E experts (all of
them unless expert parallelism splits them). The routing semantics are those of
``routing_kernels.RoutingMethod`` (DESIGN.md); each family maps its HF router onto one method.

Routed-expert capture: a block given the step's ``RoutedExpertsCapturer`` writes its ids through
the capturer's API, its layer view as the routing kernel's ``capture_out``, or ``capture`` with
the dispatch's ``DPMetadata`` (``rollout.capture`` tells the story).

Shared-expert overlap: the shared experts read the same input as the routed experts and their
outputs are summed, so they can run concurrently on a side stream (fork/join with CUDA events:
capturable in CUDA graphs; the same kernels on the same data, so the result is identical).
``shared_experts_overlap`` decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rollout.layers.linear import Linear
from rollout.layers.mlp import GatedMLP
from routing_kernels import batch_invariant
from routing_kernels.fused_moe import fused_experts, fused_experts_reference
from routing_kernels.replay_weights import replay_topk
from routing_kernels.route import route
from routing_kernels.routing_method import RoutingMethod

if TYPE_CHECKING:
    from rollout.capture import RoutedExpertsCapturer
    from rollout.engine.expert_parallel import NaiveDispatch

__all__ = [
    "Experts",
    "Router",
    "RoutingParams",
    "SparseMoeBlock",
    "shared_experts_overlap",
]


@dataclass(kw_only=True, slots=True, frozen=True)
class RoutingParams:
    """How a model's routers choose experts (the routing spec of the captured ids).

    Attributes:
        method: the ``routing_kernels.RoutingMethod``.
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


def shared_experts_overlap(*, device: torch.device | str, deterministic: bool) -> bool:
    """Whether a model on ``device`` runs its shared experts on a side stream, overlapped with
    the routed experts: on CUDA unless ``deterministic`` (whose shared experts are added after
    the routed ones on the main stream, in a fixed order).

    vLLM (after its PR 39222) also turns overlap off under expert-placement load balancing with
    an all-to-all backend other than all-gather/reduce-scatter, and under two-sided all-to-all
    kernels. Neither exists here: ``data_parallel_mode="dp_attention"`` exchanges tokens by
    all-gather/reduce-scatter (``rollout.engine.expert_parallel.NaiveDispatch``), with no load
    balancing, and the other modes exchange none; so the placement never turns it off.
    """
    return torch.device(device).type == "cuda" and not deterministic


class Router(nn.Module):
    """The router of an MoE layer: ``forward(x) -> (logits [T, E], weights [T, K], ids [T, K])``,
    HF transformers' router interface (the seam ``replay.patch`` hooks).

    Logits are ``x @ weight.T``, optionally in float32 (GLM4-MoE's router is); ids and weights
    come from ``routing_kernels.route`` (ids also written to ``capture_TK`` when given). Holds
    DEEPSEEK_V3's ``e_score_correction_bias`` [E] (float32).

    ``deterministic`` (set by ``MoECausalLM``): batch-invariant logits, and the gate weights
    recomputed at the routed ids by ``routing_kernels.replay_topk``, the very function replay
    computes a trainer's gate weights with, so a deterministic engine and a replaying trainer
    agree bit for bit. Logits that need a gradient (a policy being trained) get their weights
    from that differentiable function too (``route``'s are not differentiable; equal math).
    """

    deterministic = False

    def __init__(self, hidden_size: int, routing: RoutingParams, *, float32: bool) -> None:
        super().__init__()
        self.routing = routing
        self.float32 = float32
        dtype = torch.float32 if float32 else None
        self.weight = nn.Parameter(
            torch.empty(routing.num_experts, hidden_size, dtype=dtype), requires_grad=False
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(routing.num_experts, dtype=torch.float32), requires_grad=False)
            if routing.method is RoutingMethod.DEEPSEEK_V3
            else None
        )

    @property
    def top_k(self) -> int:
        """K, the experts each token is routed to."""
        return self.routing.top_k

    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] (float32 for a float32 router)."""
        x_TH = x_TH.float() if self.float32 else x_TH
        if self.deterministic:
            return batch_invariant.linear(x_TH, self.weight)
        return F.linear(x_TH, self.weight.to(x_TH.dtype))

    def forward(
        self, x_TH: torch.Tensor, capture_TK: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routing = self.routing
        logits_TE = self.logits(x_TH)
        weights_TK, ids_TK = route(
            logits_TE.detach(),
            routing.top_k,
            routing.method,
            correction_bias=self.e_score_correction_bias,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            routed_scaling_factor=routing.routed_scaling_factor,
            capture_out=capture_TK,
        )
        if self.deterministic or (logits_TE.requires_grad and torch.is_grad_enabled()):
            weights_TK, ids_TK = replay_topk(
                logits_TE,
                weights_TK,
                ids_TK,
                ids_TK,
                torch.ones_like(ids_TK[:, 0], dtype=torch.bool),
                routing.method,
                routed_scaling_factor=routing.routed_scaling_factor,
            )
        return logits_TE, weights_TK, ids_TK


class Experts(nn.Module):
    """Routed experts' weights (HF v5 layout) of the contiguous range ``local`` of the E
    experts: ``gate_up_proj`` [L, 2I, H], ``down_proj`` [L, H, I], row ``j`` holding expert
    ``local[j]``. Expert parallelism gives each rank its slice (``expert_slice``); only that
    slice is allocated.

    Args:
        num_experts: E, the experts of the layer.
        hidden_size: H.
        intermediate_size: I.
        local: the experts held, a range of step 1 within ``[0, E)``; None: all of them.

    Attributes:
        num_experts (E), local, intermediate_size.

    Raises:
        ValueError: ``local`` empty, not of step 1 or not within ``[0, E)``.
    """

    deterministic = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        local: range | None = None,
    ) -> None:
        super().__init__()
        local = range(num_experts) if local is None else local
        if (
            not isinstance(local, range)
            or local.step != 1
            or not 0 <= local.start < local.stop <= num_experts
        ):
            raise ValueError(
                f"local: expected a non-empty range of step 1 within [0, {num_experts}), "
                f"got {local!r}"
            )
        self.num_experts = num_experts
        self.local = local
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(len(local), 2 * intermediate_size, hidden_size),
            requires_grad=False,
        )
        self.down_proj = nn.Parameter(
            torch.empty(len(local), hidden_size, intermediate_size),
            requires_grad=False,
        )

    @property
    def holds_all(self) -> bool:
        """Whether every one of the E experts is held (no expert parallelism)."""
        return len(self.local) == self.num_experts

    def forward(
        self,
        x_TH: torch.Tensor,
        ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        *,
        masked: bool = False,
    ) -> torch.Tensor:
        """The weighted sum over each token's experts [T, H] (HF's ``experts(hidden,
        top_k_index, top_k_weights)``); ``ids_TK`` index the held experts (``MASKED_ID``:
        held elsewhere, with ``masked``). ``deterministic``: ``batch_invariant.experts``;
        otherwise ``fused_experts``, or its plain-torch reference when a gradient is needed
        (the Triton kernels have no backward)."""
        weights = (x_TH, self.gate_up_proj, self.down_proj, weights_TK, ids_TK)
        if self.deterministic:
            return batch_invariant.experts(*weights, masked=masked)
        tracked = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x_TH, self.gate_up_proj, self.down_proj, weights_TK)
        )
        if tracked:
            return fused_experts_reference(*weights, masked=masked)
        return fused_experts(*weights, masked=masked)


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
        local_experts: the routed experts whose weights the block holds (``Experts.local``);
            None: all. A block holding a part needs the ``dispatch`` that computes that part.

    Attributes:
        aux_stream: None (shared experts after the routed ones, on the current stream), or the
            side CUDA stream the model sets to overlap them (``shared_experts_overlap``).
        dispatch: None (the block routes and computes its own tokens), or the ``NaiveDispatch``
            the engine sets for ``dp_attention``: the routed experts then run over the tokens of
            all ranks, this rank's expert slice only, and the shared experts over its own.
            Setting it raises ValueError unless its expert slice is ``experts.local`` (all
            experts for None).
        deterministic: batch-invariant numerics (set by ``MoECausalLM`` on every layer): the
            router, experts and shared-expert gate then use ``routing_kernels.batch_invariant``.
    """

    deterministic = False

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
        local_experts: range | None = None,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.moe_index = moe_index
        self.gate = Router(hidden_size, routing, float32=router_float32)
        self.experts = Experts(
            routing.num_experts, hidden_size, intermediate_size, local=local_experts
        )
        self._shared_name = shared_name if shared_intermediate_size else None
        if shared_intermediate_size:
            self.add_module(shared_name, GatedMLP(hidden_size, shared_intermediate_size))
        if shared_gate and not shared_intermediate_size:
            raise ValueError(
                "shared_gate: expected shared experts (shared_intermediate_size > 0), got none"
            )
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_gate else None
        # Set by the model (one side stream shared by its MoE layers); events made on first use.
        self.aux_stream: torch.cuda.Stream | None = None
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._dispatch: NaiveDispatch | None = None

    @property
    def dispatch(self) -> NaiveDispatch | None:
        """The expert parallelism across data-parallel ranks, or None (see the class)."""
        return self._dispatch

    @dispatch.setter
    def dispatch(self, dispatch: NaiveDispatch | None) -> None:
        held = self.experts.local
        computed = range(self.routing.num_experts) if dispatch is None else dispatch.experts
        if computed != held:
            raise ValueError(
                f"dispatch: expected one computing experts [{held.start}, {held.stop}) (the "
                f"experts this block holds), got [{computed.start}, {computed.stop})"
            )
        self._dispatch = dispatch

    @property
    def shared_experts_overlap(self) -> bool:
        """Whether the shared experts run on the side stream ``aux_stream``."""
        return self._shared_name is not None and self.aux_stream is not None

    def _shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        out_TH = getattr(self, self._shared_name)(x_TH)
        if self.shared_expert_gate is not None:
            sigmoid = batch_invariant.sigmoid if self.deterministic else torch.sigmoid
            out_TH = sigmoid(self.shared_expert_gate(x_TH)) * out_TH
        return out_TH

    def _routed(self, x_TH: torch.Tensor, capture: RoutedExpertsCapturer | None) -> torch.Tensor:
        dispatch = self._dispatch
        if dispatch is None:
            if not self.experts.holds_all:
                local = self.experts.local
                raise ValueError(
                    f"dispatch: expected a NaiveDispatch for a block holding experts "
                    f"[{local.start}, {local.stop}) of {self.routing.num_experts}, got None"
                )
            out_TK = None if capture is None else capture.layer_view(self.moe_index, x_TH.shape[0])
            _, weights_TK, ids_TK = self.gate(x_TH, out_TK)
            return self.experts(x_TH, ids_TK, weights_TK)
        x_XH = dispatch.gather(x_TH)
        _, weights_XK, ids_XK = self.gate(x_XH)
        if capture is not None:
            capture.capture(self.moe_index, ids_XK, dispatch.dp)
        # The block holds exactly the dispatch's experts (the setter checks): local ids index them.
        partial_XH = self.experts(x_XH, dispatch.local_ids(ids_XK), weights_XK, masked=True)
        return dispatch.combine(partial_XH)

    def forward(
        self, x_TH: torch.Tensor, capture: RoutedExpertsCapturer | None = None
    ) -> torch.Tensor:
        """MoE output [T, H]; with ``capture``, the top-k ids of these T tokens are also written
        into its rows ``[:T]`` at this layer's ``moe_index`` (under ``dispatch``: this rank's rows
        of the routed batch, by the capturer's DP rule)."""
        if self._shared_name is None:
            return self._routed(x_TH, capture)
        if self.aux_stream is None:
            return self._routed(x_TH, capture) + self._shared(x_TH)
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event())
        fork, join = self._events
        main = torch.cuda.current_stream(x_TH.device)
        fork.record(main)
        with torch.cuda.stream(self.aux_stream):
            self.aux_stream.wait_event(fork)
            shared_TH = self._shared(x_TH)
            join.record(self.aux_stream)
        routed_TH = self._routed(x_TH, capture)
        main.wait_event(join)
        return routed_TH + shared_TH
