"""Routing methods: how router logits become top-k expert ids and gate weights.

Names follow FlashInfer's ``RoutingMethodType``. The semantics (DESIGN.md) are the contract
shared by rollout capture (``routing_kernels.route``) and training replay
(``routing_kernels.replay_weights``):

- ``DEFAULT``: softmax over all experts, top-k, weights not renormalized.
- ``RENORMALIZE``: top-k on the logits, then softmax over the k selected logits.
- ``RENORMALIZE_NAIVE``: softmax, top-k, weights renormalized to sum to one.
- ``DEEPSEEK_V3``: sigmoid scores; selection on scores + correction bias, group-limited when
  ``n_group`` is set; weights are the unbiased scores of the selected experts, normalized,
  times ``routed_scaling_factor``.
- ``LLAMA4``: top-1 on the logits, sigmoid of the selected logit as its weight.

Scores and weights are float32 whatever the logits' dtype; ties go to the lower expert index.
"""

from __future__ import annotations

import enum


class RoutingMethod(enum.Enum):
    """A routing method of DESIGN.md; ``RoutingMethod.parse`` also takes the lower-case name."""

    DEFAULT = "default"
    RENORMALIZE = "renormalize"
    RENORMALIZE_NAIVE = "renormalize_naive"
    DEEPSEEK_V3 = "deepseek_v3"
    LLAMA4 = "llama4"

    @classmethod
    def parse(cls, method: RoutingMethod | str) -> RoutingMethod:
        """Return the member for ``method`` (a member, or its lower-case name)."""
        if isinstance(method, cls):
            return method
        if isinstance(method, str):
            try:
                return cls(method)
            except ValueError:
                pass
        names = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"method: expected a RoutingMethod or one of {names}, got {method!r}")
