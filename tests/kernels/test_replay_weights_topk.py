"""Tests of routing_kernels.replay_weights.replay_topk: trace ids and recomputed weights on
replayed rows, the router's own outputs elsewhere; reference vs float64 math, Triton vs
reference, gradients, errors, and no host synchronization on CUDA.

Legend: T tokens, E experts, K ids per row, L layers of a [T, L, K] trace tensor.

``TRITON_INTERPRET=1 python -m pytest -m triton tests/kernels/test_replay_weights_topk.py``
runs the Triton tests on CPU (on CUDA when there is a device).
"""

from __future__ import annotations

import pytest
import torch

from routing_kernels.replay_weights import (
    replay_topk,
    replay_topk_reference,
    replay_topk_triton,
    replay_weights_reference,
)
from routing_kernels.routing_method import RoutingMethod

METHODS = list(RoutingMethod)
SHAPES = [(1, 8, 2), (7, 60, 4), (64, 128, 8), (300, 256, 8)]
MASKS = ["random", "all", "none"]


def _scale(method: RoutingMethod) -> float:
    return 2.5 if method is RoutingMethod.DEEPSEEK_V3 else 1.0


def _case(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    method: RoutingMethod,
    rng: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    mask: str = "random",
    trace_dtype: torch.dtype = torch.uint8,
) -> dict[str, torch.Tensor]:
    """Logits, the router's own (ids, weights) and a replay mask; trace ids as a strided
    ``[:, 1]`` view of a [T, 3, K] tensor, as the controller hands them over."""
    top_k = 1 if method is RoutingMethod.LLAMA4 else top_k

    def ids(*lead: int) -> torch.Tensor:
        return torch.rand(*lead, num_experts, generator=rng).argsort(-1)[..., :top_k]

    replay_T = {
        "random": torch.rand(num_tokens, generator=rng) < 0.6,
        "all": torch.ones(num_tokens, dtype=torch.bool),
        "none": torch.zeros(num_tokens, dtype=torch.bool),
    }[mask]
    return dict(
        logits_TE=(3.0 * torch.randn(num_tokens, num_experts, generator=rng)).to(dtype),
        native_weights_TK=torch.rand(num_tokens, top_k, generator=rng).to(dtype),
        native_ids_TK=ids(num_tokens),
        trace_ids_TK=ids(num_tokens, 3).to(trace_dtype)[:, 1],
        replay_T=replay_T,
    )


def _run(fn, case: dict, method: RoutingMethod, grad_TK: torch.Tensor, device="cpu"):
    """(weights, ids, dL/dlogits, dL/dnative_weights) of ``fn`` on ``case`` moved to
    ``device``, back on the CPU."""
    inputs = {name: t.to(device) for name, t in case.items()}
    logits_TE = inputs["logits_TE"].requires_grad_()
    native_TK = inputs["native_weights_TK"].requires_grad_()
    weights_TK, ids_TK = fn(
        logits_TE, native_TK, inputs["native_ids_TK"], inputs["trace_ids_TK"], inputs["replay_T"],
        method, routed_scaling_factor=_scale(method),
    )  # fmt: skip
    grad_logits_TE, grad_native_TK = torch.autograd.grad(
        weights_TK, (logits_TE, native_TK), grad_TK.to(device)
    )
    return (
        weights_TK.detach().cpu(),
        ids_TK.cpu(),
        grad_logits_TE.cpu(),
        grad_native_TK.cpu(),
    )


# --------------------------------------------------------------------------------------------
# Reference path (always runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_reference_replays_trace_rows_and_keeps_native_rows(method, dtype, rng):
    case = _case(40, 16, 4, method, rng, dtype=dtype)
    grad_TK = torch.randn(case["native_ids_TK"].shape, generator=rng).to(dtype)
    weights_TK, ids_TK, grad_logits_TE, grad_native_TK = _run(
        replay_topk_reference, case, method, grad_TK
    )
    rep_T = case["replay_T"]
    assert ids_TK.dtype == torch.int64 and weights_TK.dtype == dtype
    assert torch.equal(ids_TK[rep_T], case["trace_ids_TK"][rep_T].long())
    assert torch.equal(ids_TK[~rep_T], case["native_ids_TK"][~rep_T])
    assert torch.equal(weights_TK[~rep_T], case["native_weights_TK"][~rep_T])
    # Replayed rows: the float64 math on the same (rounded) logits, cast like the router's.
    logits64_TE = case["logits_TE"][rep_T].double().requires_grad_()
    expected_TK = replay_weights_reference(
        logits64_TE, ids_TK[rep_T], method, routed_scaling_factor=_scale(method)
    )
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=4e-3)
    torch.testing.assert_close(weights_TK[rep_T].double(), expected_TK, **tolerance)
    (expected_grad_TE,) = torch.autograd.grad(expected_TK, logits64_TE, grad_TK[rep_T].double())
    torch.testing.assert_close(grad_logits_TE[rep_T].double(), expected_grad_TE, **tolerance)
    assert torch.count_nonzero(grad_logits_TE[~rep_T]) == 0
    assert torch.equal(grad_native_TK[~rep_T], grad_TK[~rep_T])
    assert torch.count_nonzero(grad_native_TK[rep_T]) == 0


def test_dispatch_on_cpu_is_the_reference(rng):
    method = RoutingMethod.RENORMALIZE_NAIVE
    case = _case(9, 8, 2, method, rng)
    grad_TK = torch.randn(9, 2, generator=rng)
    got = _run(replay_topk, case, method, grad_TK)
    want = _run(replay_topk_reference, case, method, grad_TK)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _bad(case: dict, change: str) -> dict:
    case = dict(case)
    if change == "native_weights_shape":
        case["native_weights_TK"] = case["native_weights_TK"][:, :1]
    elif change == "native_ids_rows":
        case["native_ids_TK"] = case["native_ids_TK"][:-1]
    elif change == "native_weights_dtype":
        case["native_weights_TK"] = case["native_ids_TK"].clone()
    elif change == "native_ids_dtype":
        case["native_ids_TK"] = case["native_ids_TK"].float()
    elif change == "replay_dtype":
        case["replay_T"] = case["replay_T"].int()
    elif change == "replay_shape":
        case["replay_T"] = case["replay_T"][:-1]
    elif change == "trace_rows":
        case["trace_ids_TK"] = case["trace_ids_TK"][:-1]
    return case


BAD = [
    ("native_weights_shape", r"native_weights: expected shape \(6, 2\) .*got \(6, 1\)"),
    ("native_ids_rows", r"native_ids: expected shape \(6, 2\) .*got \(5, 2\)"),
    (
        "native_weights_dtype",
        r"native_weights: expected a floating-point dtype, got torch.int64",
    ),
    ("native_ids_dtype", r"native_ids: expected an integer dtype, got torch.float32"),
    (
        "replay_dtype",
        r"replay: expected a bool tensor of shape \(6,\), got torch.int32",
    ),
    (
        "replay_shape",
        r"replay: expected a bool tensor of shape \(6,\), got torch.bool \(5,\)",
    ),
    ("trace_rows", r"ids: expected 6 rows \(logits.shape\[0\]\), got 5"),
]
IMPLS = [
    replay_topk_reference,
    pytest.param(replay_topk_triton, marks=pytest.mark.triton),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("change", "match"), BAD)
def test_bad_inputs_raise(impl, change, match, rng):
    case = _bad(_case(6, 8, 2, RoutingMethod.DEFAULT, rng), change)
    with pytest.raises(ValueError, match=match):
        impl(*case.values(), RoutingMethod.DEFAULT)


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_types_raise(impl, rng):
    case = _case(6, 8, 2, RoutingMethod.DEFAULT, rng)
    args = list(case.values())
    for index, name in [(1, "native_weights"), (2, "native_ids"), (4, "replay")]:
        bad = list(args)
        bad[index] = bad[index].tolist()
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got list"):
            impl(*bad, RoutingMethod.DEFAULT)


# --------------------------------------------------------------------------------------------
# Triton (CUDA, or CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, method, mask, rng, triton_device):
    case = _case(*shape, method, rng, mask=mask)
    grad_TK = torch.randn(case["native_ids_TK"].shape, generator=rng)
    want = _run(replay_topk_reference, case, method, grad_TK)
    got = _run(replay_topk_triton, case, method, grad_TK, triton_device)
    rep_T = case["replay_T"]
    assert torch.equal(got[1], want[1])  # ids
    assert torch.equal(got[0][~rep_T], want[0][~rep_T])  # native weights, bit for bit
    assert torch.equal(got[3], want[3])  # dL/dnative_weights
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(got[2][~rep_T]) == 0


@pytest.mark.triton
@pytest.mark.parametrize("trace_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("method", [RoutingMethod.DEFAULT, RoutingMethod.DEEPSEEK_V3])
def test_triton_bfloat16_and_trace_dtypes(method, trace_dtype, rng, triton_device):
    """What training runs: bf16 logits and router weights, compact trace ids, int64 native."""
    case = _case(50, 128, 8, method, rng, dtype=torch.bfloat16, trace_dtype=trace_dtype)
    grad_TK = torch.randn(case["native_ids_TK"].shape, generator=rng).bfloat16()
    want = _run(replay_topk_reference, case, method, grad_TK)
    got = _run(replay_topk_triton, case, method, grad_TK, triton_device)
    rep_T = case["replay_T"]
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.int64
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0][~rep_T], case["native_weights_TK"][~rep_T])
    assert torch.equal(got[3], want[3])
    # Both round a float32 weight to bf16: at most one bf16 step apart.
    torch.testing.assert_close(got[0], want[0], rtol=8e-3, atol=4e-3)
    torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-3)


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_triton_gradcheck(method, rng, triton_device):
    case = _case(6, 10, 3, method, rng, dtype=torch.float64)
    case = {name: t.to(triton_device) for name, t in case.items()}
    logits_TE = case.pop("logits_TE").requires_grad_()
    native_TK = case.pop("native_weights_TK").requires_grad_()

    def weights(x_TE: torch.Tensor, n_TK: torch.Tensor) -> torch.Tensor:
        return replay_topk_triton(
            x_TE, n_TK, case["native_ids_TK"], case["trace_ids_TK"], case["replay_T"], method,
            routed_scaling_factor=_scale(method),
        )[0]  # fmt: skip

    assert torch.autograd.gradcheck(weights, (logits_TE, native_TK))


@pytest.mark.triton
def test_triton_never_reads_trace_ids_of_native_rows(rng, triton_device):
    """The trace holds garbage (out-of-range ids) on rows it does not replay: no effect."""
    method = RoutingMethod.RENORMALIZE
    case = _case(33, 8, 2, method, rng)
    grad_TK = torch.randn(33, 2, generator=rng)
    clean = _run(replay_topk_triton, case, method, grad_TK, triton_device)
    dirty = dict(case, trace_ids_TK=case["trace_ids_TK"].clone())
    dirty["trace_ids_TK"][~case["replay_T"]] = 200
    got = _run(replay_topk_triton, dirty, method, grad_TK, triton_device)
    for a, b in zip(got, clean, strict=True):
        assert torch.equal(a, b)


@pytest.mark.triton
def test_triton_empty_batch(rng, triton_device):
    method = RoutingMethod.DEFAULT
    case = _case(0, 8, 2, method, rng)
    weights_TK, ids_TK, grad_logits_TE, grad_native_TK = _run(
        replay_topk_triton, case, method, torch.zeros(0, 2), triton_device
    )
    assert weights_TK.shape == ids_TK.shape == grad_native_TK.shape == (0, 2)
    assert grad_logits_TE.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("method", [RoutingMethod.RENORMALIZE_NAIVE, RoutingMethod.DEFAULT])
def test_cuda_forward_and_backward_never_synchronize(method, rng):
    case = _case(4096, 128, 8, method, rng, dtype=torch.bfloat16)
    case = {name: t.cuda() for name, t in case.items()}
    logits_TE = case.pop("logits_TE").requires_grad_()
    native_TK = case.pop("native_weights_TK").requires_grad_()

    def step() -> None:
        weights_TK, _ = replay_topk(logits_TE, native_TK, *case.values(), method)
        weights_TK.float().sum().backward()

    step()  # compiles both kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits_TE.grad is not None and native_TK.grad is not None
