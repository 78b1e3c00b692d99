"""Mismatch metrics against independently written float64 formulas, and the heatmap helper."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from replay.metrics import (
    RouterAgreement,
    extreme_token_fraction,
    kl_k3,
    plot_agreement_heatmap,
    router_agreement,
    router_agreement_matrix,
)
from replay.routed_experts import RoutedExperts


@pytest.fixture
def gen(rng: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from the per-test ``rng`` seed (printed on failure)."""
    return np.random.default_rng(rng.initial_seed())


def logprob_pair(gen: np.random.Generator, shape: tuple[int, ...], spread: float):
    """Sampled-token logprobs of a rollout and a trainer that differ by noise of ``spread``."""
    rollout = -gen.exponential(2.0, size=shape)
    train = np.minimum(rollout + gen.normal(0.0, spread, size=shape), 0.0)
    return rollout, train


def random_mask(gen: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    mask = gen.random(shape) < 0.6
    mask.flat[int(gen.integers(mask.size))] = True
    return mask


def k3_reference(rollout: np.ndarray, train: np.ndarray, mask: np.ndarray) -> float:
    ratio = np.exp(train[mask] - rollout[mask])
    return float(np.mean(ratio - 1.0 - np.log(ratio)))


def extreme_reference(
    rollout: np.ndarray, train: np.ndarray, mask: np.ndarray, tau: float
) -> float:
    ratio = np.exp(train[mask] - rollout[mask])
    return float(np.mean(np.maximum(ratio, 1.0 / ratio) > tau))


# ---------------------------------------------------------------------- logprob metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_k3_matches_the_formula(gen: np.random.Generator, dtype: torch.dtype) -> None:
    shape = (int(gen.integers(1, 5)), int(gen.integers(2, 40)))
    rollout, train = logprob_pair(gen, shape, spread=float(gen.uniform(0.05, 1.0)))
    mask = random_mask(gen, shape)
    t_rollout, t_train = torch.tensor(rollout, dtype=dtype), torch.tensor(train, dtype=dtype)
    # The reference sees exactly the values the function sees (after the dtype cast).
    expected = k3_reference(t_rollout.double().numpy(), t_train.double().numpy(), mask)
    got = kl_k3(t_rollout, t_train, torch.from_numpy(mask))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert got > 0.0


def test_extreme_token_fraction_matches_the_formula(gen: np.random.Generator) -> None:
    shape = (int(gen.integers(1, 4)), int(gen.integers(20, 60)))
    rollout, train = logprob_pair(gen, shape, spread=1.0)
    mask = random_mask(gen, shape)
    tau = float(gen.uniform(1.2, 3.0))
    expected = extreme_reference(rollout, train, mask, tau)
    got = extreme_token_fraction(
        torch.from_numpy(rollout), torch.from_numpy(train), torch.from_numpy(mask), tau=tau
    )
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got < 1.0  # spread 1.0 puts tokens on both sides of any tau in [1.2, 3]


def test_identical_logprobs_give_zero(gen: np.random.Generator) -> None:
    rollout, _ = logprob_pair(gen, (3, 17), spread=0.0)
    t = torch.from_numpy(rollout).float()
    assert kl_k3(t, t.clone()) == 0.0
    assert extreme_token_fraction(t, t.clone()) == 0.0


def test_constructed_ratios() -> None:
    # r = p_train / p_rollout chosen by hand: 3, 1/3, 1.5, 1/1.5, 2.5, 1.
    ratios = [3.0, 1 / 3, 1.5, 1 / 1.5, 2.5, 1.0]
    rollout = torch.full((6,), math.log(0.2), dtype=torch.float64)
    train = rollout + torch.tensor([math.log(r) for r in ratios], dtype=torch.float64)
    expected_kl = sum(r - 1 - math.log(r) for r in ratios) / 6
    assert kl_k3(rollout, train) == pytest.approx(expected_kl, rel=1e-12)
    assert extreme_token_fraction(rollout, train, tau=2.0) == pytest.approx(3 / 6)
    assert extreme_token_fraction(rollout, train, tau=1.4) == pytest.approx(5 / 6)
    # Masking out the two largest ratios.
    mask = torch.tensor([False, True, True, True, False, True])
    assert extreme_token_fraction(rollout, train, mask, tau=2.0) == pytest.approx(1 / 4)
    single = torch.tensor([True, False, False, False, False, False])
    assert kl_k3(rollout, train, single) == pytest.approx(3.0 - 1 - math.log(3.0), rel=1e-12)


def test_k3_is_the_kl_of_rollout_to_train_in_expectation(gen: np.random.Generator) -> None:
    # Tokens sampled from p (rollout); the k3 mean converges to KL(p || q) for q = train.
    p = gen.dirichlet(np.ones(6))
    q = gen.dirichlet(np.ones(6))
    tokens = gen.choice(6, size=200_000, p=p)
    rollout, train = torch.from_numpy(np.log(p)[tokens]), torch.from_numpy(np.log(q)[tokens])
    exact = float(np.sum(p * np.log(p / q)))
    # Standard error of the mean of r - 1 - log r, from the exact distribution.
    r = q / p
    values = r - 1 - np.log(r)
    stderr = math.sqrt(float(np.sum(p * (values - exact) ** 2)) / tokens.size)
    assert abs(kl_k3(rollout, train) - exact) < 6 * stderr + 1e-12


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_mask_dtypes_agree(gen: np.random.Generator, mask_dtype: torch.dtype) -> None:
    rollout, train = (torch.from_numpy(x) for x in logprob_pair(gen, (40,), spread=0.8))
    mask = torch.from_numpy(random_mask(gen, (40,)))
    for metric in (kl_k3, extreme_token_fraction):
        assert metric(rollout, train, mask.to(mask_dtype)) == metric(rollout, train, mask)
    assert kl_k3(rollout, train, None) == kl_k3(rollout, train, torch.ones(40, dtype=torch.bool))


def test_non_finite_values_only_matter_where_masked(gen: np.random.Generator) -> None:
    rollout, train = (torch.from_numpy(x) for x in logprob_pair(gen, (10,), spread=0.3))
    mask = torch.ones(10, dtype=torch.bool)
    mask[3] = False
    rollout[3] = -math.inf  # padding position
    assert math.isfinite(kl_k3(rollout, train, mask))
    with pytest.raises(
        ValueError, match="logp_rollout: expected finite values at masked tokens, got 1"
    ):
        kl_k3(rollout, train)
    train[5] = math.nan
    with pytest.raises(ValueError, match="logp_train: expected finite values"):
        extreme_token_fraction(rollout, train, mask)


def test_logprob_metric_errors() -> None:
    a, b = torch.zeros(4), torch.zeros(4)
    for metric in (kl_k3, extreme_token_fraction):
        with pytest.raises(ValueError, match=r"logp_train: expected shape \(4,\) .* got \(5,\)"):
            metric(a, torch.zeros(5))
        with pytest.raises(ValueError, match=r"mask: expected shape \(4,\) .* got \(2, 2\)"):
            metric(a, b, torch.ones(2, 2, dtype=torch.bool))
        with pytest.raises(
            ValueError, match="mask: expected at least one selected token, got none of 4"
        ):
            metric(a, b, torch.zeros(4, dtype=torch.bool))
        with pytest.raises(
            ValueError, match="mask: expected at least one selected token, got none of 0"
        ):
            metric(torch.zeros(0), torch.zeros(0))
        with pytest.raises(
            ValueError, match=r"mask: expected bool or 0/1 values, got .* values \[2\]"
        ):
            metric(a, b, torch.tensor([0, 1, 2, 1]))
        with pytest.raises(
            ValueError, match="logp_rollout: expected a floating dtype, got torch.int64"
        ):
            metric(torch.zeros(4, dtype=torch.long), b)
        with pytest.raises(TypeError, match="logp_train: expected a torch.Tensor"):
            metric(a, np.zeros(4))
        with pytest.raises(TypeError, match="mask: expected a torch.Tensor or None"):
            metric(a, b, [True] * 4)
    for tau in (1.0, 0.5, -2.0, math.nan):
        with pytest.raises(ValueError, match="tau: expected > 1"):
            extreme_token_fraction(a, b, tau=tau)
    with pytest.raises(TypeError, match="tau: expected a float"):
        extreme_token_fraction(a, b, tau="2")  # type: ignore[arg-type]


def test_half_precision_inputs(gen: np.random.Generator) -> None:
    rollout, train = logprob_pair(gen, (64,), spread=0.5)
    r16, t16 = torch.from_numpy(rollout).bfloat16(), torch.from_numpy(train).bfloat16()
    expected = k3_reference(r16.double().numpy(), t16.double().numpy(), np.ones(64, dtype=bool))
    assert kl_k3(r16, t16) == pytest.approx(expected, rel=1e-9)


@pytest.mark.gpu
def test_logprob_metrics_on_cuda(gen: np.random.Generator) -> None:
    rollout, train = (torch.from_numpy(x) for x in logprob_pair(gen, (4, 33), spread=0.7))
    mask = torch.from_numpy(random_mask(gen, (4, 33)))
    for metric in (kl_k3, extreme_token_fraction):
        on_cpu = metric(rollout, train, mask)
        on_cuda = metric(rollout.cuda(), train.cuda(), mask.cuda())
        assert on_cuda == pytest.approx(on_cpu, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="logp_train: expected device"):
        kl_k3(rollout.cuda(), train)


# ---------------------------------------------------------------------- router agreement


def random_ids(
    gen: np.random.Generator, rows: int, layers: int, top_k: int, experts: int
) -> np.ndarray:
    return np.argsort(gen.random((rows, layers, experts)), axis=2)[:, :, :top_k]


def perturbed(gen: np.random.Generator, ids: np.ndarray, experts: int, rate: float) -> np.ndarray:
    """Permute each row's ids; at a ``rate`` of (row, layer)s swap one id for an unused one."""
    out = np.take_along_axis(ids, np.argsort(gen.random(ids.shape), axis=2), axis=2)
    for row, layer in np.argwhere(gen.random(ids.shape[:2]) < rate):
        unused = sorted(set(range(experts)) - set(out[row, layer].tolist()))
        out[row, layer, int(gen.integers(ids.shape[2]))] = unused[int(gen.integers(len(unused)))]
    return out


def agreement_reference(
    pairs: list[tuple[RoutedExperts, RoutedExperts]],
) -> tuple[list[float], int]:
    """Per-layer fraction of equal id sets over rows valid in both traces, by plain loops."""
    layers = len(pairs[0][0].moe_layers)
    agree, rows = [0] * layers, 0
    for a, b in pairs:
        for row in range(a.num_rows):
            if (a.valid is not None and not a.valid[row]) or (
                b.valid is not None and not b.valid[row]
            ):
                continue
            rows += 1
            for layer in range(layers):
                agree[layer] += set(a.ids[row, layer].tolist()) == set(b.ids[row, layer].tolist())
    return [count / rows for count in agree], rows


def test_permuted_rows_agree_fully(gen: np.random.Generator) -> None:
    experts, layers = 32, [1, 3, 4]
    ids = random_ids(gen, 12, 3, 4, experts)
    a = RoutedExperts(ids, layers, experts)
    b = RoutedExperts(perturbed(gen, ids, experts, rate=0.0), layers, experts)
    assert not np.array_equal(a.ids, b.ids) or a.top_k == 1
    result = router_agreement(a, b)
    assert result == RouterAgreement(
        overall=1.0, per_layer=(1.0, 1.0, 1.0), moe_layers=(1, 3, 4), rows=12
    )


def test_agreement_matches_reference_with_invalid_rows(gen: np.random.Generator) -> None:
    experts, layers, top_k = 16, [0, 2, 5, 7], 3
    pairs = []
    for _ in range(int(gen.integers(1, 4))):
        rows = int(gen.integers(2, 20))
        ids = random_ids(gen, rows, 4, top_k, experts)
        valid_a = gen.random(rows) < 0.8
        valid_a[0] = True
        valid_b = gen.random(rows) < 0.8 if gen.random() < 0.5 else None
        if valid_b is not None:
            valid_b[0] = True
        other = perturbed(gen, ids, experts, rate=0.3)
        # Rows invalid in either trace disagree everywhere: counting them would change the result.
        excluded = ~valid_a | (~valid_b if valid_b is not None else False)
        other[excluded] = (ids[excluded] + top_k) % experts
        pairs.append(
            (
                RoutedExperts(ids, layers, experts, valid=valid_a),
                RoutedExperts(other, layers, experts, valid=valid_b),
            )
        )
    per_layer, rows = agreement_reference(pairs)
    result = router_agreement([a for a, _ in pairs], [b for _, b in pairs])
    assert result.rows == rows
    assert result.moe_layers == tuple(layers)
    assert result.per_layer == pytest.approx(per_layer, abs=1e-12)
    assert result.overall == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-12)


def test_agreement_matrix(gen: np.random.Generator) -> None:
    experts, layers = 24, [3, 4]
    ids = random_ids(gen, 15, 2, 2, experts)
    valid = gen.random(15) < 0.7
    valid[0] = True
    a = RoutedExperts(ids, layers, experts, valid=valid)
    b = RoutedExperts(perturbed(gen, ids, experts, rate=0.4), layers, experts)
    matrix = router_agreement_matrix(a, b)
    assert matrix.shape == (15, 2) and matrix.dtype == bool
    for row in range(15):
        assert bool(matrix.mask[row].all()) == (not valid[row])
        for layer in range(2):
            if valid[row]:
                assert matrix[row, layer] == (
                    set(ids[row, layer].tolist()) == set(b.ids[row, layer].tolist())
                )
    assert float(matrix.mean()) == pytest.approx(router_agreement(a, b).overall, abs=1e-12)


def test_agreement_errors(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 5, 2, 2, 8)
    a = RoutedExperts(ids, [0, 1], 8)
    cases = [
        (
            [a, a],
            [a, RoutedExperts(ids[:4], [0, 1], 8)],
            r"trace_b\[1\].num_rows: expected 5 .* got 4",
        ),
        (
            a,
            RoutedExperts(ids, [0, 2], 8),
            r"trace_b\[0\].moe_layers: expected \(0, 1\) .* got \(0, 2\)",
        ),
        (a, RoutedExperts(ids[:, :, :1], [0, 1], 8), r"trace_b\[0\].top_k: expected 2 .* got 1"),
        (a, RoutedExperts(ids, [0, 1], 9), r"trace_b\[0\].num_experts: expected 8 .* got 9"),
        (a, RoutedExperts(ids, [0, 1], 8, start=1), r"trace_b\[0\].start: expected 0 .* got 1"),
        ([a, a], [a], r"trace_b: expected 2 traces \(as trace_a\), got 1"),
        ([], [], r"trace_a: expected at least one trace"),
        (
            [a, RoutedExperts(ids, [1, 2], 8)],
            [a, RoutedExperts(ids, [1, 2], 8)],
            r"trace_a\[1\].moe_layers: expected \(0, 1\) \(as trace_a\[0\]\), got \(1, 2\)",
        ),
        (
            RoutedExperts(ids, [0, 1], 8, valid=np.array([True, False, True, False, False])),
            RoutedExperts(ids, [0, 1], 8, valid=np.array([False, True, False, True, False])),
            r"valid: expected at least one row valid in both traces, got none \(of 5 rows\)",
        ),
    ]
    for trace_a, trace_b, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            router_agreement(trace_a, trace_b)
    with pytest.raises(TypeError, match=r"trace_b\[0\]: expected RoutedExperts"):
        router_agreement([a], [ids])
    with pytest.raises(TypeError, match="trace_a: expected RoutedExperts"):
        router_agreement_matrix([a], a)
    with pytest.raises(ValueError, match=r"per_layer: expected 2 values"):
        RouterAgreement(overall=1.0, per_layer=(1.0,), moe_layers=(0, 1), rows=3)
    with pytest.raises(
        ValueError, match=r"per_layer\[1\]: expected a fraction in \[0, 1\], got 1.5"
    ):
        RouterAgreement(overall=1.0, per_layer=(1.0, 1.5), moe_layers=(0, 1), rows=3)


# ---------------------------------------------------------------------- heatmap


def test_heatmap_of_agreements(gen: np.random.Generator) -> None:
    layers = sorted(int(x) for x in gen.choice(40, size=int(gen.integers(2, 12)), replace=False))
    steps = int(gen.integers(1, 6))
    results = [
        RouterAgreement(
            overall=0.5,
            per_layer=tuple(gen.random(len(layers)).tolist()),
            moe_layers=tuple(layers),
            rows=10,
        )
        for _ in range(steps)
    ]
    ax = plot_agreement_heatmap(
        results, labels=[f"step {i}" for i in range(steps)], title="agreement"
    )
    assert isinstance(ax.figure, Figure)
    (image,) = ax.images
    values = image.get_array()
    assert values.shape == (steps, len(layers))
    np.testing.assert_allclose(values, [r.per_layer for r in results])
    buffer = io.BytesIO()
    ax.figure.savefig(buffer, format="png")  # renders without pyplot or a display
    assert buffer.getvalue()[:4] == b"\x89PNG"
    shown = {t.get_text() for t in ax.get_xticklabels()} - {""}
    assert shown and shown <= {str(layer) for layer in layers}
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"step {i}" for i in range(steps)]


def test_heatmap_of_a_masked_token_matrix_into_given_axes(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 9, 3, 2, 8)
    valid = np.ones(9, dtype=bool)
    valid[4] = False
    a = RoutedExperts(ids, [1, 2, 3], 8, valid=valid)
    b = RoutedExperts(perturbed(gen, ids, 8, rate=0.5), [1, 2, 3], 8)
    figure = Figure()
    axes = figure.subplots(1, 2)
    ax = plot_agreement_heatmap(router_agreement_matrix(a, b), ax=axes[1], moe_layers=[1, 2, 3])
    assert ax is axes[1] and not axes[0].images
    values = ax.images[0].get_array()
    assert values.shape == (9, 3)
    assert values.mask[4].all() and not values.mask[np.arange(9) != 4].any()


def test_heatmap_errors() -> None:
    grid = np.full((2, 3), 0.5)
    with pytest.raises(ValueError, match=r"labels: expected 2 labels \(one per row\), got 1"):
        plot_agreement_heatmap(grid, labels=["a"])
    with pytest.raises(
        ValueError, match=r"moe_layers: expected 3 layers \(one per column\), got 2"
    ):
        plot_agreement_heatmap(grid, moe_layers=[0, 1])
    with pytest.raises(
        ValueError, match=r"data: expected fractions in \[0, 1\], got min 0.5, max 1.5"
    ):
        plot_agreement_heatmap(grid + np.eye(2, 3))
    with pytest.raises(
        ValueError, match=r"data: expected a non-empty 2-D array .* got shape \(3,\)"
    ):
        plot_agreement_heatmap(grid[0])
    with pytest.raises(ValueError, match="data: expected a 2-D array of fractions"):
        plot_agreement_heatmap([[0.1, 0.2], [0.3]])
    a = RouterAgreement(overall=1.0, per_layer=(1.0, 1.0), moe_layers=(0, 1), rows=1)
    b = RouterAgreement(overall=1.0, per_layer=(1.0, 1.0), moe_layers=(0, 2), rows=1)
    with pytest.raises(ValueError, match=r"data\[1\].moe_layers: expected \(0, 1\)"):
        plot_agreement_heatmap([a, b])
    with pytest.raises(
        ValueError, match=r"moe_layers: expected \(0, 1\) \(as the RouterAgreement data\)"
    ):
        plot_agreement_heatmap(a, moe_layers=[0, 2])
