"""The grouped-GEMM experts forward against HF's eager experts: values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_moe import EXPECTED, FAMILIES, NUM_EXPERTS, TOP_K, VOCAB, experts_modules, tiny_moe

from replay.grouped_experts import (
    _use_grouped_mm,
    grouped_experts_forward,
    use_grouped_experts,
)
from replay.patch import patch
from replay.routed_experts import RoutedExperts

HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def routing(rng: torch.Generator, num_tokens: int, num_experts: int = NUM_EXPERTS):
    """Random distinct ids per token drawn from the first half of the experts (so some experts
    get no token) and random positive weights."""
    ids_TK = torch.rand(num_tokens, num_experts // 2, generator=rng).argsort(-1)[:, :TOP_K]
    weights_TK = torch.rand(num_tokens, TOP_K, generator=rng) + 0.1
    return ids_TK, weights_TK


def eager(experts, hidden_TH, ids_TK, weights_TK):
    """HF's own experts forward (the models are built with experts_implementation="eager")."""
    return type(experts).forward(experts, hidden_TH, ids_TK, weights_TK)


def run(forward, experts, hidden_TH, ids_TK, weights_TK, probe_TH):
    hidden_TH = hidden_TH.detach().requires_grad_()
    weights_TK = weights_TK.detach().requires_grad_()
    experts.zero_grad()
    out_TH = forward(experts, hidden_TH, ids_TK, weights_TK)
    (out_TH * probe_TH).sum().backward()
    grads = (
        hidden_TH.grad,
        weights_TK.grad,
        experts.gate_up_proj.grad,
        experts.down_proj.grad,
    )
    return (out_TH, *grads)


OUTPUTS = ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")
BACKENDS = [
    "loop",
    pytest.param("grouped_mm", marks=pytest.mark.skipif(not HAS_GROUPED_MM, reason="no kernel")),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_forward_matches_eager_experts(
    family: str, backend: str, rng: torch.Generator
) -> None:
    experts = copy.deepcopy(experts_modules(tiny_moe(family))[0])
    if backend == "loop":  # float64: the comparison is exact up to summation order
        experts = experts.double()
    dtype = experts.gate_up_proj.dtype
    hidden_TH = torch.randn(11, experts.gate_up_proj.shape[-1], generator=rng).to(dtype)
    ids_TK, weights_TK = routing(rng, 11)
    probe_TH = torch.randn(hidden_TH.shape, generator=rng).to(dtype)

    def grouped(*args):
        return grouped_experts_forward(*args, backend=backend)

    expected = run(eager, experts, hidden_TH, ids_TK, weights_TK.to(dtype), probe_TH)
    got = run(grouped, experts, hidden_TH, ids_TK, weights_TK.to(dtype), probe_TH)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(OUTPUTS, got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance, msg=name)


def test_grouped_forward_handles_no_tokens(rng: torch.Generator) -> None:
    experts = experts_modules(tiny_moe("olmoe"))[0]
    hidden_TH = torch.randn(0, 32)
    out = grouped_experts_forward(
        experts,
        hidden_TH,
        torch.zeros(0, TOP_K, dtype=torch.long),
        torch.zeros(0, TOP_K),
    )
    assert out.shape == (0, 32)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_use_grouped_experts_keeps_model_outputs_and_replay(
    family: str, rng: torch.Generator
) -> None:
    model = tiny_moe(family)
    grouped = copy.deepcopy(model)
    names = use_grouped_experts(grouped, backend="loop")
    assert names == [f"model.layers.{i}.mlp.experts" for i in EXPECTED[family][0]]
    assert "forward" not in experts_modules(model)[0].__dict__  # per instance only
    x = torch.randint(0, VOCAB, (2, 6), generator=rng)
    torch.testing.assert_close(grouped(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)

    ids = torch.rand(2, 5, 2, NUM_EXPERTS, generator=rng).argsort(-1)[..., :TOP_K]
    traces = [RoutedExperts(ids[b].numpy(), EXPECTED[family][0], NUM_EXPERTS) for b in range(2)]
    logits = []
    for m in (model, grouped):
        with patch(m).replay(traces):
            out = m(x).logits
        out.sum().backward()
        logits.append(out)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unsupported_experts_and_backends_raise() -> None:
    model = tiny_moe("mixtral")
    experts_modules(model)[1].has_bias = True
    bias = r"model\.layers\.1\.mlp\.experts \(MixtralExperts\): expected has_bias=False"
    with pytest.raises(ValueError, match=bias):
        use_grouped_experts(model)
    with pytest.raises(ValueError, match="backend: expected one of"):
        use_grouped_experts(model, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_cuda_bfloat16_grouped_mm_matches_eager(
    family: str, backend: str, rng: torch.Generator
) -> None:
    model = tiny_moe(family, hidden_size=64, moe_intermediate_size=32, intermediate_size=32)
    experts = experts_modules(model)[0].to("cuda", torch.bfloat16)
    hidden_TH = torch.randn(257, 64, generator=rng).to("cuda", torch.bfloat16)
    ids_TK, weights_TK = routing(rng, 257)
    ids_TK, weights_TK = ids_TK.cuda(), weights_TK.cuda()
    probe_TH = torch.randn(hidden_TH.shape, generator=rng).to("cuda", torch.bfloat16)
    expected = run(eager, experts, hidden_TH, ids_TK, weights_TK, probe_TH)
    assert _use_grouped_mm(backend, hidden_TH, experts.gate_up_proj, experts.down_proj)

    def grouped(*args):
        return grouped_experts_forward(*args, backend=backend)

    got = run(grouped, experts, hidden_TH, ids_TK, weights_TK, probe_TH)
    for name, a, b in zip(OUTPUTS, got, expected, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.gpu
def test_cuda_grouped_mm_forward_never_synchronizes(rng: torch.Generator) -> None:
    """The expert offsets come from a search over the sorted ids, not ``bincount`` (which reads
    the ids' min and max back to the host): the forward queues without waiting on the GPU."""
    model = tiny_moe("qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=32)
    experts = experts_modules(model)[0].to("cuda", torch.bfloat16)
    hidden_TH = torch.randn(257, 64, generator=rng).to("cuda", torch.bfloat16)
    ids_TK, weights_TK = routing(rng, 257)
    args = (experts, hidden_TH, ids_TK.cuda(), weights_TK.to("cuda", torch.bfloat16))
    expected = grouped_experts_forward(*args, backend="grouped_mm")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_TH = grouped_experts_forward(*args, backend="grouped_mm")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out_TH, expected)
