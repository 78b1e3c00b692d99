"""``replay.patch``: per-instance patching, one controller per model, OFF mode untouched."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from tiny_moe import (
    EXPECTED,
    FAMILIES,
    NUM_EXPERTS,
    TOP_K,
    VOCAB,
    experts_modules,
    tiny_moe,
)

from replay.controller import Mode, ReplayController
from replay.patch import patch
from replay.routed_experts import RoutedExperts
from routing_kernels import RoutingMethod


def random_traces(rng: torch.Generator, batch: int, seq_len: int, moe_layers) -> list:
    ids = torch.rand(batch, seq_len - 1, len(moe_layers), NUM_EXPERTS, generator=rng)
    ids = ids.argsort(-1)[..., :TOP_K]
    return [RoutedExperts(ids[b].numpy(), moe_layers, NUM_EXPERTS) for b in range(batch)]


def tokens(rng: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=rng)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_describes_the_model(family: str) -> None:
    ctl = patch(tiny_moe(family))
    moe_layers, method, factor = EXPECTED[family]
    assert isinstance(ctl, ReplayController) and ctl.mode is Mode.OFF
    assert ctl.moe_layers == moe_layers
    assert (ctl.num_experts, ctl.top_k) == (NUM_EXPERTS, TOP_K)
    assert ctl.routing.method is RoutingMethod[method]
    assert ctl.routing.routed_scaling_factor == factor


def test_patching_twice_returns_the_same_controller() -> None:
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    assert patch(model) is ctl
    assert patch(model, method="renormalize_naive") is ctl
    with pytest.raises(ValueError, match="method: expected RENORMALIZE_NAIVE .* got DEFAULT"):
        patch(model, method="default")
    with pytest.raises(ValueError, match="routed_scaling_factor: expected None without method="):
        patch(model, routed_scaling_factor=2.0)


def test_patching_a_submodule_of_a_patched_model_raises() -> None:
    model = tiny_moe("mixtral")
    patch(model)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate: expected an unpatched router"):
        patch(model.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_off_mode_is_bit_identical_to_the_unpatched_model(
    family: str, rng: torch.Generator
) -> None:
    model = tiny_moe(family)
    unpatched = copy.deepcopy(model)
    ctl = patch(model)
    x = tokens(rng, 2, 6)
    assert torch.equal(model(x).logits, unpatched(x).logits)
    # Also while a replayed forward's outputs (so a possible recompute) are still alive.
    with ctl.replay(random_traces(rng, 2, 6, ctl.moe_layers)):
        alive = model(x).logits
    assert alive.requires_grad and ctl.mode is Mode.OFF
    assert torch.equal(model(x).logits, unpatched(x).logits)


def test_patching_leaves_the_class_alone(rng: torch.Generator) -> None:
    model = tiny_moe("olmoe")
    router_class = type(model.model.layers[0].mlp.gate)
    forward = router_class.forward
    ctl = patch(model)
    assert router_class.forward is forward
    other = tiny_moe("olmoe")  # same class, same weights, not patched
    assert "forward" not in other.model.layers[0].mlp.gate.__dict__
    x = tokens(rng, 1, 5)
    with ctl.replay(random_traces(rng, 1, 5, ctl.moe_layers)):
        replayed = model(x).logits
        native = other(x).logits
    assert torch.equal(native, tiny_moe("olmoe")(x).logits)
    assert not torch.allclose(replayed, native)


def test_two_patched_models_do_not_interfere(rng: torch.Generator) -> None:
    model_a, model_b = tiny_moe("qwen3_moe", seed=1), tiny_moe("glm4_moe", seed=2)
    reference_b = copy.deepcopy(model_b)
    ctl_a, ctl_b = patch(model_a), patch(model_b)
    x = tokens(rng, 2, 6)
    traces_a = random_traces(rng, 2, 6, ctl_a.moe_layers)
    seen_b: list[torch.Tensor] = []
    for experts in experts_modules(model_b):
        experts.register_forward_pre_hook(lambda m, args: seen_b.append(args[1]))

    with ctl_a.replay(traces_a), ctl_b.record() as rec_b:
        assert (ctl_a.mode, ctl_b.mode) == (Mode.REPLAY, Mode.RECORD)
        replayed_a = model_a(x).logits
        native_b = model_b(x).logits
    assert torch.equal(native_b, reference_b(x).logits)
    for position, ids_TK in enumerate(seen_b):  # B recorded its own native routing
        recorded = np.stack([t.ids[:, position] for t in rec_b.traces])
        assert recorded.tolist() == ids_TK.view(2, 6, TOP_K)[:, :5].tolist()
    with ctl_a.replay(traces_a):
        assert torch.equal(model_a(x).logits, replayed_a)
    assert not torch.allclose(replayed_a, model_a(x).logits)


def test_a_deep_copy_of_a_patched_model_is_patched_independently(
    rng: torch.Generator,
) -> None:
    model = tiny_moe("deepseek_v3")
    ctl = patch(model)
    twin = copy.deepcopy(model)
    twin_ctl = patch(twin)
    assert twin_ctl is not ctl and twin_ctl.layers[0].router is twin.model.layers[1].mlp.gate
    x = tokens(rng, 1, 6)
    native = model(x).logits
    with ctl.replay(random_traces(rng, 1, 6, ctl.moe_layers)):
        replayed = model(x).logits
        assert torch.equal(twin(x).logits, native)
    with twin_ctl.replay(random_traces(rng, 1, 6, ctl.moe_layers)):
        assert torch.equal(model(x).logits, native)
        assert not torch.allclose(twin(x).logits, native)
    assert not torch.allclose(replayed, native)


def test_off_mode_skips_the_controller_once_no_replayed_forward_is_alive(
    rng: torch.Generator, monkeypatch
) -> None:
    model = tiny_moe("qwen3_moe")
    ctl = patch(model)
    calls = []
    select_topk = ctl.select_topk
    monkeypatch.setattr(ctl, "select_topk", lambda *args: calls.append(1) or select_topk(*args))
    x = tokens(rng, 1, 5)
    model(x)
    assert calls == []  # OFF: the router output goes straight to the experts
    with ctl.replay(random_traces(rng, 1, 5, ctl.moe_layers)):
        alive = model(x).logits
    assert len(calls) == 2
    model(x)  # a recompute of `alive` may still come: routers consult the controller
    assert len(calls) == 4
    del alive
    gc.collect()
    model(x)
    assert len(calls) == 4


def test_routers_are_untouched_while_nothing_needs_the_seam(
    rng: torch.Generator,
) -> None:
    """OFF with no replayed forward alive: each router's forward is its class's, so the patched
    model routes exactly as the unpatched one at no cost; the seam is there only while a
    context or a possible recompute of a replayed forward needs it."""
    model = tiny_moe("qwen3_moe")
    routers = [model.model.layers[i].mlp.gate for i in EXPECTED["qwen3_moe"][0]]
    ctl = patch(model)
    x = tokens(rng, 1, 5)

    def seams_installed() -> list[bool]:
        return ["forward" in router.__dict__ for router in routers]

    assert seams_installed() == [False, False]
    with ctl.replay(random_traces(rng, 1, 5, ctl.moe_layers)):
        assert seams_installed() == [True, True]
        alive = model(x).logits
    assert seams_installed() == [True, True]  # alive's backward may recompute
    with ctl.record():
        model(x)
    assert seams_installed() == [True, True]
    del alive
    gc.collect()
    assert seams_installed() == [False, False]
    with torch.no_grad(), ctl.replay(random_traces(rng, 1, 5, ctl.moe_layers)):
        model(x)  # no graph: nothing to recompute
    assert seams_installed() == [False, False]


def test_a_forward_the_router_already_had_is_kept_and_restored(
    rng: torch.Generator,
) -> None:
    model = tiny_moe("olmoe")
    router = model.model.layers[0].mlp.gate
    calls = []

    def own_forward(hidden):  # e.g. another library's instance-level wrapper
        calls.append(1)
        return type(router).forward(router, hidden)

    router.forward = own_forward
    ctl = patch(model)
    calls.clear()  # patch's probe called it
    x = tokens(rng, 1, 5)
    with ctl.replay(random_traces(rng, 1, 5, ctl.moe_layers)):
        replayed = model(x).logits
    assert len(calls) == 1 and router.forward is not own_forward
    del replayed
    gc.collect()
    assert router.forward is own_forward
    model(x)
    assert len(calls) == 2


def test_a_wrapper_installed_over_the_seam_keeps_working(rng: torch.Generator) -> None:
    """Another library wraps the router's forward while the seam is installed: the seam stays
    inside the wrapper (passing through when not needed) and replay still forces the ids."""
    model = tiny_moe("qwen3_moe")
    reference = copy.deepcopy(model)
    ctl = patch(model)
    router = model.model.layers[2].mlp.gate
    x = tokens(rng, 1, 5)
    traces = random_traces(rng, 1, 5, ctl.moe_layers)
    with ctl.replay(traces):
        inner = router.forward
        router.forward = lambda *args, **kwargs: inner(*args, **kwargs)
        replayed = model(x).logits.detach()
    gc.collect()
    assert torch.equal(model(x).logits, reference(x).logits)  # OFF again: passes through
    with ctl.replay(traces):
        assert torch.equal(model(x).logits, replayed)
    gc.collect()
    assert torch.equal(model(x).logits, reference(x).logits)
