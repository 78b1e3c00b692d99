"""Routing traces, replay for HF transformers MoE models, and rollout/train mismatch metrics."""

from replay.metrics import (
    RouterAgreement,
    extreme_token_fraction,
    kl_k3,
    plot_agreement_heatmap,
    router_agreement,
    router_agreement_matrix,
)
from replay.routed_experts import RoutedExperts, compact_dtype

__all__ = [
    "RoutedExperts",
    "RouterAgreement",
    "compact_dtype",
    "extreme_token_fraction",
    "kl_k3",
    "plot_agreement_heatmap",
    "router_agreement",
    "router_agreement_matrix",
]
