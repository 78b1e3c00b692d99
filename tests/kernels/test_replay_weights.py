"""Tests of routing_kernels.replay_weights: float64 oracle, gradcheck, Triton vs reference,
routing, errors.

Legend: T tokens, E experts, K replayed ids per row.

Plain ``python -m pytest tests/kernels/test_replay_weights.py`` runs the reference tests;
``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_replay_weights.py`` adds the Triton
ones on CPU (they run on CUDA when there is a device).
"""

from __future__ import annotations

import math

import pytest
import torch

from routing_kernels.replay_weights import (
    replay_weights,
    replay_weights_reference,
    replay_weights_triton,
)
from routing_kernels.route import route_reference
from routing_kernels.routing_method import RoutingMethod

METHODS = list(RoutingMethod)
DEEPSEEK_SCALE = 2.5
# (T, E, K): every T in {1, 7, 64, 1000}, E in {8, 60, 128, 256}, K in {1, 2, 4, 8} appears,
# plus K = 32 and an E above one 512-wide chunk of the kernels' expert loop.
SHAPES = [
    (1, 8, 1),
    (7, 60, 2),
    (64, 128, 4),
    (1000, 256, 8),
    (7, 8, 8),
    (64, 60, 8),
    (1, 256, 2),
    (7, 60, 32),
    (5, 1000, 4),
]


def _top_k(method: RoutingMethod, top_k: int) -> int:
    return 1 if method is RoutingMethod.LLAMA4 else top_k


def _scale(method: RoutingMethod) -> float:
    return DEEPSEEK_SCALE if method is RoutingMethod.DEEPSEEK_V3 else 1.0


def _random_ids(
    num_tokens: int, num_experts: int, top_k: int, rng: torch.Generator, dtype=torch.int64
) -> torch.Tensor:
    """Distinct random ids per row: the first K of a random permutation of the experts."""
    return torch.rand(num_tokens, num_experts, generator=rng).argsort(dim=1)[:, :top_k].to(dtype)


def _random_logits(
    num_tokens: int, num_experts: int, rng: torch.Generator, dtype=torch.float32
) -> torch.Tensor:
    """Logits spread wide enough that the softmaxes are far from uniform."""
    return (3.0 * torch.randn(num_tokens, num_experts, generator=rng, dtype=torch.float64)).to(
        dtype
    )


def _oracle(
    logits_TE: torch.Tensor, ids_TK: torch.Tensor, method: RoutingMethod, scale: float
) -> torch.Tensor:
    """The weights in float64, written out from the definitions (DESIGN.md, HF DeepSeek-V3)."""
    x_TE = logits_TE.double()
    index_TK = ids_TK.long()
    if method is RoutingMethod.DEFAULT:
        e_TE = torch.exp(x_TE - x_TE.max(dim=1, keepdim=True).values)
        return (e_TE / e_TE.sum(dim=1, keepdim=True)).gather(1, index_TK)
    x_TK = x_TE.gather(1, index_TK)
    if method in (RoutingMethod.RENORMALIZE, RoutingMethod.RENORMALIZE_NAIVE):
        e_TK = torch.exp(x_TK - x_TK.max(dim=1, keepdim=True).values)
        return e_TK / e_TK.sum(dim=1, keepdim=True)
    s_TK = 1.0 / (1.0 + torch.exp(-x_TK))
    if method is RoutingMethod.DEEPSEEK_V3:
        return s_TK / (s_TK.sum(dim=1, keepdim=True) + 1e-20) * scale
    return s_TK


def _reference_fwd_bwd(
    logits_TE: torch.Tensor, ids_TK: torch.Tensor, method: RoutingMethod, grad_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x_TE = logits_TE.detach().clone().requires_grad_()
    weights_TK = replay_weights_reference(
        x_TE, ids_TK, method, routed_scaling_factor=_scale(method)
    )
    weights_TK.backward(grad_TK)
    return weights_TK.detach(), x_TE.grad


def _triton_fwd_bwd(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod,
    grad_TK: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_TE = logits_TE.detach().to(device).requires_grad_()
    weights_TK = replay_weights_triton(
        x_TE, ids_TK.to(device), method, routed_scaling_factor=_scale(method)
    )
    weights_TK.backward(grad_TK.to(device))
    return weights_TK.detach().cpu(), x_TE.grad.cpu()


# --------------------------------------------------------------------------------------------
# Reference path (always runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_oracle(shape, method, dtype, rng):
    num_tokens, num_experts, top_k = shape
    top_k = _top_k(method, top_k)
    logits_TE = _random_logits(num_tokens, num_experts, rng, dtype)
    ids_TK = _random_ids(num_tokens, num_experts, top_k, rng)
    weights_TK = replay_weights(logits_TE, ids_TK, method, routed_scaling_factor=_scale(method))
    assert weights_TK.dtype == torch.float32
    assert weights_TK.shape == (num_tokens, top_k)
    # Scores are float32 computed from the (rounded) logits, so the oracle sees the same logits.
    expected_TK = _oracle(logits_TE, ids_TK, method, _scale(method)).float()
    torch.testing.assert_close(weights_TK, expected_TK, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_reference_gradcheck(method, rng):
    top_k = _top_k(method, 3)
    logits_TE = _random_logits(6, 10, rng, torch.float64).requires_grad_()
    ids_TK = _random_ids(6, 10, top_k, rng)
    assert torch.autograd.gradcheck(
        lambda x: replay_weights_reference(x, ids_TK, method, routed_scaling_factor=_scale(method)),
        (logits_TE,),
    )


@pytest.mark.parametrize("method", METHODS)
def test_reference_gradient_has_logits_dtype_and_zeros_off_ids(method, rng):
    top_k = _top_k(method, 4)
    logits_TE = _random_logits(9, 16, rng, torch.bfloat16).requires_grad_()
    ids_TK = _random_ids(9, 16, top_k, rng, torch.uint8)
    weights_TK = replay_weights(logits_TE, ids_TK, method, routed_scaling_factor=_scale(method))
    weights_TK.backward(torch.randn(weights_TK.shape, generator=rng))
    assert logits_TE.grad.dtype == torch.bfloat16
    off_ids_TE = torch.ones(9, 16, dtype=torch.bool).scatter_(1, ids_TK.long(), False)
    if method is not RoutingMethod.DEFAULT:
        assert (logits_TE.grad[off_ids_TE] == 0).all()
    else:
        assert (logits_TE.grad[off_ids_TE] != 0).any()


def test_method_accepts_lower_case_name(rng):
    logits_TE = _random_logits(4, 8, rng)
    ids_TK = _random_ids(4, 8, 2, rng)
    by_name = replay_weights(logits_TE, ids_TK, "deepseek_v3", routed_scaling_factor=1.5)
    by_member = replay_weights(
        logits_TE, ids_TK, RoutingMethod.DEEPSEEK_V3, routed_scaling_factor=1.5
    )
    torch.testing.assert_close(by_name, by_member, rtol=0, atol=0)


def test_cpu_dispatches_to_reference(rng):
    logits_TE = _random_logits(3, 8, rng).requires_grad_()
    weights_TK = replay_weights(logits_TE, _random_ids(3, 8, 2, rng), "renormalize")
    assert type(weights_TK.grad_fn).__name__ != "_ReplayWeightsBackward"


# --------------------------------------------------------------------------------------------
# Triton path (CUDA, or CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_triton_gradcheck(method, rng, triton_device):
    top_k = _top_k(method, 3)
    logits_TE = _random_logits(6, 11, rng, torch.float64).to(triton_device).requires_grad_()
    ids_TK = _random_ids(6, 11, top_k, rng).to(triton_device)
    assert torch.autograd.gradcheck(
        lambda x: replay_weights_triton(x, ids_TK, method, routed_scaling_factor=_scale(method)),
        (logits_TE,),
    )


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_float32(shape, method, rng, triton_device):
    num_tokens, num_experts, top_k = shape
    top_k = _top_k(method, top_k)
    logits_TE = _random_logits(num_tokens, num_experts, rng)
    ids_TK = _random_ids(num_tokens, num_experts, top_k, rng)
    grad_TK = torch.randn(num_tokens, top_k, generator=rng)
    ref_w_TK, ref_grad_TE = _reference_fwd_bwd(logits_TE, ids_TK, method, grad_TK)
    w_TK, grad_TE = _triton_fwd_bwd(logits_TE, ids_TK, method, grad_TK, triton_device)
    assert w_TK.dtype == torch.float32 and grad_TE.dtype == torch.float32
    torch.testing.assert_close(w_TK, _oracle(logits_TE, ids_TK, method, _scale(method)).float())
    torch.testing.assert_close(w_TK, ref_w_TK)
    torch.testing.assert_close(grad_TE, ref_grad_TE, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(64, 128, 8), (7, 60, 2)])
def test_triton_matches_reference_half_logits(shape, method, dtype, rng, triton_device):
    num_tokens, num_experts, top_k = shape
    top_k = _top_k(method, top_k)
    logits_TE = _random_logits(num_tokens, num_experts, rng, dtype)
    ids_TK = _random_ids(num_tokens, num_experts, top_k, rng, torch.uint8)
    grad_TK = torch.randn(num_tokens, top_k, generator=rng)
    ref_w_TK, ref_grad_TE = _reference_fwd_bwd(logits_TE, ids_TK, method, grad_TK)
    w_TK, grad_TE = _triton_fwd_bwd(logits_TE, ids_TK, method, grad_TK, triton_device)
    assert w_TK.dtype == torch.float32 and grad_TE.dtype == dtype
    torch.testing.assert_close(w_TK, ref_w_TK)
    # Both round the same float32 gradient to the half dtype; allow one ulp of the largest entry.
    ulp = torch.finfo(dtype).eps * ref_grad_TE.float().abs().max().item()
    torch.testing.assert_close(grad_TE.float(), ref_grad_TE.float(), rtol=0, atol=ulp)


@pytest.mark.triton
@pytest.mark.parametrize("ids_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("method", [RoutingMethod.DEFAULT, RoutingMethod.DEEPSEEK_V3])
def test_triton_strided_inputs_and_ids_dtypes(method, ids_dtype, rng, triton_device):
    """Column-major logits, ids sliced from a wider trace row, broadcast (stride-0) gradients."""
    logits_TE = _random_logits(37, 60, rng)
    wide_TK = _random_ids(37, 60, 6, rng, ids_dtype)
    ids_TK = wide_TK[:, 1:5]  # a non-contiguous view, as a trace layer slice would be
    x_TE = logits_TE.to(triton_device).t().contiguous().t().requires_grad_()
    weights_TK = replay_weights_triton(
        x_TE, ids_TK.to(triton_device), method, routed_scaling_factor=_scale(method)
    )
    weights_TK.sum().backward()  # autograd passes an expanded, stride-0 gradient
    ref_w_TK, ref_grad_TE = _reference_fwd_bwd(logits_TE, ids_TK, method, torch.ones(37, 4))
    torch.testing.assert_close(weights_TK.detach().cpu(), ref_w_TK)
    torch.testing.assert_close(x_TE.grad.cpu(), ref_grad_TE, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_triton_empty_batch(method, triton_device):
    top_k = _top_k(method, 2)
    logits_TE = torch.empty(0, 8, device=triton_device, requires_grad=True)
    ids_TK = torch.empty(0, top_k, dtype=torch.int32, device=triton_device)
    weights_TK = replay_weights_triton(
        logits_TE, ids_TK, method, routed_scaling_factor=_scale(method)
    )
    assert weights_TK.shape == (0, top_k)
    weights_TK.sum().backward()
    assert logits_TE.grad.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_dispatches_to_triton(method, rng):
    top_k = _top_k(method, 4)
    logits_TE = _random_logits(50, 64, rng).cuda().requires_grad_()
    ids_TK = _random_ids(50, 64, top_k, rng).cuda()
    weights_TK = replay_weights(logits_TE, ids_TK, method, routed_scaling_factor=_scale(method))
    assert type(weights_TK.grad_fn).__name__ == "_ReplayWeightsBackward"


# --------------------------------------------------------------------------------------------
# Consistency with routing
# --------------------------------------------------------------------------------------------


def _route_cases() -> list[tuple[RoutingMethod, dict]]:
    return [
        (RoutingMethod.DEFAULT, {}),
        (RoutingMethod.RENORMALIZE, {}),
        (RoutingMethod.RENORMALIZE_NAIVE, {}),
        (RoutingMethod.DEEPSEEK_V3, {"routed_scaling_factor": DEEPSEEK_SCALE}),
        (RoutingMethod.DEEPSEEK_V3, {"routed_scaling_factor": 1.0, "with_bias": True}),
        (
            RoutingMethod.DEEPSEEK_V3,
            {
                "routed_scaling_factor": DEEPSEEK_SCALE,
                "with_bias": True,
                "n_group": 8,
                "topk_group": 4,
            },
        ),
        (RoutingMethod.LLAMA4, {}),
    ]


def _route_then_replay(method, case, rng, replay_fn, device):
    case = dict(case)
    num_tokens, num_experts = 40, 64
    top_k = _top_k(method, 8)
    logits_TE = _random_logits(num_tokens, num_experts, rng)
    kwargs = {}
    if case.pop("with_bias", False):
        kwargs["correction_bias"] = torch.randn(num_experts, generator=rng)
    kwargs.update(case)
    weights_TK, ids_TK = route_reference(logits_TE, top_k, method, **kwargs)
    scale = kwargs.get("routed_scaling_factor", 1.0)
    replayed_TK = replay_fn(
        logits_TE.to(device), ids_TK.to(device), method, routed_scaling_factor=scale
    )
    torch.testing.assert_close(replayed_TK.cpu(), weights_TK.float(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(("method", "case"), _route_cases())
def test_replay_of_routed_ids_reproduces_route_weights(method, case, rng):
    _route_then_replay(method, case, rng, replay_weights, torch.device("cpu"))


@pytest.mark.triton
@pytest.mark.parametrize(("method", "case"), _route_cases())
def test_triton_replay_of_routed_ids_reproduces_route_weights(method, case, rng, triton_device):
    _route_then_replay(method, case, rng, replay_weights_triton, triton_device)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["reference", pytest.param("triton", marks=pytest.mark.triton)])
def impl(request):
    """(function, device) of one path; both must raise the same errors."""
    if request.param == "reference":
        return replay_weights_reference, torch.device("cpu")
    return replay_weights_triton, request.getfixturevalue("triton_device")


def _valid_inputs(rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return _random_logits(300, 16, rng), _random_ids(300, 16, 4, rng)


def _call(impl, logits, ids, method, **kwargs):
    fn, device = impl
    if isinstance(logits, torch.Tensor):
        logits = logits.to(device)
    if isinstance(ids, torch.Tensor):
        ids = ids.to(device)
    return fn(logits, ids, method, **kwargs)


def _case(make, method, match, **kwargs):
    return pytest.param(make, method, kwargs, match, id=match.split(":")[0] + "-" + method)


@pytest.mark.parametrize(
    ("make", "method", "kwargs", "match"),
    [
        _case(lambda x, i: (x[0], i), "renormalize",
              r"logits: expected a 2-D tensor \[T, E\] with E >= 1, got shape \(16,\)"),
        _case(lambda x, i: (x[:, :0], i[:, :0]), "renormalize",
              r"logits: expected a 2-D tensor \[T, E\] with E >= 1, got shape \(300, 0\)"),
        _case(lambda x, i: (x.long(), i), "renormalize",
              r"logits: expected dtype float16, bfloat16, float32 or float64, got torch.int64"),
        _case(lambda x, i: (x, i.float()), "renormalize",
              r"ids: expected an integer dtype, got torch.float32"),
        _case(lambda x, i: (x, i.bool()), "renormalize",
              r"ids: expected an integer dtype, got torch.bool"),
        _case(lambda x, i: (x, i[:, 0]), "renormalize",
              r"ids: expected a 2-D tensor \[T, K\] with K >= 1, got shape \(300,\)"),
        _case(lambda x, i: (x, i[:, :0]), "renormalize",
              r"ids: expected a 2-D tensor \[T, K\] with K >= 1, got shape \(300, 0\)"),
        _case(lambda x, i: (x, i[:299]), "renormalize",
              r"ids: expected 300 rows \(logits.shape\[0\]\), got 299"),
        _case(lambda x, i: (x[:, :3], i), "renormalize",
              r"ids: expected K <= E = 3 distinct ids per row, got K = 4"),
        _case(lambda x, i: (x, i), "llama4", r"ids: expected K == 1 for LLAMA4, got K = 4"),
        _case(lambda x, i: (x, i), "topk",
              r"method: expected a RoutingMethod or one of .*, got 'topk'"),
        _case(lambda x, i: (x, i), "deepseek_v3",
              r"routed_scaling_factor: expected a finite value > 0, got 0.0",
              routed_scaling_factor=0.0),
        _case(lambda x, i: (x, i), "deepseek_v3",
              r"routed_scaling_factor: expected a finite value > 0, got -1.0",
              routed_scaling_factor=-1.0),
        _case(lambda x, i: (x, i), "deepseek_v3",
              r"routed_scaling_factor: expected a finite value > 0, got nan",
              routed_scaling_factor=math.nan),
        _case(lambda x, i: (x, i), "deepseek_v3",
              r"routed_scaling_factor: expected a finite value > 0, got inf",
              routed_scaling_factor=math.inf),
        _case(lambda x, i: (x, i), "default",
              r"routed_scaling_factor: expected 1.0 for DEFAULT \(only DEEPSEEK_V3 uses it\), "
              r"got 2.0",
              routed_scaling_factor=2.0),
    ],
)  # fmt: skip
def test_invalid_inputs_raise_value_error(impl, make, method, kwargs, match, rng):
    logits, ids = make(*_valid_inputs(rng))
    with pytest.raises(ValueError, match=match):
        _call(impl, logits, ids, method, **kwargs)


@pytest.mark.parametrize(
    ("logits", "ids", "kwargs", "match"),
    [
        ([[0.0, 1.0]], torch.zeros(1, 1, dtype=torch.long), {},
         r"logits: expected a torch.Tensor, got list"),
        (torch.zeros(1, 2), [[0]], {}, r"ids: expected a torch.Tensor, got list"),
        (torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long), {"routed_scaling_factor": "2"},
         r"routed_scaling_factor: expected a float, got str"),
        (torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long), {"routed_scaling_factor": True},
         r"routed_scaling_factor: expected a float, got bool"),
    ],
)  # fmt: skip
def test_wrong_types_raise_type_error(impl, logits, ids, kwargs, match):
    with pytest.raises(TypeError, match=match):
        _call(impl, logits, ids, "deepseek_v3", **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("row", [0, 131, 299])
def test_out_of_range_ids_raise(impl, method, row, rng):
    logits_TE, ids_TK = _valid_inputs(rng)
    ids_TK = ids_TK[:, : _top_k(method, 4)].clone()
    ids_TK[row, -1] = 16 + row
    with pytest.raises(
        ValueError, match=rf"ids: expected values in \[0, 16\), got min 0 max {16 + row}"
    ):
        _call(impl, logits_TE, ids_TK, method, routed_scaling_factor=_scale(method))
    ids_TK[row, -1] = -3
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 16\), got min -3 max 15"):
        _call(impl, logits_TE, ids_TK, method, routed_scaling_factor=_scale(method))


@pytest.mark.parametrize("ids_dtype", [torch.uint8, torch.int16, torch.int64])
@pytest.mark.parametrize("row", [0, 131, 299])
def test_duplicate_ids_raise(impl, ids_dtype, row, rng):
    logits_TE, ids_TK = _valid_inputs(rng)
    ids_TK = ids_TK.to(ids_dtype)
    ids_TK[row, 3] = ids_TK[row, 1]
    with pytest.raises(
        ValueError, match=rf"ids: expected distinct ids within a row, got row {row} = "
    ):
        _call(impl, logits_TE, ids_TK, "default")


def test_uint8_ids_beyond_experts_raise(rng):
    """Trace dtypes carry ids up to 255: an E=16 model must still reject 200."""
    logits_TE = _random_logits(4, 16, rng)
    ids_TK = torch.tensor([[200, 1]] * 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 16\), got min 1 max 200"):
        replay_weights(logits_TE, ids_TK, "renormalize")


# ---------------------------------------------------------------------- check_ids=False


def _fwd_bwd(fn, logits_TE, ids_TK, method, grad_TK, check_ids):
    x_TE = logits_TE.clone().requires_grad_()
    w_TK = fn(x_TE, ids_TK, method, routed_scaling_factor=_scale(method), check_ids=check_ids)
    (grad_TE,) = torch.autograd.grad(w_TK, x_TE, grad_TK)
    return w_TK.detach(), grad_TE


@pytest.mark.parametrize("method", METHODS)
def test_unchecked_reference_equals_checked_on_valid_ids(method, rng):
    top_k = _top_k(method, 4)
    logits_TE, ids_TK = _random_logits(9, 16, rng), _random_ids(9, 16, top_k, rng)
    grad_TK = torch.randn(9, top_k, generator=rng)
    checked = _fwd_bwd(replay_weights_reference, logits_TE, ids_TK, method, grad_TK, True)
    unchecked = _fwd_bwd(replay_weights_reference, logits_TE, ids_TK, method, grad_TK, False)
    for want, got in zip(checked, unchecked):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_unchecked_triton_keeps_valid_rows_and_stays_in_bounds(method, rng, triton_device):
    """check_ids=False skips the host sync: valid rows are unaffected by a bad row, and the bad
    id (one past E) is never read, forward or backward: its lane acts as an absent expert (weight
    0; the row's weights and gradient are those of the remaining ids). Reading it would pick up
    the next row's first logit instead."""
    num_tokens, num_experts = 8, 16
    top_k = _top_k(method, 4)
    logits_TE = _random_logits(num_tokens, num_experts, rng).to(triton_device)
    ids_TK = _random_ids(num_tokens, num_experts, top_k, rng).to(triton_device)
    grad_TK = torch.randn(num_tokens, top_k, generator=rng).to(triton_device)
    checked = _fwd_bwd(replay_weights_triton, logits_TE, ids_TK, method, grad_TK, True)
    bad_TK = ids_TK.clone()
    bad_TK[0, 0] = num_experts
    with pytest.raises(ValueError, match="ids: expected values in"):
        replay_weights_triton(logits_TE, bad_TK, method, routed_scaling_factor=_scale(method))
    unchecked = _fwd_bwd(replay_weights_triton, logits_TE, bad_TK, method, grad_TK, False)
    for want, got in zip(checked, unchecked):
        torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=0)
    w_TK, grad_TE = unchecked
    assert w_TK[0, 0] == 0
    if top_k == 1:
        assert torch.count_nonzero(grad_TE[0]) == 0
    else:
        want_w, want_grad = _fwd_bwd(
            replay_weights_reference, logits_TE[:1].cpu(), bad_TK[:1, 1:].cpu(), method,
            grad_TK[:1, 1:].cpu(), True,
        )  # fmt: skip
        torch.testing.assert_close(w_TK[:1, 1:].cpu(), want_w)
        torch.testing.assert_close(grad_TE[:1].cpu(), want_grad, rtol=1e-5, atol=1e-6)
