"""The sparse MoE block: router -> ``routing_kernels.route`` (ids captured in-kernel) -> fused
experts, plus optional shared experts, overlapped on a side CUDA stream when that is right and
useful; and ``NaiveDispatch``, the expert parallelism across data-parallel ranks that the engine
attaches to the blocks from outside for ``data_parallel_mode="dp_attention"``.

Legend: T tokens (of this rank), H hidden size, E experts, L experts held by this rank (E
without expert parallelism), K top-k, I expert intermediate size; under ``NaiveDispatch``:
N ranks, X tokens of all ranks (the routed batch), M the largest per-rank token count of the
step.

Expert weights use HF transformers v5's fused layout: ``gate_up_proj`` [L, 2I, H] (gate rows
then up rows) and ``down_proj`` [L, H, I], for a contiguous range of the E experts (all of
them unless expert parallelism splits them: ``MoEParallelConfig.ep_size``). The routing
semantics are those of ``routing_kernels.RoutingMethod`` (DESIGN.md); each family maps its HF router
onto one method.

Shared-expert overlap: the shared experts read the same input as the routed experts and their
outputs are summed, so they can run concurrently on a side stream (fork/join with CUDA events:
capturable in CUDA graphs; the same kernels on the same data, so the result is identical).
``shared_experts_overlap`` decides from the parallel configuration, as vLLM does after its
PR 39222: off on CPU; off with expert-placement load balancing (EPLB) under an all-to-all
backend other than allgather/reduce-scatter (a correctness hazard there); off with two-sided
all-to-all kernels (no gain: they already overlap communication); on otherwise.

Naive dispatch (DESIGN.md "Data parallelism and capture"): each rank runs attention on its own
tokens; in every MoE layer the ranks all-gather the hidden states of all ranks' tokens (padded
to the step's largest count M for the collective, then compacted to the X = sum(n) real ones in
rank order), route all X tokens, compute the contribution of this rank's experts only (a
contiguous 1/N slice, the only experts whose weights the rank holds: pairs of other experts
carry ``routing_kernels.fused_moe.MASKED_ID`` and are skipped) and reduce-scatter the sum, so
each rank gets the full routed output of its own tokens.
Shared experts stay on the rank's own tokens. The capture buffer takes this rank's rows of the
routed batch, chosen by the capturer's DP rule (``RoutedExpertsCapturer.rank_rows``). Shapes
change every step and ``begin_step`` reads the counts on the host: eager only, no CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rollout.capture.capturer import DPMetadata
from rollout.layers.linear import Linear
from rollout.layers.mlp import GatedMLP
from routing_kernels import batch_invariant
from routing_kernels.fused_moe import MASKED_ID, fused_experts, fused_experts_reference
from routing_kernels.replay_weights import replay_topk
from routing_kernels.route import route
from routing_kernels.routing_method import RoutingMethod

if TYPE_CHECKING:
    from rollout.capture.capturer import RoutedExpertsCapturer

__all__ = [
    "ALL2ALL_BACKENDS",
    "Experts",
    "MoEParallelConfig",
    "NaiveDispatch",
    "Router",
    "RoutingParams",
    "SparseMoeBlock",
    "expert_slice",
    "shared_experts_overlap",
]

# torch 2.13 renamed the tensor collectives (the old names warn there); older torch has only them.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

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


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEParallelConfig:
    """The expert-parallel configuration: which experts a model holds, and what decides
    shared-expert overlap.

    Attributes:
        ep_rank: this model's rank among the ``ep_size`` expert-parallel ranks; it holds the
            weights of ``expert_slice(E, ep_rank, ep_size)`` only (the data-parallel rank under
            ``data_parallel_mode="dp_attention"``).
        ep_size: the number of expert-parallel ranks (1: the model holds every expert).
        enable_eplb: expert-placement load balancing (redundant / moved experts) is on.
        all2all_backend: the token dispatch/combine backend, one of ``ALL2ALL_BACKENDS``.
        use_two_sided_all2all_kernels: dispatch/combine through two-sided all-to-all kernels
            (FlashInfer's NVLink two-sided kernels), which overlap communication themselves.
    """

    ep_rank: int = 0
    ep_size: int = 1
    enable_eplb: bool = False
    all2all_backend: str = "allgather_reducescatter"
    use_two_sided_all2all_kernels: bool = False

    def __post_init__(self) -> None:
        for name in ("ep_rank", "ep_size"):
            if type(getattr(self, name)) is not int:
                raise TypeError(
                    f"{name}: expected an int, got {type(getattr(self, name)).__name__}"
                )
        if self.ep_size < 1:
            raise ValueError(f"ep_size: expected an int >= 1, got {self.ep_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank: expected an int in [0, {self.ep_size}), got {self.ep_rank}")
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


def expert_slice(num_experts: int, rank: int, world_size: int) -> range:
    """The experts that rank ``rank`` of ``world_size`` computes under expert parallelism: the
    contiguous slice ``[rank * E / N, (rank + 1) * E / N)``.

    Raises:
        ValueError: ``num_experts`` not a multiple of ``world_size`` (the message names
            ``num_experts`` and ``data_parallel_size``), or ``rank`` not in ``[0, world_size)``.
    """
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts: expected a multiple of data_parallel_size={world_size} with "
            f"data_parallel_mode='dp_attention' (each rank computes num_experts / "
            f"data_parallel_size experts), got {num_experts}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank}")
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class NaiveDispatch:
    """Expert parallelism over the data-parallel ranks by naive dispatch (module docstring),
    set as ``SparseMoeBlock.dispatch`` on every MoE block of a rank's model.

    Every rank calls ``begin_step(n_r)`` once per forward (a collective: it all-gathers the
    token counts) and then runs a forward over its ``n_r`` tokens; the MoE blocks' ``gather``
    and ``combine`` are collectives too, so every rank must run every forward (a rank without
    work feeds a padding token). The collectives use the default ``torch.distributed`` process
    group (gloo on CPU, NCCL on CUDA) on tensors on ``device``.

    Args:
        num_experts: E, a multiple of ``world_size``.
        rank: this rank in the default process group.
        world_size: N, the size of the default process group.
        device: the model's device.
        capturer: this rank's routed-expert capturer with capture on, else None; its
            ``rank_rows`` rule picks the rows of the routed batch that the MoE layers capture.

    Attributes:
        rank, world_size, experts (this rank's ``expert_slice``), dp (the step's
        ``DPMetadata``; None before the first step), capture_rows (``[start, stop)`` of the
        routed batch that are this rank's, by the capturer's rule; None without a capturer).

    Raises:
        ValueError: E not a multiple of N, or no default process group of N ranks with this
            rank.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        rank: int,
        world_size: int,
        device: torch.device,
        capturer: RoutedExpertsCapturer | None = None,
    ) -> None:
        self.experts = expert_slice(num_experts, rank, world_size)
        group = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else None
        if group != (rank, world_size):
            raise ValueError(
                f"data_parallel_size: expected rank {rank} of an initialized default process "
                f"group of {world_size} ranks, got {'none' if group is None else group}"
            )
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self._capturer = capturer
        # Global expert id -> index among this rank's experts, MASKED_ID for the others.
        local_E = torch.full((num_experts,), MASKED_ID, dtype=torch.int32)
        local_E[self.experts.start : self.experts.stop] = torch.arange(
            len(self.experts), dtype=torch.int32
        )
        self._local_E = local_E.to(self.device)
        self.dp: DPMetadata | None = None
        self.capture_rows: tuple[int, int] | None = None
        self._longest = 0
        # Rows of the padded gather [N * M] that hold real tokens; None when none is padding.
        self._rows_X: torch.Tensor | None = None

    def begin_step(self, num_tokens: int) -> DPMetadata:
        """Exchange this step's token counts with the other ranks (collective; reads them on
        the host) and return them as ``DPMetadata``."""
        mine = torch.tensor([num_tokens], dtype=torch.int64, device=self.device)
        counts_N = torch.empty(self.world_size, dtype=torch.int64, device=self.device)
        _all_gather(counts_N, mine)
        counts = counts_N.tolist()
        self.dp = DPMetadata(num_tokens_across_dp=counts)
        longest = max(counts)
        self._longest = longest
        if all(count == longest for count in counts):
            self._rows_X = None
        else:
            rows = np.concatenate([q * longest + np.arange(c) for q, c in enumerate(counts)])
            self._rows_X = torch.from_numpy(rows).to(self.device)
        if self._capturer is not None:
            self.capture_rows = self._capturer.rank_rows(sum(counts), self.dp)
        return self.dp

    def gather(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[X, H]: the step's tokens of every rank, in rank order (collective)."""
        assert self.dp is not None, "begin_step must run before the forward"
        assert x_TH.shape[0] == self.dp.num_tokens_across_dp[self.rank], (
            f"rank {self.rank}: {x_TH.shape[0]} tokens, begin_step said {self.dp}"
        )
        padding = self._longest - x_TH.shape[0]
        x_MH = (F.pad(x_TH, (0, 0, 0, padding)) if padding else x_TH).contiguous()
        gathered_NMH = x_TH.new_empty((self.world_size * self._longest, x_TH.shape[1]))
        _all_gather(gathered_NMH, x_MH)
        return gathered_NMH if self._rows_X is None else gathered_NMH[self._rows_X]

    def combine(self, partial_XH: torch.Tensor) -> torch.Tensor:
        """[T, H]: the sum over the ranks of their partial outputs for this rank's tokens
        (collective)."""
        assert self.dp is not None, "begin_step must run before the forward"
        padded_NMH = partial_XH
        if self._rows_X is not None:
            padded_NMH = partial_XH.new_zeros(
                (self.world_size * self._longest, partial_XH.shape[1])
            )
            padded_NMH[self._rows_X] = partial_XH
        out_MH = partial_XH.new_empty((self._longest, partial_XH.shape[1]))
        _reduce_scatter(out_MH, padded_NMH.contiguous())
        return out_MH[: self.dp.num_tokens_across_dp[self.rank]]

    def local_ids(self, ids_XK: torch.Tensor) -> torch.Tensor:
        """Expert ids as indices into this rank's slice of the experts; ``MASKED_ID`` for the
        experts of other ranks."""
        return self._local_E[ids_XK]


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
        overlap: run the shared experts on a side CUDA stream (``shared_experts_overlap``).
        local_experts: the routed experts whose weights the block holds (``Experts.local``);
            None: all. A block holding a part needs the ``dispatch`` that computes that part.

    Attributes:
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
        overlap: bool = False,
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
        self._overlap = overlap and shared_intermediate_size > 0
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
        return self._overlap

    def _shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        out_TH = getattr(self, self._shared_name)(x_TH)
        if self.shared_expert_gate is not None:
            sigmoid = batch_invariant.sigmoid if self.deterministic else torch.sigmoid
            out_TH = sigmoid(self.shared_expert_gate(x_TH)) * out_TH
        return out_TH

    def _routed(self, x_TH: torch.Tensor, capture_TK: torch.Tensor | None) -> torch.Tensor:
        dispatch = self._dispatch
        if dispatch is None:
            if not self.experts.holds_all:
                local = self.experts.local
                raise ValueError(
                    f"dispatch: expected a NaiveDispatch for a block holding experts "
                    f"[{local.start}, {local.stop}) of {self.routing.num_experts}, got None"
                )
            _, weights_TK, ids_TK = self.gate(x_TH, capture_TK)
            return self.experts(x_TH, ids_TK, weights_TK)
        x_XH = dispatch.gather(x_TH)
        _, weights_XK, ids_XK = self.gate(x_XH)
        if capture_TK is not None:
            assert dispatch.capture_rows is not None, "capture on, but the dispatch has no capturer"
            start, stop = dispatch.capture_rows
            capture_TK.copy_(ids_XK[start:stop])
        # The block holds exactly the dispatch's experts (the setter checks): local ids index them.
        partial_XH = self.experts(x_XH, dispatch.local_ids(ids_XK), weights_XK, masked=True)
        return dispatch.combine(partial_XH)

    def forward(self, x_TH: torch.Tensor, capture_TK: torch.Tensor | None = None) -> torch.Tensor:
        """MoE output [T, H]; the top-k ids of these T tokens are also written to ``capture_TK``
        [T, K] when given (under ``dispatch``: this rank's rows of the routed batch)."""
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
