"""Finding MoE layers by structure and inferring (and verifying) the routing method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_moe import EXPECTED, FAMILIES, NUM_EXPERTS, TOP_K, tiny_moe
from torch import nn

from replay.discovery import RoutingSpec, discover
from routing_kernels import RoutingMethod

HIDDEN = 16


@pytest.mark.parametrize("family", FAMILIES)
def test_discover_finds_moe_layers_and_routing(family: str) -> None:
    model = tiny_moe(family)
    structure = discover(model)
    moe_layers, method, factor = EXPECTED[family]
    assert structure.moe_layers == moe_layers
    names = [layer.name for layer in structure.layers]
    assert names == [f"model.layers.{i}.mlp" for i in moe_layers]
    assert all(layer.router is layer.block.gate for layer in structure.layers)
    assert all(layer.experts is layer.block.experts for layer in structure.layers)
    assert (structure.num_experts, structure.top_k) == (NUM_EXPERTS, TOP_K)
    assert structure.routing.method is RoutingMethod[method]
    assert structure.routing.routed_scaling_factor == factor


def test_deepseek_groups_are_read_from_the_config() -> None:
    routing = discover(tiny_moe("deepseek_v3")).routing
    assert (routing.n_group, routing.topk_group) == (4, 2)


def test_unnormalized_sigmoid_routing_is_rejected() -> None:
    model = tiny_moe("deepseek_v3", norm_topk_prob=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate .*norm_topk_prob=False"):
        discover(model)


def test_a_wrong_explicit_method_fails_the_probe() -> None:
    model = tiny_moe("qwen3_moe")  # RENORMALIZE_NAIVE
    wrong = r"model\.layers\.0\.mlp\.gate .*DEFAULT .*does not reproduce"  # its first MoE layer
    with pytest.raises(ValueError, match=wrong):
        discover(model, routing=RoutingSpec(method="default"))
    assert discover(model, routing=RoutingSpec(method="renormalize")).routing.method is (
        RoutingMethod.RENORMALIZE
    )


def test_discovery_leaves_the_global_rng_alone() -> None:
    model = tiny_moe("olmoe")
    state = torch.random.get_rng_state()
    discover(model)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_routing_spec_validation() -> None:
    with pytest.raises(ValueError, match="routed_scaling_factor: expected 1.0 for method DEFAULT"):
        RoutingSpec(method="default", routed_scaling_factor=2.0)
    with pytest.raises(ValueError, match="routed_scaling_factor: expected finite and > 0"):
        RoutingSpec(method="deepseek_v3", routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match="method: expected a RoutingMethod"):
        RoutingSpec(method="softmax")


# ---------------------------------------------------------------------- custom structures


class Router(nn.Module):
    """Softmax top-2 without renormalization (DEFAULT), or logits only."""

    def __init__(self, logits_only: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(NUM_EXPERTS, HIDDEN))
        self.logits_only = logits_only

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, HIDDEN), self.weight)
        if self.logits_only:
            return logits
        weights, ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
        return logits, weights, ids


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(NUM_EXPERTS, HIDDEN))

    def forward(self, hidden, ids, weights):
        return (self.scale[ids] * weights[..., None]).sum(1) * hidden


class Block(nn.Module):
    def __init__(self, router: nn.Module | None = None, experts: nn.Module | None = None) -> None:
        super().__init__()
        self.gate = Router() if router is None else router
        self.experts = Experts() if experts is None else experts

    def forward(self, hidden):
        flat = hidden.reshape(-1, HIDDEN)
        _, weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).view_as(hidden)


class Model(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, hidden):
        for block in self.layers:
            hidden = hidden + block(hidden)
        return hidden


def test_custom_model_needs_an_explicit_method() -> None:
    model = Model(nn.Identity(), Block())
    unknown = r"layers\.1\.gate \(Router, model_type None\): cannot infer"
    with pytest.raises(ValueError, match=unknown):
        discover(model)
    structure = discover(model, routing=RoutingSpec(method="default"))
    assert structure.moe_layers == (1,) and structure.routing.method is RoutingMethod.DEFAULT


def test_router_attributes_give_the_method_of_unknown_families() -> None:
    block = Block()
    block.gate.norm_topk_prob = False
    assert discover(Model(block)).routing.method is RoutingMethod.DEFAULT


class NoRouterBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()
        self.w_gate = nn.Linear(HIDDEN, NUM_EXPERTS)


class ListExpertsBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Router()
        self.experts = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(NUM_EXPERTS)])


UNSUPPORTED = [
    (Model(nn.Linear(HIDDEN, HIDDEN)), r"model \(Model\): expected MoE layers .*found none"),
    (Model(NoRouterBlock()), r"layers\.0 \(NoRouterBlock\): unsupported MoE block: .*router"),
    (Model(ListExpertsBlock()), r"layers\.0 \(ListExpertsBlock\): .*experts are a ModuleList"),
    (
        Model(Block(router=Router(logits_only=True))),
        r"layers\.0\.gate \(Router\): unsupported router: expected forward to return",
    ),
    (Block(), r"<model> \(Block\): expected the MoE block inside a decoder layer"),
]


@pytest.mark.parametrize(("model", "match"), UNSUPPORTED)
def test_unsupported_structures_name_the_module(model: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        discover(model, routing=RoutingSpec(method="default"))


def test_dense_hf_model_has_no_moe_layers() -> None:
    model = tiny_moe("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ValueError, match=r"model \(Qwen3MoeForCausalLM\): expected MoE layers"):
        discover(model)
