"""Routing traces, replay for HF transformers MoE models, and rollout/train mismatch metrics."""

from replay.controller import Mode, RecordContext, ReplayContext, ReplayController
from replay.discovery import RoutingSpec
from replay.grouped_experts import grouped_experts_forward, use_grouped_experts
from replay.expert_tap import ExpertsTap
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
    "RolloutSample",
    "ReplayContext",
    "ReplayController",
    "RoutingSpec",
    "align_traces",
    "grouped_experts_forward",
    "measure_mismatch",
    "patch",
    "traces_from_aligned",
    "use_grouped_experts",
    "RoutedExperts",
    "RouterAgreement",
    "compact_dtype",
    "extreme_token_fraction",
    "kl_k3",
    "plot_agreement_heatmap",
    "router_agreement",
    "router_agreement_matrix",
]
