"""Tiny positive temperatures sample greedily, their limit (issue 13, section 3).

``SamplingParams.greedy`` holds below ``MIN_SAMPLING_TEMPERATURE`` (1e-5): 1e-38, 1e-45 (which
float32 rounds to its smallest subnormal), the smallest double subnormal and 1e-7 are greedy;
1e-5 and up are not. The sampler gives such rows the argmax and the temperature-1 logprob, also
beside sampled rows, which it leaves as they are. End to end, tiny temperatures (with a seed, a
top-k and a top-p that greedy ignores) return exactly the greedy tokens and logprobs, not the
one token repeated that dividing by the temperature gave (logits / 1e-38 overflow float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout import LLM, SamplingParams
from rollout.sampler import Sampler
from rollout.sampling_params import MIN_SAMPLING_TEMPERATURE
from rollout.testing import make_tiny_moe

TINY = [1e-38, 1e-45, 5e-324, 1e-7, MIN_SAMPLING_TEMPERATURE / 2]
VOCAB = 211

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("temperature", [0.0, *TINY])
def test_below_the_bound_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, seed=3, top_k=4, top_p=0.5)
    assert params.greedy and params.temperature == temperature


@pytest.mark.parametrize("temperature", [MIN_SAMPLING_TEMPERATURE, 1e-3, 1.0])
def test_from_the_bound_up_samples(temperature):
    assert not SamplingParams(temperature=temperature).greedy


def test_sampler_rows_of_tiny_temperatures_are_the_argmax(rng):
    tiny = [SamplingParams(temperature=t, seed=i) for i, t in enumerate(TINY)]
    sampled = [SamplingParams(temperature=0.8, seed=40 + i) for i in range(3)]
    params = [p for pair in zip(tiny, sampled) for p in pair] + tiny[len(sampled) :]
    logits_SV = torch.randn(len(params), VOCAB, generator=rng) * 4
    sampler = Sampler(vocab_size=VOCAB, device="cpu")
    ids_S, logprobs_S = sampler(logits_SV, sampler.prepare(params, [0] * len(params)))
    alone = Sampler(vocab_size=VOCAB, device="cpu")
    rows = [i for i, p in enumerate(params) if not p.greedy]
    ids_alone_S, _ = alone(logits_SV[rows], alone.prepare([params[i] for i in rows], [0] * 3))
    log_softmax_SV = logits_SV.log_softmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            assert int(ids_S[i]) == int(logits_SV[i].argmax()), f"row {i}"
        torch.testing.assert_close(logprobs_S[i], log_softmax_SV[i, ids_S[i]], rtol=0, atol=1e-5)
    assert ids_S[rows].tolist() == ids_alone_S.tolist(), "seeded rows beside greedy ones"


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    return make_tiny_moe("olmoe", tmp_path_factory.mktemp("olmoe"))


def test_generate_with_tiny_temperatures_equals_greedy(olmoe, rng):
    prompts = [torch.randint(0, 300, (n,), generator=rng).tolist() for n in (4, 11, 7)]
    # No prefix cache: every call runs the very same batches, so logprobs are bit for bit.
    llm = LLM(
        olmoe,
        device="cpu",
        block_size=4,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        enable_prefix_caching=False,
    )
    greedy = llm.generate(
        prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    for temperature in TINY:
        tiny = SamplingParams(
            max_tokens=10, temperature=temperature, seed=1, top_k=3, top_p=0.9, ignore_eos=True
        )
        outs = llm.generate(prompts, tiny, use_tqdm=False)
        for out, want in zip(outs, greedy, strict=True):
            assert out.token_ids == want.token_ids, f"temperature {temperature}"
            np.testing.assert_array_equal(out.logprobs, want.logprobs)
