"""Routing math for Mixture-of-Experts layers: Triton kernels on CUDA, plain-torch references.

``kernels`` imports nothing else of this project (DESIGN.md). Each kernel module holds the
``@triton.jit`` body, a launcher that checks its inputs, and the reference with the same
semantics that serves the CPU path and the tests.
"""

from kernels.replay_weights import (
    replay_topk,
    replay_topk_reference,
    replay_weights,
    replay_weights_reference,
)
from kernels.route import route, route_reference
from kernels.routing_method import RoutingMethod

__all__ = [
    "RoutingMethod",
    "replay_topk",
    "replay_topk_reference",
    "replay_weights",
    "replay_weights_reference",
    "route",
    "route_reference",
]
