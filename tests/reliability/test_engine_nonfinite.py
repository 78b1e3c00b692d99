"""Non-finite numbers fail loudly (issue 13, section 2).

Sampler: a row with a NaN, +inf or -inf logit comes back with token 0 and logprob NaN (the flag
that reaches the host with the logprobs), greedy, seeded, unseeded and top-k / top-p rows alike;
every other row of the batch gets exactly the token and logprob it gets without the bad rows.

Engine, CPU float32: NaN written into the weights (``update_weights``, as a trainer's broken
step would) of ``lm_head`` (one row), of the final norm, or of the last MoE layer's expert that
the prompt's last token is routed to, makes ``generate`` raise ``NonFiniteLogitsError``, a
ValueError naming the prompt and the request, instead of returning tokens with NaN logprobs.
With NaN in the embedding of a token that only one prompt of the batch holds, the error names
that prompt; the other prompt, run alone on the same weights, returns exactly its clean outputs.
After the good weights are written back, outputs are those of the clean engine. gpu: NaN that
first reaches the logits in a decode step replayed from a CUDA graph, with FlashInfer sampling.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.engine.llm_engine import NonFiniteLogitsError
from rollout.sampler import Sampler
from rollout.testing import flashinfer_overrides, make_tiny_moe

VOCAB = 97
ENGINE = {
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 4,
    "capture_routing": True,
    "device": "cpu",
}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, return_routed_experts=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _row_params() -> list[SamplingParams]:
    """Eight rows of every kind, twice: greedy, seeded, unseeded, top-k and top-p."""
    kinds = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=11),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8, seed=3),
    ]
    return kinds + kinds


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sampler_flags_rows_with_a_non_finite_logit(bad, rng):
    params = _row_params()
    logits_SV = torch.randn(len(params), VOCAB, generator=rng) * 3
    bad_rows = torch.randperm(len(params), generator=rng)[:3].tolist()
    dirty_SV = logits_SV.clone()
    for row in bad_rows:
        dirty_SV[row, torch.randint(0, VOCAB, (1,), generator=rng)] = bad

    def sample(logits):
        sampler = Sampler(vocab_size=VOCAB, device="cpu", seed=5)
        return sampler(logits, sampler.prepare(params, [2] * len(params)))

    ids_S, logprobs_S = sample(dirty_SV)
    clean_ids_S, clean_logprobs_S = sample(logits_SV)
    for row in range(len(params)):
        if row in bad_rows:
            assert int(ids_S[row]) == 0 and math.isnan(float(logprobs_S[row])), f"row {row}"
        else:
            assert int(ids_S[row]) == int(clean_ids_S[row]), f"row {row}"
            assert float(logprobs_S[row]) == float(clean_logprobs_S[row]), f"row {row}"
            assert math.isfinite(float(logprobs_S[row]))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def engine(qwen3):
    """One engine for the module: every test writes the good weights back at its end."""
    llm = LLM(qwen3, **ENGINE)
    yield llm, load_file(os.path.join(qwen3, "model.safetensors"))
    llm.shutdown()


def _prompt(rng: torch.Generator, n: int, vocab: int = 300) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=rng).tolist()


def _with_nan(weights: dict[str, torch.Tensor], name: str, index) -> dict[str, torch.Tensor]:
    tensor = weights[name].clone()
    tensor[index] = float("nan")
    return {**weights, name: tensor}


def _assert_same(outs, want):
    for out, ref in zip(outs, want, strict=True):
        assert out.token_ids == ref.token_ids
        np.testing.assert_array_equal(out.logprobs, ref.logprobs)
        np.testing.assert_array_equal(out.routed_experts, ref.routed_experts)


@pytest.mark.parametrize("site", ["lm_head_row", "final_norm", "last_layer_expert"])
def test_nan_weights_raise_naming_the_prompt(engine, site, rng):
    llm, weights = engine
    prompts = [_prompt(rng, 9)]
    clean = llm.generate(prompts, GREEDY, use_tqdm=False)
    if site == "lm_head_row":
        name, index = "lm_head.weight", int(torch.randint(0, 300, (1,), generator=rng))
    elif site == "final_norm":
        name, index = "model.norm.weight", int(torch.randint(0, 64, (1,), generator=rng))
    else:
        # The expert that routes the prompt's last token in the last MoE layer (its row).
        expert = int(clean[0].routed_experts[len(prompts[0]) - 1, -1, 0])
        last = llm.routing_spec.moe_layers[-1]
        name, index = f"model.layers.{last}.mlp.experts.{expert}.down_proj.weight", 0
    llm.update_weights(_with_nan(weights, name, index).items())
    try:
        with pytest.raises(NonFiniteLogitsError, match=r"^prompts\[0\]: logits: .*request \d+"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        llm.update_weights(weights.items())
    _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), clean)


def test_nan_in_one_request_names_that_request_and_spares_the_other(engine, rng):
    """NaN in the last MoE layer's expert that routes the second prompt's last token, which the
    first prompt never routes to (there; the routers before it check their logits on CPU)."""
    llm, weights = engine
    last = llm.routing_spec.moe_layers[-1]
    short = SamplingParams(
        max_tokens=3, temperature=0.0, ignore_eos=True, return_routed_experts=True
    )
    for _ in range(50):
        prompts = [_prompt(rng, 3), _prompt(rng, 12)]
        clean = llm.generate(prompts, short, use_tqdm=False)
        expert = int(clean[1].routed_experts[len(prompts[1]) - 1, -1, 0])
        if expert not in clean[0].routed_experts[:, -1].ravel().tolist():
            break
    else:
        pytest.fail("no expert of the second prompt that the first never uses")
    # Alone, on the clean weights (a batch of other rows rounds differently).
    alone = llm.generate(prompts[:1], short, use_tqdm=False)
    name = f"model.layers.{last}.mlp.experts.{expert}.down_proj.weight"
    llm.update_weights(_with_nan(weights, name, 0).items())
    try:
        with pytest.raises(NonFiniteLogitsError, match=r"^prompts\[1\]: ") as raised:
            llm.generate(prompts, short, use_tqdm=False)
        assert isinstance(raised.value, ValueError)
        _assert_same(llm.generate(prompts[:1], short, use_tqdm=False), alone)
    finally:
        llm.update_weights(weights.items())
    _assert_same(llm.generate(prompts, short, use_tqdm=False), clean)


@pytest.mark.gpu
def test_cuda_nan_in_a_decode_step_raises(tmp_path, rng):
    """bf16, CUDA graphs, FlashInfer sampling of unseeded rows: NaN in the embedding of a token
    the first request only generates later reaches its logits in a decode step replayed from a
    graph (the Triton router does not check its logits: NaN weights, then NaN outputs); the
    error names that request, and the good weights then give the clean outputs again."""
    path = make_tiny_moe("qwen3_moe", tmp_path / "qwen3", **flashinfer_overrides("qwen3_moe"))
    weights = load_file(os.path.join(path, "model.safetensors"))
    llm = LLM(path, **dict(ENGINE, device="cuda", dtype="bfloat16", kv_cache_blocks=256))
    assert llm.engine.runner.graph_sizes
    prompts = [_prompt(rng, 6), _prompt(rng, 10), _prompt(rng, 4)]
    params = [
        dataclasses.replace(GREEDY, max_tokens=24),
        dataclasses.replace(GREEDY, max_tokens=24, temperature=1.0, seed=4),
        dataclasses.replace(GREEDY, max_tokens=24, temperature=1.0, top_p=0.9),
    ]
    clean = llm.generate(prompts, params, use_tqdm=False)
    others = set(prompts[1]) | set(prompts[2]) | set(clean[1].token_ids) | set(clean[2].token_ids)
    first = clean[0].token_ids
    # A token the first request generates late, fed by a decode step, and nothing else feeds.
    token = next(
        (t for i, t in enumerate(first[5:-1], 5) if t not in others and t not in first[:i]),
        None,
    )
    if token is None or token in prompts[0]:
        pytest.skip("no token that only the first request generates late")
    llm.update_weights(_with_nan(weights, "model.embed_tokens.weight", token).items())
    try:
        with pytest.raises(NonFiniteLogitsError, match=r"^prompts\[0\]: "):
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.update_weights(weights.items())
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 1):  # greedy and seeded: reproducible
        assert outs[i].token_ids == clean[i].token_ids
