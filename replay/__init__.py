"""Routing traces, replay for HF transformers MoE models, and rollout/train mismatch metrics."""

from replay.controller import Mode, RecordContext, ReplayContext, ReplayController
from replay.discovery import RoutingSpec
from replay.expert_tap import ExpertsTap
from replay.grouped_experts import grouped_experts_forward, use_grouped_experts
from replay.layout import AlignedTraces, BatchLayout, align_traces, traces_from_aligned
from replay.metrics import (
    RouterAgreement,
    extreme_token_fraction,
    kl_k3,
    plot_agreement_heatmap,
    router_agreement,
    router_agreement_matrix,
)
from replay.mismatch import Mismatch, RolloutSample, measure_mismatch
from replay.patch import patch
from replay.routed_experts import RoutedExperts, compact_dtype

__all__ = [
    "AlignedTraces",
    "BatchLayout",
    "ExpertsTap",
    "Mismatch",
    "Mode",
    "RecordContext",
    "ReplayContext",
    "ReplayController",
    "RolloutSample",
    "RoutedExperts",
    "RouterAgreement",
    "RoutingSpec",
    "align_traces",
    "compact_dtype",
    "extreme_token_fraction",
    "grouped_experts_forward",
    "kl_k3",
    "measure_mismatch",
    "patch",
    "plot_agreement_heatmap",
    "router_agreement",
    "router_agreement_matrix",
    "traces_from_aligned",
    "use_grouped_experts",
]
