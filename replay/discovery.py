"""Finding the MoE layers of an HF transformers (>= 5) model and the routing method they use.

In transformers 5 every supported MoE block holds a router module (``gate``, or ``router``)
whose forward maps hidden states ``[T, H]`` to ``(router_logits [T, E], weights [T, K],
indices [T, K])``, and an ``experts`` module called as ``experts(hidden, indices, weights)``
(Qwen2/Qwen3-MoE, Mixtral, OLMoE, GLM4-MoE and DeepSeek-V3 all have this shape in 5.17 and
5.23). Replay hooks into exactly that router output, so these are the structural facts checked
here; anything else is rejected with a ValueError naming the module.

A model may instead declare its MoE layers through an explicit interface (``DeclaresMoE``,
e.g. ``rollout.load_policy``'s policy): ``replay_moe_layers()`` names each MoE layer's block,
router and experts, ``replay_routing()`` states the routing. Those are then taken as declared
(no structural search, no inference from the config) and checked like found ones.

The routing method (DESIGN.md) decides how replayed gate weights are recomputed from the
logits. It is read from the config for the known families, else from the router's attributes,
and then checked on a probe: the method must reproduce the router's own weights at its own
ids, so a wrong inference (or an HF change in the routing math) fails at ``patch`` time rather
than silently corrupting training.

Legend: T probe tokens, H hidden size, E experts, K top_k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

import routing_kernels
from routing_kernels import RoutingMethod

__all__ = [
    "DeclaresMoE",
    "MoELayer",
    "MoEStructure",
    "RoutingSpec",
    "discover",
    "find_moe_layers",
]

logger = logging.getLogger(__name__)

# Router softmax over all experts, top-k on the probabilities, ``norm_topk_prob`` renormalizes.
_SOFTMAX_TOPK_FAMILIES = frozenset({"qwen2_moe", "qwen3_moe", "olmoe"})
# Sigmoid scores, bias-corrected group-limited selection, normalized weights times a factor.
_DEEPSEEK_FAMILIES = frozenset({"deepseek_v3", "glm4_moe"})
# Softmax over the top-k logits (HF computes it as softmax, top-k, renormalize: the same values).
_RENORMALIZE_FAMILIES = frozenset({"mixtral"})

_ROUTER_NAMES = ("gate", "router")
_PROBE_TOKENS = 16
_PROBE_SEED = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingSpec:
    """How a model's router turns logits into gate weights (the replay side of DESIGN.md).

    Attributes:
        method: the ``routing_kernels.RoutingMethod`` (or its lower-case name).
        routed_scaling_factor: DEEPSEEK_V3's weight scale; 1.0 for every other method.
        n_group, topk_group: DEEPSEEK_V3's group-limited selection (None: no grouping). Replay
            does not select, so they only describe the model (e.g. for a rollout engine).
    """

    method: RoutingMethod
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", RoutingMethod.parse(self.method))
        factor = self.routed_scaling_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise TypeError(f"routed_scaling_factor: expected a float, got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"routed_scaling_factor: expected finite and > 0, got {factor}")
        if self.method is not RoutingMethod.DEEPSEEK_V3 and factor != 1.0:
            raise ValueError(
                f"routed_scaling_factor: expected 1.0 for method {self.method.name} (only "
                f"DEEPSEEK_V3 scales its weights), got {factor}"
            )
        object.__setattr__(self, "routed_scaling_factor", float(factor))
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name}: expected an int or None, got {value!r}")
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MoELayer:
    """One MoE block of a model.

    Attributes:
        layer_index: global decoder-layer index (the trace's ``moe_layers`` entry).
        name: qualified name of the MoE block in the model.
        block, router, experts: the block and its router and experts submodules.
        router_name: qualified name of the router.
    """

    layer_index: int
    name: str
    block: nn.Module
    router: nn.Module
    router_name: str
    experts: nn.Module


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MoEStructure:
    """The MoE layers of a model, in model order, and their shared routing."""

    layers: tuple[MoELayer, ...]
    num_experts: int
    top_k: int
    routing: RoutingSpec

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global decoder-layer indices of the MoE layers (a trace's ``moe_layers``)."""
        return tuple(layer.layer_index for layer in self.layers)


@runtime_checkable
class DeclaresMoE(Protocol):
    """A model that names its MoE layers and routing itself, instead of being searched.

    ``replay_moe_layers()``: ``(decoder-layer index, block name, router name, experts name)``
    per MoE layer, in model order; the router's forward returns ``(logits [T, E], weights
    [T, K], ids [T, K])`` and the experts are called as ``experts(hidden, ids, weights)``.
    ``replay_routing()``: a mapping with ``method`` (a ``RoutingMethod`` or its name),
    ``routed_scaling_factor``, ``n_group``, ``topk_group``, ``num_experts`` and ``top_k``.
    """

    def replay_moe_layers(self) -> Sequence[tuple[int, str, str, str]]: ...

    def replay_routing(self) -> Mapping[str, Any]: ...


def discover(
    model: nn.Module, *, routing: RoutingSpec | None = None, verify: bool = True
) -> MoEStructure:
    """Find ``model``'s MoE layers, infer their routing (unless ``routing`` is given) and, with
    ``verify``, check it on a probe through every router (skipped for meta-device weights).

    Raises:
        ValueError: no MoE layer, an unsupported block or router (the message names the
            module), routing that cannot be inferred or that does not reproduce a router's
            own weights, or layers that disagree on num_experts / top_k.
    """
    if isinstance(model, DeclaresMoE):
        return _declared_structure(model, routing=routing, verify=verify)
    layers = find_moe_layers(model)
    config = _text_config(model)
    specs = [routing if routing is not None else _infer_routing(config, layer) for layer in layers]
    for layer, spec in zip(layers[1:], specs[1:], strict=True):
        if spec != specs[0]:
            raise ValueError(
                f"{layer.router_name}: expected the routing of {layers[0].router_name} "
                f"({specs[0]}), got {spec}"
            )
    shapes = [_router_shape(config, layer, specs[0], verify=verify) for layer in layers]
    for layer, shape in zip(layers[1:], shapes[1:], strict=True):
        if shape != shapes[0]:
            raise ValueError(
                f"{layer.router_name}: expected (num_experts, top_k) {shapes[0]} as "
                f"{layers[0].router_name}, got {shape}"
            )
    num_experts, top_k = shapes[0]
    logger.debug(
        "MoE layers %s, num_experts %d, top_k %d, routing %s",
        [layer.layer_index for layer in layers],
        num_experts,
        top_k,
        specs[0],
    )
    return MoEStructure(layers=layers, num_experts=num_experts, top_k=top_k, routing=specs[0])


def find_moe_layers(model: nn.Module) -> tuple[MoELayer, ...]:
    """The MoE blocks of ``model`` in decoder-layer order: every module with an ``experts``
    submodule, which must also hold a router (``gate`` or ``router``) with a 2-D ``weight`` and
    sit inside one entry of the decoder-layer ``nn.ModuleList``.
    """
    modules = dict(model.named_modules())
    found: list[MoELayer] = []
    lists: set[str] = set()
    for name, block in modules.items():
        experts = block._modules.get("experts")
        if not isinstance(experts, nn.Module):
            continue
        label = f"{name or '<model>'} ({type(block).__name__})"
        if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(
                f"{label}: unsupported MoE block: its experts are a {type(experts).__name__} of "
                f"per-expert modules; replay needs one experts module called as "
                f"experts(hidden_states, top_k_index, top_k_weights) (transformers >= 5)"
            )
        router_attr = next(
            (n for n in _ROUTER_NAMES if isinstance(block._modules.get(n), nn.Module)), None
        )
        if router_attr is None:
            raise ValueError(
                f"{label}: unsupported MoE block: expected a router submodule named "
                f"{' or '.join(repr(n) for n in _ROUTER_NAMES)} returning (router_logits, "
                f"weights, indices), got submodules {list(block._modules)}"
            )
        router = block._modules[router_attr]
        router_name = f"{name}.{router_attr}" if name else router_attr
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(
                f"{router_name} ({type(router).__name__}): unsupported router: expected a 2-D "
                f"weight [num_experts, hidden], got {getattr(weight, 'shape', weight)!r}"
            )
        list_name, index = _decoder_layer_index(name, modules, label)
        lists.add(list_name)
        found.append(
            MoELayer(
                layer_index=index,
                name=name,
                block=block,
                router=router,
                router_name=router_name,
                experts=experts,
            )
        )
    if not found:
        raise ValueError(
            f"model ({type(model).__name__}): expected MoE layers (a module with an `experts` "
            f"submodule and a router), found none"
        )
    if len(lists) > 1:
        raise ValueError(
            f"model ({type(model).__name__}): expected MoE layers in one decoder-layer list, "
            f"got MoE blocks under {sorted(lists)}"
        )
    found.sort(key=lambda layer: layer.layer_index)
    for before, after in zip(found[:-1], found[1:], strict=True):
        if before.layer_index == after.layer_index:
            raise ValueError(
                f"{after.name}: expected one MoE block per decoder layer, got a second one in "
                f"layer {after.layer_index} (first: {before.name})"
            )
    return tuple(found)


def _declared_structure(
    model: DeclaresMoE, *, routing: RoutingSpec | None, verify: bool
) -> MoEStructure:
    """The structure ``model`` declares (``DeclaresMoE``), checked: every named module exists,
    one MoE layer per decoder layer in ascending order, and (``verify``) each router's probe
    output has the declared shape and its weights are reproduced by the declared routing."""
    label = f"model ({type(model).__name__})"
    declared = dict(model.replay_routing())
    expected_keys = {"method", "routed_scaling_factor", "n_group", "topk_group", "num_experts"}
    expected_keys.add("top_k")
    if set(declared) != expected_keys:
        raise ValueError(
            f"{label}.replay_routing(): expected the keys {sorted(expected_keys)}, got "
            f"{sorted(declared)}"
        )
    num_experts, top_k = declared.pop("num_experts"), declared.pop("top_k")
    if routing is None:
        routing = RoutingSpec(**declared)
    modules = dict(model.named_modules())
    layers = []
    for entry in model.replay_moe_layers():
        index, names = entry[0], entry[1:]
        missing = [name for name in names if not isinstance(modules.get(name), nn.Module)]
        if missing:
            raise ValueError(
                f"{label}.replay_moe_layers(): expected modules named {missing}, found none"
            )
        block, router, experts = (modules[name] for name in names)
        layers.append(
            MoELayer(
                layer_index=int(index),
                name=names[0],
                block=block,
                router=router,
                router_name=names[1],
                experts=experts,
            )
        )
    indices = [layer.layer_index for layer in layers]
    if not layers or indices != sorted(set(indices)):
        raise ValueError(
            f"{label}.replay_moe_layers(): expected MoE layers in ascending decoder order, one "
            f"per layer, got layers {indices}"
        )
    config = _text_config(model)
    for layer in layers:
        shape = _router_shape(config, layer, routing, verify=verify, top_k=top_k)
        if shape != (num_experts, top_k):
            raise ValueError(
                f"{layer.router_name}: expected (num_experts, top_k) ({num_experts}, {top_k}) "
                f"as declared by replay_routing(), got {shape}"
            )
    return MoEStructure(
        layers=tuple(layers), num_experts=num_experts, top_k=top_k, routing=routing
    )


# ---------------------------------------------------------------------- routing inference


def _infer_routing(config: object, layer: MoELayer) -> RoutingSpec:
    model_type = getattr(config, "model_type", None)
    router = layer.router
    label = f"{layer.router_name} ({type(router).__name__}, model_type {model_type!r})"
    if model_type in _RENORMALIZE_FAMILIES:
        return RoutingSpec(method=RoutingMethod.RENORMALIZE)
    is_deepseek = model_type in _DEEPSEEK_FAMILIES or (
        model_type not in _SOFTMAX_TOPK_FAMILIES and hasattr(router, "e_score_correction_bias")
    )
    norm_topk_prob = getattr(router, "norm_topk_prob", getattr(config, "norm_topk_prob", None))
    if is_deepseek:
        if not norm_topk_prob:
            raise ValueError(
                f"{label}: unsupported routing: norm_topk_prob={norm_topk_prob} (sigmoid gate "
                f"weights without normalization) is not a routing_kernels.RoutingMethod; "
                f"DEEPSEEK_V3 normalizes the selected weights"
            )
        return RoutingSpec(
            method=RoutingMethod.DEEPSEEK_V3,
            routed_scaling_factor=float(_attr(router, config, "routed_scaling_factor", 1.0)),
            n_group=_attr(router, config, "n_group", None, router_attr="num_group"),
            topk_group=_attr(router, config, "topk_group", None),
        )
    if model_type in _SOFTMAX_TOPK_FAMILIES or norm_topk_prob is not None:
        method = RoutingMethod.RENORMALIZE_NAIVE if norm_topk_prob else RoutingMethod.DEFAULT
        return RoutingSpec(method=method)
    raise ValueError(
        f"{label}: cannot infer the routing method (not a known family and the router has "
        f"neither `norm_topk_prob` nor `e_score_correction_bias`); pass method= to "
        f"replay.patch"
    )


def _attr(
    router: nn.Module,
    config: object,
    name: str,
    default: object,
    *,
    router_attr: str | None = None,
) -> object:
    """The router's own copy of a routing parameter, else the config's, else ``default``."""
    value = getattr(router, router_attr or name, None)
    if value is None:
        value = getattr(config, name, None)
    return default if value is None else value


def _router_shape(
    config: object,
    layer: MoELayer,
    routing: RoutingSpec,
    *,
    verify: bool,
    top_k: int | None = None,
) -> tuple[int, int]:
    """(num_experts, top_k) of a router; with ``verify``, read from a probe through it that
    also checks the output structure and that ``routing`` reproduces its weights (``top_k``:
    the declared one, used without a probe)."""
    router = layer.router
    label = f"{layer.router_name} ({type(router).__name__})"
    weight = router.weight
    if not verify or weight.is_meta:
        top_k = (
            top_k
            or getattr(router, "top_k", None)
            or getattr(config, "num_experts_per_tok", None)
        )
        if not isinstance(top_k, int):
            raise ValueError(f"{label}: expected a `top_k` attribute (int), got {top_k!r}")
        return int(weight.shape[0]), top_k
    generator = torch.Generator(device=weight.device).manual_seed(_PROBE_SEED)
    hidden_TH = torch.randn(
        _PROBE_TOKENS, weight.shape[1], generator=generator, device=weight.device
    ).to(weight.dtype)
    try:
        with torch.no_grad():
            # The bound forward, not __call__: a probe must not trigger module hooks.
            out = router.forward(hidden_TH)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{label}: could not call the router on hidden states [T, H]: {err}"
        ) from err
    if not (
        isinstance(out, (tuple, list))
        and len(out) == 3
        and all(isinstance(t, torch.Tensor) for t in out)
    ):
        raise ValueError(
            f"{label}: unsupported router: expected forward to return (router_logits [T, E], "
            f"weights [T, K], indices [T, K]), got {_describe(out)}"
        )
    logits_TE, weights_TK, ids_TK = out
    if (
        logits_TE.ndim != 2
        or weights_TK.ndim != 2
        or ids_TK.shape != weights_TK.shape
        or logits_TE.shape[0] != _PROBE_TOKENS
        or weights_TK.shape[0] != _PROBE_TOKENS
        or ids_TK.dtype.is_floating_point
    ):
        raise ValueError(
            f"{label}: unsupported router: expected (router_logits [T, E], weights [T, K], "
            f"integer indices [T, K]) for T={_PROBE_TOKENS}, got {_describe(out)}"
        )
    num_experts, top_k = int(logits_TE.shape[1]), int(ids_TK.shape[1])
    expected_TK = routing_kernels.replay_weights(
        logits_TE, ids_TK, routing.method, routed_scaling_factor=routing.routed_scaling_factor
    ).to(weights_TK.dtype)
    low_precision = weights_TK.dtype in (torch.float16, torch.bfloat16)
    tolerance = 2e-2 if low_precision else 1e-4
    if not torch.allclose(expected_TK, weights_TK, rtol=tolerance, atol=tolerance):
        difference = (expected_TK.double() - weights_TK.double()).abs().max().item()
        raise ValueError(
            f"{label}: routing {routing.method.name} (routed_scaling_factor "
            f"{routing.routed_scaling_factor}) does not reproduce the router's own gate weights "
            f"on a probe (max abs difference {difference:.3g}, tolerance {tolerance}); pass the "
            f"right method= to replay.patch"
        )
    return num_experts, top_k


# ---------------------------------------------------------------------- structure helpers


def _decoder_layer_index(name: str, modules: dict[str, nn.Module], label: str) -> tuple[str, int]:
    """(name of the enclosing ``nn.ModuleList``, index in it) of the outermost list entry that
    contains the module ``name``."""
    parts = name.split(".") if name else []
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if isinstance(modules.get(parent), nn.ModuleList) and parts[i].isdigit():
            return parent, int(parts[i])
    raise ValueError(
        f"{label}: expected the MoE block inside a decoder layer (an entry of an "
        f"nn.ModuleList), got it outside any"
    )


def _text_config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(_describe(v) for v in value)})"
    return type(value).__name__
