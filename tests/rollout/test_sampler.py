"""The sampler: greedy ties, temperature-1 logprobs, top-k / top-p supports, the sampled
distribution, per-request seeds independent of the batch, the engine's stream, and (gpu) the
FlashInfer path."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.sampler import Sampler, apply_top_k_top_p, keyed_sample, uniform_noise
from rollout.sampling_params import SamplingParams

VOCAB = 12


def _sample(sampler, logits, params, generated=None):
    inputs = sampler.prepare(params, generated or [0] * len(params))
    return sampler(logits, inputs)


def _rand_logits(rng, rows, vocab=VOCAB, scale=2.0):
    return torch.randn(rows, vocab, generator=rng) * scale


def test_greedy_is_argmax_with_ties_to_the_lower_id(rng):
    sampler = Sampler(vocab_size=VOCAB, device="cpu")
    logits = _rand_logits(rng, 5)
    logits[0, 3] = logits[0, 9] = logits[0].max() + 1.0  # an exact tie
    ids, logprobs = _sample(sampler, logits, [SamplingParams(temperature=0.0)] * 5)
    expected = logits.argmax(dim=-1)
    assert expected[0] == 3 and torch.equal(ids, expected)
    torch.testing.assert_close(
        logprobs, torch.log_softmax(logits, dim=-1).gather(1, ids[:, None])[:, 0]
    )


def test_logprobs_are_temperature_one_whatever_the_settings(rng):
    sampler = Sampler(vocab_size=VOCAB, device="cpu", seed=3)
    logits = _rand_logits(rng, 4)
    params = [
        SamplingParams(temperature=0.3),
        SamplingParams(temperature=2.0, top_k=3),
        SamplingParams(temperature=0.7, top_p=0.5, seed=11),
        SamplingParams(temperature=0.0),
    ]
    ids, logprobs = _sample(sampler, logits, params)
    assert logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits.double(), dim=-1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-6, rtol=0)


def _support_reference(logits_row, top_k, top_p):
    """The ids top-k then top-p keep, by a direct loop over the sorted tokens."""
    order = sorted(range(len(logits_row)), key=lambda i: (-float(logits_row[i]), i))
    kept = order[:top_k] if top_k > 0 else order
    probs = torch.softmax(logits_row[kept].double(), dim=0).tolist()
    nucleus, mass = [], 0.0
    for token, p in zip(kept, probs):
        if mass >= top_p:
            break
        nucleus.append(token)
        mass += p
    return set(nucleus)


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (-1, 0.6), (5, 0.7), (1, 0.2)])
def test_top_k_top_p_keep_the_reference_support(rng, top_k, top_p):
    logits = _rand_logits(rng, 6)
    k = torch.full((6,), top_k if top_k > 0 else VOCAB)
    p = torch.full((6,), top_p)
    filtered = apply_top_k_top_p(logits, k if top_k > 0 else None, p if top_p < 1 else None)
    for row in range(6):
        kept = set(torch.nonzero(torch.isfinite(filtered[row]))[:, 0].tolist())
        assert kept == _support_reference(logits[row], top_k, top_p)
        assert torch.equal(filtered[row][list(kept)], logits[row][list(kept)])


def test_keyed_sampling_follows_the_filtered_distribution(rng):
    n = 40_000
    logits = _rand_logits(rng, 1, scale=1.0)
    temperature, top_k = 0.8, 6
    scaled = (logits / temperature).expand(n, VOCAB)
    seeds = torch.randint(0, 2**62, (n,), generator=rng)
    ids = keyed_sample(scaled, seeds, torch.zeros(n, dtype=torch.int64), torch.full((n,), top_k))
    expected = torch.softmax(apply_top_k_top_p(scaled[:1], torch.tensor([top_k]), None), -1)[0]
    freq = torch.bincount(ids, minlength=VOCAB).double() / n
    sigma = (expected.double() * (1 - expected.double()) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (freq, expected)


def test_uniform_noise_is_keyed_and_in_the_open_interval(rng):
    seeds = torch.randint(0, 2**62, (4,), generator=rng)
    counters = torch.tensor([0, 1, 2, 3])
    u = uniform_noise(seeds, counters, 50_000)
    assert u.dtype == torch.float32 and float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12**-0.5) < 0.01
    again = uniform_noise(seeds.flip(0), counters.flip(0), 50_000).flip(0)
    assert torch.equal(u, again), "noise depends on the row position"
    other = uniform_noise(seeds, counters + 1, 50_000)
    assert not torch.equal(u[0], other[0])


def test_seeded_rows_do_not_depend_on_the_batch(rng):
    logits = _rand_logits(rng, 1, vocab=200, scale=0.5)
    target = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    alone = [
        int(_sample(Sampler(vocab_size=200, device="cpu", seed=7), logits, [target], [step])[0][0])
        for step in range(8)
    ]
    assert len(set(alone)) > 1, "a seeded request repeated one token at every step"
    others = _rand_logits(rng, 4, vocab=200)
    for step, token in enumerate(alone):
        batch = torch.cat([others[:2], logits, others[2:]])
        params = [
            SamplingParams(temperature=0.5),
            SamplingParams(temperature=1.0, seed=99),
            target,
            SamplingParams(temperature=0.0),
            SamplingParams(top_k=5),
        ]
        sampler = Sampler(vocab_size=200, device="cpu", seed=step + 100)
        ids, _ = _sample(sampler, batch, params, [3, 5, step, 0, 9])
        assert int(ids[2]) == token


def test_unseeded_rows_follow_the_engine_seed(rng):
    logits = _rand_logits(rng, 8, vocab=500, scale=0.2)
    params = [SamplingParams(temperature=1.0)] * 8

    def draw(seed):
        sampler = Sampler(vocab_size=500, device="cpu", seed=seed)
        return [_sample(sampler, logits, params)[0].tolist() for _ in range(3)]

    first = draw(5)
    assert first == draw(5)
    assert first != draw(6)
    assert first[0] != first[1], "the engine's stream did not advance between steps"


def test_top_k_one_is_greedy(rng):
    sampler = Sampler(vocab_size=VOCAB, device="cpu")
    logits = _rand_logits(rng, 16)
    logits[0, 4] = logits[0, 7] = logits[0].max() + 0.5
    ids, _ = _sample(sampler, logits, [SamplingParams(temperature=1.5, top_k=1)] * 16)
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_bad_logits_raise():
    sampler = Sampler(vocab_size=VOCAB, device="cpu")
    inputs = sampler.prepare([SamplingParams()] * 2, [0, 0])
    with pytest.raises(ValueError, match="logits: expected float32"):
        sampler(torch.zeros(2, VOCAB, dtype=torch.float16), inputs)
    with pytest.raises(ValueError, match="logits: expected float32"):
        sampler(torch.zeros(3, VOCAB), inputs)
    with pytest.raises(ValueError, match="use_flashinfer"):
        Sampler(vocab_size=VOCAB, device="cpu", use_flashinfer=True)


def test_seeds_beyond_64_bits_use_their_low_bits(rng):
    logits = _rand_logits(rng, 1, vocab=300, scale=0.3)
    draws = [
        int(_sample(Sampler(vocab_size=300, device="cpu"), logits, [SamplingParams(seed=s)])[0])
        for s in (5, 2**64 + 5)
    ]
    assert draws[0] == draws[1]


@pytest.mark.gpu
@pytest.mark.parametrize("params", [{}, {"top_k": 5}, {"top_p": 0.8}, {"top_k": 6, "top_p": 0.9}])
def test_flashinfer_sampling_distribution_on_cuda(rng, params):
    sampler = Sampler(vocab_size=VOCAB, device="cuda", seed=0)
    assert sampler.uses_flashinfer
    n = 20_000
    logits = _rand_logits(rng, 1, scale=1.0)
    sp = SamplingParams(temperature=0.9, **params)
    k = torch.tensor([sp.top_k if sp.top_k > 0 else VOCAB])
    expected = torch.softmax(
        apply_top_k_top_p(logits / 0.9, k if sp.top_k > 0 else None, torch.tensor([sp.top_p])), -1
    )[0].double()
    ids, logprobs = _sample(sampler, logits.expand(n, VOCAB).contiguous().cuda(), [sp] * n)
    freq = torch.bincount(ids.cpu(), minlength=VOCAB).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-9).all(), (freq, expected)
    lp = torch.log_softmax(logits.double(), -1)[0, ids.cpu()]
    assert math.isclose(float((logprobs.cpu().double() - lp).abs().max()), 0.0, abs_tol=1e-5)


@pytest.mark.gpu
def test_seeded_rows_on_cuda_match_cpu(rng):
    """Seeded rows use the keyed sampler on every device: same logits, same tokens."""
    logits = _rand_logits(rng, 6, vocab=1000, scale=0.5)
    params = [SamplingParams(temperature=1.0, seed=40 + i, top_k=50) for i in range(6)]
    cpu = _sample(Sampler(vocab_size=1000, device="cpu"), logits, params)[0]
    cuda = _sample(Sampler(vocab_size=1000, device="cuda"), logits.cuda(), params)[0]
    assert torch.equal(cpu, cuda.cpu())
