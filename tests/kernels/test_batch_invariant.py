"""``routing_kernels.batch_invariant`` on CPU: accuracy against float64 torch, the invariances
(a row's bits do not depend on the rows beside it; attention's do not depend on the keys
beyond the query), gradients equal to torch's, errors; and that each invariance is necessary:
torch's ordinary op, in its place, changes bits (so the engine/policy equality tests can fail).

Fresh random inputs per run (the ``rng`` fixture prints its seed).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from rollout.layers.attention import _causal_attention
from routing_kernels import batch_invariant as bi
from routing_kernels.batch_invariant.causal_attention import attention_reference
from routing_kernels.fused_moe import fused_experts_reference

ULP32 = 2.0**-23


@contextlib.contextmanager
def _threads(count: int):
    """torch's CPU reductions split a lone long row over threads: run with ``count`` of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _randn(rng, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)


def _attention_float64(q, k, v, scale, first):
    """Causal attention in float64: query i at position first + i sees keys j <= first + i."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qnd,cnd->nqc", q.double(), k64) * scale
    visible = torch.arange(k.shape[0])[None, :] <= first + torch.arange(q.shape[0])[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return torch.einsum("nqc,cnd->qnd", probs, v64)


# ---------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "name, fn, ref, low, high",
    [
        ("exp", bi.exp, torch.exp, -87.0, 88.0),
        ("log", bi.log, torch.log, 1e-30, 1e30),
        ("sigmoid", bi.sigmoid, torch.sigmoid, -60.0, 60.0),
        ("silu", bi.silu, F.silu, -60.0, 60.0),
        ("cos", bi.cos, torch.cos, -5000.0, 5000.0),
        ("sin", bi.sin, torch.sin, -5000.0, 5000.0),
    ],
)
def test_elementwise_within_an_ulp_of_float64(name, fn, ref, low, high, rng):
    if name == "log":
        x = torch.exp(torch.empty(50_000).uniform_(math.log(low), math.log(high), generator=rng))
    else:
        x = torch.empty(50_000).uniform_(low, high, generator=rng)
    got, want = fn(x).double(), ref(x.double())
    if name in ("cos", "sin"):
        error = (got - want).abs().max() / ULP32  # near zeros: absolute
    else:
        error = ((got - want).abs() / want.abs().clamp_min(1e-300)).max() / ULP32
    assert error <= 1.0, f"{name}: {error:.3f} ulp"


def test_elementwise_special_values():
    inf, nan = math.inf, math.nan
    x = torch.tensor([0.0, -inf, inf, nan, -200.0, 200.0])
    assert torch.equal(bi.exp(x)[[0, 1, 2, 4, 5]], torch.tensor([1.0, 0.0, inf, 0.0, inf]))
    assert bi.exp(x)[3].isnan() and bi.log(torch.tensor([-1.0]))[0].isnan()
    assert torch.equal(bi.log(torch.tensor([0.0, 1.0, inf])), torch.tensor([-inf, 0.0, inf]))
    assert torch.equal(bi.sigmoid(torch.tensor([-inf, 0.0, inf])), torch.tensor([0.0, 0.5, 1.0]))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert bi.silu(torch.ones(3, dtype=dtype)).dtype == dtype


def test_linear_matches_float64(rng):
    x, w, b = _randn(rng, 5, 7, 96), _randn(rng, 48, 96), _randn(rng, 48)
    got = bi.linear(x, w, b)
    want = x.double() @ w.double().T + b.double()
    assert got.shape == (5, 7, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    got_bf16 = bi.linear(xb, wb)
    want_bf16 = (xb.double() @ wb.double().T).bfloat16()
    assert got_bf16.dtype == torch.bfloat16
    assert (got_bf16.double() - want_bf16.double()).abs().max() <= 0.02 * want.abs().max()
    # float32 master weights of a bfloat16 forward are rounded first, as an engine holds them.
    assert torch.equal(bi.linear(xb, w), got_bf16)


def test_rows_match_float64(rng):
    x = _randn(rng, 6, 1000, scale=4.0)
    # A pairwise sum's float32 error is at most ceil(log2 n) roundings of the magnitudes' sum.
    bound = math.ceil(math.log2(x.shape[-1])) * 2**-24 * x.double().abs().sum(-1)
    assert ((bi.tree_sum(x).double() - x.double().sum(-1)).abs() <= bound).all()
    torch.testing.assert_close(bi.softmax(x).double(), torch.softmax(x.double(), -1))
    torch.testing.assert_close(bi.logsumexp(x).double(), torch.logsumexp(x.double(), -1))
    ids = torch.randint(0, 1000, (6,), generator=rng)
    want = torch.log_softmax(x.double(), -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(bi.token_logprobs(x, ids).double(), want)
    w = _randn(rng, 1000)
    want = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(bi.rms_norm(x, w, 1e-6).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [0, 5])
def test_attention_matches_float64(first, rng):
    q, k, v = _randn(rng, 9, 8, 16), _randn(rng, 9 + first, 2, 16), _randn(rng, 9 + first, 2, 16)
    got = bi.attention(q, k, v, scale=0.25, first_position=first)
    want = _attention_float64(q, k, v, 0.25, first)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_experts_match_float64(rng):
    x, gate_up, down = _randn(rng, 30, 64), _randn(rng, 8, 96, 64), _randn(rng, 8, 64, 48)
    weights = torch.rand(30, 3, generator=rng)
    ids = torch.stack([torch.randperm(8, generator=rng)[:3] for _ in range(30)])
    got = bi.experts(x, gate_up, down, weights, ids)
    want = torch.zeros(30, 64, dtype=torch.float64)
    for t in range(30):  # float64 oracle, pair by pair
        for slot, e in enumerate(ids[t].tolist()):
            gate, up = (gate_up[e].double() @ x[t].double()).chunk(2)
            y = down[e].double() @ (F.silu(gate) * up)
            want[t] += weights[t, slot].double() * y
    scale = float(want.abs().max())  # float32 sums of products of unit normals: relative error
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
    # A masked pair (another rank's expert) contributes nothing.
    masked_ids = ids.clone()
    masked_ids[:, 2] = -1
    masked = bi.experts(x, gate_up, down, weights, masked_ids, masked=True)
    unmasked = bi.experts(x, gate_up, down, weights[:, :2], ids[:, :2])
    torch.testing.assert_close(masked, unmasked, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------- invariances


def _alone_equals_batched(fn, *batched_inputs) -> bool:
    """Whether every row computed alone equals, bit for bit, its row of the batched call."""
    batched = fn(*batched_inputs)
    rows = batched_inputs[0].shape[0]
    return all(
        torch.equal(fn(*(t[i : i + 1] for t in batched_inputs)), batched[i : i + 1])
        for i in range(rows)
    )


def test_elementwise_values_do_not_depend_on_their_tensor(rng):
    x = _randn(rng, 4099, scale=10.0)
    for fn in (bi.exp, bi.sigmoid, bi.silu, bi.cos, bi.sin):
        whole = fn(x)
        for size in (1, 3, 7, 17, 33):
            parts = torch.cat([fn(x[i : i + size]) for i in range(0, 10 * size * size, size)])
            assert torch.equal(parts, whole[: parts.shape[0]]), (fn.__name__, size)


def test_row_ops_are_batch_invariant(rng):
    with _threads(2):
        x, w = _randn(rng, 33, 200), _randn(rng, 48, 200)
        assert _alone_equals_batched(lambda t: bi.linear(t, w), x)
        assert _alone_equals_batched(lambda t: bi.rms_norm(t, w[0], 1e-6), x)
        ids = torch.randint(0, 200, (33,), generator=rng)
        assert _alone_equals_batched(bi.token_logprobs, x, ids)
        assert _alone_equals_batched(bi.softmax, x)
        # Output columns too: a slice of the weight gives the same bits.
        assert torch.equal(bi.linear(x, w[5:9]), bi.linear(x, w)[:, 5:9])


def test_tree_sum_ignores_appended_zeros(rng):
    x = _randn(rng, 4, 37)
    for extra in (1, 27, 91):
        assert torch.equal(bi.tree_sum(F.pad(x, (0, extra))), bi.tree_sum(x))


def test_attention_same_bits_for_prefill_chunks_decode_and_longer_context(rng):
    q, k, v = _randn(rng, 29, 4, 16), _randn(rng, 29, 2, 16), _randn(rng, 29, 2, 16)
    whole = bi.attention(q, k, v, scale=0.25, first_position=0)
    for p in range(29):  # a decode step sees exactly its context
        one = bi.attention(q[p : p + 1], k[: p + 1], v[: p + 1], scale=0.25, first_position=p)
        assert torch.equal(one, whole[p : p + 1]), p
    chunks = [(0, 6), (6, 7), (7, 20), (20, 29)]
    parts = [bi.attention(q[s:e], k[:e], v[:e], scale=0.25, first_position=s) for s, e in chunks]
    assert torch.equal(torch.cat(parts), whole)


def test_experts_are_batch_invariant(rng):
    x, gate_up, down = _randn(rng, 25, 32), _randn(rng, 8, 48, 32), _randn(rng, 8, 32, 24)
    weights = torch.rand(25, 2, generator=rng)
    ids = torch.stack([torch.randperm(8, generator=rng)[:2] for _ in range(25)])
    assert _alone_equals_batched(
        lambda t, w_, i_: bi.experts(t, gate_up, down, w_, i_), x, weights, ids
    )


# ---------------------------------------------------------------------- necessity


def test_ordinary_ops_are_not_batch_invariant(rng):
    """torch's own op in each primitive's place changes a row's bits with its batch (CPU,
    two threads): each invariance above is needed, not a property torch gives for free."""
    with _threads(2):
        x, w = _randn(rng, 64, 64), _randn(rng, 384, 64)
        assert not _alone_equals_batched(lambda t: F.linear(t, w), x), "F.linear"
        wide = _randn(rng, 64, 1 << 16, scale=3.0)  # one lone row is split over threads
        norm_w = torch.ones(1 << 16)
        assert not _alone_equals_batched(
            lambda t: norm_w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), wide
        ), "torch rms_norm"
        ids = torch.randint(0, 1 << 16, (64,), generator=rng)
        assert not _alone_equals_batched(
            lambda t, i: t.gather(1, i[:, None])[:, 0] - t.logsumexp(-1), wide, ids
        ), "torch logsumexp"
        gate_up, down = _randn(rng, 8, 64, 64), _randn(rng, 8, 64, 32)
        weights = torch.rand(64, 2, generator=rng)
        expert_ids = torch.stack([torch.randperm(8, generator=rng)[:2] for _ in range(64)])
        assert not _alone_equals_batched(
            lambda t, w_, i_: fused_experts_reference(t, gate_up, down, w_, i_),
            x,
            weights,
            expert_ids,
        ), "fused_experts_reference"
    q, k, v = _randn(rng, 40, 4, 16), _randn(rng, 40, 2, 16), _randn(rng, 40, 2, 16)
    whole = _causal_attention(q, k, v, scale=0.25, group=2)
    decode = torch.cat(
        [_causal_attention(q[p : p + 1], k[: p + 1], v[: p + 1], scale=0.25, group=2)
         for p in range(40)]
    )  # fmt: skip
    assert not torch.equal(decode, whole), "torch attention"
    values = _randn(rng, 20_000, scale=10.0)
    for fn in (torch.sigmoid, F.silu):
        parts = torch.cat([fn(values[i : i + 7]) for i in range(0, 7000, 7)])
        assert not torch.equal(parts, fn(values)[:7000]), fn.__name__


# ---------------------------------------------------------------------- gradients, errors


def test_gradients_are_torchs(rng):
    x = _randn(rng, 7, 32).requires_grad_()
    w = _randn(rng, 24, 32).requires_grad_()
    b = _randn(rng, 24).requires_grad_()
    cases = [
        (lambda: bi.linear(x, w, b), lambda: F.linear(x, w, b), (x, w, b)),
        (lambda: bi.rms_norm(x, w[0], 1e-6), None, (x,)),
        (lambda: bi.silu(x), lambda: F.silu(x), (x,)),
        (lambda: bi.logsumexp(x), lambda: torch.logsumexp(x, -1), (x,)),
    ]
    for invariant, ordinary, inputs in cases:
        out = invariant()
        upstream = torch.randn(out.shape, generator=rng)
        got = torch.autograd.grad(out, inputs, upstream)
        if ordinary is not None:
            want = torch.autograd.grad(ordinary(), inputs, upstream)
            for g, h in zip(got, want, strict=True):
                torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)
    q = _randn(rng, 6, 4, 8).requires_grad_()
    k, v = _randn(rng, 6, 2, 8).requires_grad_(), _randn(rng, 6, 2, 8).requires_grad_()
    out = bi.attention(q, k, v, scale=0.3, first_position=0)
    upstream = torch.randn(out.shape, generator=rng)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    want = torch.autograd.grad(_causal_attention(q, k, v, scale=0.3, group=2), (q, k, v), upstream)
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="weight: expected"):
        bi.linear(x, torch.zeros(4, 9))
    with pytest.raises(ValueError, match="x: expected float16"):
        bi.linear(x.long(), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="weight: expected shape"):
        bi.rms_norm(x, torch.zeros(9), 1e-6)
    with pytest.raises(ValueError, match="ids: expected int64"):
        bi.token_logprobs(x, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="first_position: expected"):
        attention_reference(
            torch.zeros(4, 2, 8), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8),
            scale=1.0, first_position=0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="ids: expected values in"):
        bi.experts(x, torch.zeros(2, 4, 8), torch.zeros(2, 8, 2), torch.ones(3, 1),
                   torch.full((3, 1), 2))  # fmt: skip
    with pytest.raises(ValueError, match="x: expected a float16"):
        bi.exp(torch.zeros(3, dtype=torch.int64))
