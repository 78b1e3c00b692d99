"""``replay.patch``: make one HF transformers MoE model replayable.

Patching is per instance: each MoE layer's router gets a small forward seam (installed only
while a replay or record context, or a replayed forward awaiting its backward, needs it) and
the model a pre/post forward hook, all owned by one ``ReplayController`` attached to the
model. Classes are never touched, so other models (patched or not) are unaffected.
"""

from __future__ import annotations

from torch import nn

from replay.controller import ReplayController
from replay.discovery import RoutingSpec, discover
from replay.router_seam import SEAM_ATTR
from routing_kernels import RoutingMethod

__all__ = ["patch"]

# Where the controller lives on the model (an ordinary attribute, so deepcopy carries it along).
_CONTROLLER_ATTR = "_routing_replay_controller"


def patch(
    model: nn.Module,
    *,
    method: RoutingMethod | str | None = None,
    routed_scaling_factor: float | None = None,
    verify: bool = True,
) -> ReplayController:
    """Attach a ``ReplayController`` to ``model`` and return it (the same one on a second call).

    Args:
        model: an HF transformers (>= 5) MoE model, e.g. ``Qwen3MoeForCausalLM``. Its MoE layers
            are found by structure (a block with a router returning ``(logits, weights, ids)``
            and an ``experts`` module), or taken as the model declares them
            (``replay.discovery.DeclaresMoE``: ``rollout.load_policy``'s policy); patch before
            wrapping it (FSDP, DDP, compile).
        method: the routing method replayed weights are computed with; inferred from the config
            when None (Qwen2/Qwen3-MoE and OLMoE: DEFAULT or RENORMALIZE_NAIVE by
            ``norm_topk_prob``; Mixtral: RENORMALIZE; GLM4-MoE and DeepSeek-V3: DEEPSEEK_V3).
        routed_scaling_factor: DEEPSEEK_V3's weight scale, only together with ``method``.
        verify: run a probe through every router checking that the method reproduces the
            router's own weights (skipped for meta-device weights).

    Raises:
        ValueError: no MoE layers, an unsupported block or router (the message names the
            module), routing that cannot be inferred or verified, or a second call asking for
            a different routing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    routing = None
    if method is not None:
        factor = 1.0 if routed_scaling_factor is None else routed_scaling_factor
        routing = RoutingSpec(method=method, routed_scaling_factor=factor)
    elif routed_scaling_factor is not None:
        raise ValueError(
            f"routed_scaling_factor: expected None without method= (it is inferred with the "
            f"method), got {routed_scaling_factor}"
        )
    existing = model.__dict__.get(_CONTROLLER_ATTR)
    if existing is not None:
        have = (existing.routing.method, existing.routing.routed_scaling_factor)
        if routing is not None and (routing.method, routing.routed_scaling_factor) != have:
            raise ValueError(
                f"method: expected {have[0].name} with routed_scaling_factor {have[1]} (this "
                f"model is already patched with them), got {routing.method.name} with "
                f"{routing.routed_scaling_factor}"
            )
        return existing
    structure = discover(model, routing=routing, verify=verify)
    for layer in structure.layers:
        if SEAM_ATTR in layer.router.__dict__:
            raise ValueError(
                f"{layer.router_name}: expected an unpatched router, got one already patched "
                f"by replay.patch on another module holding it"
            )
    controller = ReplayController(model, structure)
    model.__dict__[_CONTROLLER_ATTR] = controller
    return controller
