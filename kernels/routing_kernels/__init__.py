"""Routing math for Mixture-of-Experts layers: Triton kernels on CUDA, plain-torch references.

``routing_kernels`` imports nothing else of this project (DESIGN.md). Each kernel module holds the
``@triton.jit`` body, a launcher that checks its inputs, and the reference with the same
semantics that serves the CPU path and the tests.
"""

from routing_kernels.replay_weights import (
    replay_topk,
    replay_topk_reference,
    replay_weights,
    replay_weights_reference,
)
from routing_kernels.route import route, route_reference
from routing_kernels.routing_method import RoutingMethod

__all__ = [
    "RoutingMethod",
    "replay_topk",
    "replay_topk_reference",
    "replay_weights",
    "replay_weights_reference",
    "route",
    "route_reference",
]
