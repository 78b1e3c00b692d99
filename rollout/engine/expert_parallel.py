"""Expert parallelism across the data-parallel ranks of ``data_parallel_mode="dp_attention"``:
which experts a rank's model holds (``MoEParallelConfig``, ``expert_slice``) and the token
exchange its MoE blocks run (``NaiveDispatch``), applied to the single-device model from outside
(the loader builds the model holding the rank's experts; the runner sets the dispatch on every
``rollout.layers.moe.SparseMoeBlock``).

Legend: T tokens of this rank, H hidden size, E experts, K top-k, N ranks, X tokens of all ranks
(the routed batch), M the largest per-rank token count of the step.

Naive dispatch (DESIGN.md "Data parallelism and capture"): each rank runs attention on its own
tokens; in every MoE layer the ranks all-gather the hidden states of all ranks' tokens (padded
to the step's largest count M for the collective, then compacted to the X = sum(n) real ones in
rank order), route all X tokens, compute the contribution of this rank's experts only (a
contiguous 1/N slice, the only experts whose weights the rank holds: pairs of other experts
carry ``routing_kernels.fused_moe.MASKED_ID`` and are skipped) and reduce-scatter the sum, so
each rank gets the full routed output of its own tokens. Shared experts stay on the rank's own
tokens. The routed ids reach the capture buffer through ``RoutedExpertsCapturer.capture`` with
the step's ``DPMetadata`` (``rollout.capture``: the DP row rule lives there only). Shapes change
every step and ``begin_step`` reads the counts on the host: eager only, no CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rollout.capture import DPMetadata
from rollout.loader import load_hf_config
from rollout.models.registry import model_class
from routing_kernels.fused_moe import MASKED_ID

if TYPE_CHECKING:
    from rollout.config import EngineConfig

__all__ = ["MoEParallelConfig", "NaiveDispatch", "check_expert_split", "expert_slice"]

# torch 2.13 renamed the tensor collectives (the old names warn there); older torch has only them.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEParallelConfig:
    """Which experts a model holds: rank ``ep_rank`` of ``ep_size`` holds the weights of
    ``expert_slice(E, ep_rank, ep_size)`` only (``rollout.loader.load_checkpoint(parallel=...)``).

    Attributes:
        ep_rank: this model's rank among the expert-parallel ranks (the data-parallel rank under
            ``data_parallel_mode="dp_attention"``).
        ep_size: the number of expert-parallel ranks (1: the model holds every expert).
    """

    ep_rank: int = 0
    ep_size: int = 1

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

    @classmethod
    def of_rank(cls, config: EngineConfig, dp_rank: int) -> MoEParallelConfig | None:
        """The experts data-parallel rank ``dp_rank`` holds: its slice under ``dp_attention``,
        else None (every expert)."""
        if not config.dp_attention:
            return None
        return cls(ep_rank=dp_rank, ep_size=config.data_parallel_size)

    def local_experts(self, num_experts: int) -> range:
        """The experts this rank holds: ``expert_slice(num_experts, ep_rank, ep_size)``."""
        return expert_slice(num_experts, self.ep_rank, self.ep_size)


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


def check_expert_split(config: EngineConfig) -> None:
    """Raise before any rank starts what every rank would: with dp_attention each rank computes
    ``num_experts / data_parallel_size`` experts (``expert_slice``)."""
    hf_config = load_hf_config(config.model)
    routing = model_class(hf_config.architectures).args_from_config(hf_config).routing
    expert_slice(routing.num_experts, 0, config.data_parallel_size)


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

    Attributes:
        rank, world_size, experts (this rank's ``expert_slice``), dp (the step's
        ``DPMetadata``, which the MoE blocks hand to the capturer; None before the first step).

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
        # Global expert id -> index among this rank's experts, MASKED_ID for the others.
        local_E = torch.full((num_experts,), MASKED_ID, dtype=torch.int32)
        local_E[self.experts.start : self.experts.stop] = torch.arange(
            len(self.experts), dtype=torch.int32
        )
        self._local_E = local_E.to(self.device)
        self.dp: DPMetadata | None = None
        self._longest = 0
        # Rows of the padded gather [N * M] that hold real tokens; None when none is padding.
        self._rows_X: torch.Tensor | None = None

    @classmethod
    def of_rank(
        cls, config: EngineConfig, dp_rank: int, *, num_experts: int, device: torch.device
    ) -> NaiveDispatch | None:
        """The dispatch of data-parallel rank ``dp_rank`` under ``dp_attention``, else None."""
        if not config.dp_attention:
            return None
        return cls(
            num_experts=num_experts,
            rank=dp_rank,
            world_size=config.data_parallel_size,
            device=device,
        )

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
