"""``rollout.LLM`` end to end on the tiny checkpoints of every family.

CPU float32: greedy generation equals HF transformers' greedy ``generate`` token for token
(24 new tokens, prompts of different lengths, two sharing a prefix and one repeated), with the
prefix cache on, off, and with a KV cache small enough to force preemption; logprobs equal
HF's log-softmax at the generated tokens within 2e-4; a repeated prompt is served from the
prefix cache with identical outputs. Seeded sampling is reproducible whatever the batch, top-k
1 is greedy, bad inputs raise, ``update_weights`` changes and restores outputs.
gpu (bf16 on CUDA): logprobs and greedy agreement against HF, CUDA graphs on vs off,
``update_weights`` under CUDA graphs.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rollout import LLM, RequestOutput, RoutingSpec, SamplingParams
from rollout.testing import FAMILIES, flashinfer_overrides, make_tiny_moe

NEW_TOKENS = 24
LOGPROB_ATOL = 2e-4
# Small blocks and a small token budget: many blocks per prompt, chunked prefill.
ENGINE = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
PREEMPT_KV_BLOCKS = 18
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def _prompts(vocab: int, gen: torch.Generator) -> list[list[int]]:
    """Lengths 5, 17, 23, 23, 37: two share a 14-token prefix, one is repeated."""

    def rand(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    shared = rand(14)
    p2 = shared + rand(9)
    return [rand(5), shared + rand(3), p2, list(p2), rand(37)]


def _hf_greedy(hf, prompt, max_new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


def _hf_logprobs(hf, prompt, generated):
    """log_softmax (float32) of HF's logits at each generated token."""
    ids = torch.tensor([prompt + generated], device=hf.device)
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    target = torch.tensor(generated, device=rows.device)
    return torch.log_softmax(rows, dim=-1).gather(1, target[:, None])[:, 0].cpu().numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, seed_for):
    """(family, checkpoint path, prompts, HF greedy tokens, HF logprobs of those tokens)."""
    name = request.param
    path = make_tiny_moe(name, tmp_path_factory.mktemp(name))
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    seed = seed_for(f"{request.node.nodeid}[{name}]")
    prompts = _prompts(hf.config.vocab_size, torch.Generator().manual_seed(seed))
    tokens = [_hf_greedy(hf, p) for p in prompts]
    logprobs = [_hf_logprobs(hf, p, t) for p, t in zip(prompts, tokens)]
    return name, path, prompts, tokens, logprobs, hf


def _eos_ids(hf) -> set[int]:
    eos = hf.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _check_against_hf(outs, prompts, tokens, logprobs, eos_ids):
    assert [o.prompt_token_ids for o in outs] == prompts
    for i, (out, want) in enumerate(zip(outs, tokens)):
        assert out.token_ids == want, f"prompt {i}: tokens differ from HF greedy"
        # An EOS as the last allowed token is a stop, as in vLLM; HF returns the same tokens.
        stopped = len(want) < NEW_TOKENS or want[-1] in eos_ids
        assert out.finish_reason == ("stop" if stopped else "length"), f"prompt {i}"
    for out, want in zip(outs, logprobs):
        assert out.logprobs.dtype == np.float32 and out.logprobs.shape == want.shape
        diff = float(np.abs(out.logprobs - want).max())
        assert diff <= LOGPROB_ATOL, f"max |logprob diff| {diff:.3g}"


@pytest.mark.parametrize("mode", ["prefix_cache", "no_prefix_cache", "preemption"])
def test_greedy_matches_hf(family, mode):
    _, path, prompts, tokens, logprobs, hf = family
    kwargs = dict(ENGINE, enable_prefix_caching=mode != "no_prefix_cache")
    if mode == "preemption":
        kwargs["kv_cache_blocks"] = PREEMPT_KV_BLOCKS
    llm = LLM(path, **kwargs)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check_against_hf(outs, prompts, tokens, logprobs, _eos_ids(hf))
    stats = llm.stats
    assert (stats.num_preemptions > 0) == (mode == "preemption"), stats
    assert (stats.prefix_cache_hits > 0) == (mode != "no_prefix_cache"), stats
    # The repeated prompt is identical to its twin, shared blocks or not.
    assert outs[3].token_ids == outs[2].token_ids
    if mode == "prefix_cache":
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
        for first, second in zip(outs, again):
            block = ENGINE["block_size"]
            expected = (len(first.prompt_token_ids) - 1) // block * block
            assert second.num_cached_tokens == expected > 0
            assert second.token_ids == first.token_ids
            np.testing.assert_allclose(second.logprobs, first.logprobs, atol=1e-5, rtol=0)


def test_routing_spec_matches_the_model(family):
    name, path, _, _, _, hf = family
    spec = LLM(path, kv_cache_blocks=8).routing_spec
    moe = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    assert isinstance(spec, RoutingSpec)
    assert spec.moe_layers == moe and spec.num_moe_layers == len(moe)
    assert spec.num_experts == hf.model.layers[moe[0]].mlp.gate.weight.shape[0]
    assert spec.top_k == hf.config.num_experts_per_tok
    assert spec.id_dtype == np.uint8
    if name == "glm4_moe":
        assert (spec.n_group, spec.topk_group) == (4, 2) and spec.routed_scaling_factor == 2.5


def _perturbed(tensors, gen):
    return {name: t + 0.2 * torch.randn(t.shape, generator=gen) for name, t in tensors.items()}


def test_update_weights_changes_and_restores_outputs(family, rng):
    _, path, prompts, _, _, _ = family
    llm = LLM(path, **ENGINE)
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    before = llm.generate(prompts[:3], sampling, use_tqdm=False)
    original = load_file(str(path / "model.safetensors"))
    written = llm.update_weights(_perturbed(original, rng).items())
    assert written == {name for name, _ in llm.engine.runner.model.named_parameters()}
    changed = llm.generate(prompts[:3], sampling, use_tqdm=False)
    assert [o.token_ids for o in changed] != [o.token_ids for o in before]
    # Prompts 0 and 1 were cached by the first call (prompt 2 shares blocks with prompt 1).
    assert changed[0].num_cached_tokens == changed[1].num_cached_tokens == 0, "stale cache"
    llm.update_weights(original.items())
    after = llm.generate(prompts[:3], sampling, use_tqdm=False)
    for b, a in zip(before, after):
        assert a.token_ids == b.token_ids and np.array_equal(a.logprobs, b.logprobs)


# ---- single-family behaviour ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))
    return path, LLM(path, **ENGINE)


def _rand_prompt(rng, n, vocab=300):
    return torch.randint(0, vocab, (n,), generator=rng).tolist()


def test_seeded_sampling_is_reproducible(qwen3, rng):
    path, llm = qwen3
    target = _rand_prompt(rng, 9)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate([target], seeded, use_tqdm=False)[0]
    others = [_rand_prompt(rng, n) for n in (13, 6, 21)]
    params = [
        SamplingParams(max_tokens=16, temperature=1.0),
        SamplingParams(max_tokens=5, temperature=0.7, seed=1),
        seeded,
        SamplingParams(max_tokens=20, temperature=0.0),
    ]
    batch = llm.generate([others[0], others[1], target, others[2]], params, use_tqdm=False)
    assert batch[2].token_ids == alone.token_ids
    np.testing.assert_allclose(batch[2].logprobs, alone.logprobs, atol=1e-5, rtol=0)
    # Another engine seed and preemptions (recomputed prefixes) change nothing either.
    small = LLM(path, **{**ENGINE, "kv_cache_blocks": 12}, seed=77)
    reordered = small.generate(
        [target, *others], [seeded, params[0], params[1], params[3]], use_tqdm=False
    )
    assert small.stats.num_preemptions > 0
    assert reordered[0].token_ids == alone.token_ids
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=4321)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].token_ids != alone.token_ids


def test_unseeded_sampling_follows_the_engine_seed(qwen3, rng):
    path, _ = qwen3
    prompts = [_rand_prompt(rng, n) for n in (4, 9, 15)]
    sampling = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def run(seed):
        llm = LLM(path, **ENGINE, seed=seed)
        return [o.token_ids for o in llm.generate(prompts, sampling, use_tqdm=False)]

    first = run(3)
    assert first == run(3)
    assert first != run(4)


def test_top_k_one_is_greedy(qwen3, rng):
    _, llm = qwen3
    prompts = [_rand_prompt(rng, n) for n in (3, 12)]
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(
        prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.7, top_k=1), use_tqdm=False
    )
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_per_prompt_sampling_stop_tokens_and_text(qwen3, rng):
    _, llm = qwen3
    prompts = ["The quick brown fox", "Mixture-of-experts language models route"]
    free = llm.generate(prompts, GREEDY, use_tqdm=False)
    stop = free[0].token_ids[4]
    outs = llm.generate(
        prompts,
        [
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[stop]),
            SamplingParams(max_tokens=3, temperature=0.0),
        ],
        use_tqdm=False,
    )
    assert isinstance(outs[0], RequestOutput)
    first_stop = free[0].token_ids.index(stop)
    assert outs[0].token_ids == free[0].token_ids[: first_stop + 1]
    assert outs[0].finish_reason == "stop"
    assert outs[1].token_ids == free[1].token_ids[:3] and outs[1].finish_reason == "length"
    assert outs[0].prompt_token_ids == llm.tokenizer.encode(prompts[0]).ids
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.routed_experts is None


def test_bad_inputs_raise(qwen3, tmp_path):
    path, llm = qwen3
    vocab = llm.engine.vocab_size
    max_len = llm.stats.max_model_len
    ok = SamplingParams(max_tokens=2)
    cases = [
        ([[]], ok, r"prompts\[0\]: expected at least 1 token"),
        ([[1, 2], ""], ok, r"prompts\[1\]: expected at least 1 token"),
        ([[1, vocab]], ok, rf"prompts\[0\]: expected token ids in \[0, {vocab}\), got {vocab}"),
        ([[3], [-1, 2]], ok, r"prompts\[1\]: expected token ids .* got -1"),
        ([[1] * 10], SamplingParams(max_tokens=max_len), r"prompts\[0\]: max_tokens"),
        ([[1], [2]], [ok], r"sampling: expected one SamplingParams per prompt \(2\), got 1"),
        (
            [[1]],
            SamplingParams(return_routed_experts=True),
            r"return_routed_experts: expected False .* capture_routing=False",
        ),
    ]
    for prompts, sampling, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompts, sampling, use_tqdm=False)
        assert not llm.engine.has_unfinished(), f"{match}: requests left behind"
    with pytest.raises(TypeError, match="prompts: expected a list"):
        llm.generate("a prompt", ok)
    with pytest.raises(TypeError, match="sampling"):
        llm.generate([[1]], {"max_tokens": 2})
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(path, max_num_seqs=0)
    with pytest.raises(TypeError, match="capture_routing"):
        LLM(path, capture_routing=1)
    with pytest.raises(ValueError, match="model: expected a checkpoint folder"):
        LLM(tmp_path / "nothing")
    # Strings need a tokenizer.
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "tokenizer.json").unlink()
    no_tokenizer = LLM(bare, kv_cache_blocks=16)
    with pytest.raises(ValueError, match=r"prompts\[0\]: expected token ids, .* no tokenizer"):
        no_tokenizer.generate(["hello"], ok)
    assert no_tokenizer.generate([[5, 6]], ok, use_tqdm=False)[0].text is None
    # Weights are only updated between requests.
    request = llm.engine.add_request([1, 2, 3], ok)
    with pytest.raises(RuntimeError, match="update_weights: expected no unfinished requests"):
        llm.update_weights([])
    llm.engine.abort_request(request)
    assert llm.generate([[1, 2, 3]], ok, use_tqdm=False)[0].finish_reason == "length"


def test_context_manager_shuts_down(qwen3):
    path, _ = qwen3
    with LLM(path, kv_cache_blocks=16, device=torch.device("cpu"), dtype=torch.float32) as llm:
        outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=True)
        assert len(outs[0].token_ids) <= 2
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1]])
    llm.shutdown()  # idempotent


# ---- CUDA, bf16 ------------------------------------------------------------------------------

# A fixed KV cache: memory-based sizing is tested in test_model_runner, and engines of earlier
# tests that the garbage collector has not freed yet would shrink a memory-sized one.
GPU_ENGINE = dict(dtype="bfloat16", device="cuda", max_num_seqs=8, kv_cache_blocks=512)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def cuda_family(request, tmp_path_factory, seed_for):
    """(family, checkpoint with FlashInfer-sized heads, prompts, HF bf16 model on CUDA)."""
    name = request.param
    path = make_tiny_moe(name, tmp_path_factory.mktemp(name), **flashinfer_overrides(name))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    seed = seed_for(f"{request.node.nodeid}[{name}]")
    return name, path, _prompts(hf.config.vocab_size, torch.Generator().manual_seed(seed)), hf


@pytest.mark.gpu
def test_cuda_bf16_against_hf(cuda_family):
    name, path, prompts, hf = cuda_family
    with LLM(path, **GPU_ENGINE) as llm:
        assert llm.stats.cuda_graph_sizes == (1, 2, 4, 8)
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    diffs = np.concatenate(
        [np.abs(o.logprobs - _hf_logprobs(hf, p, o.token_ids)) for p, o in zip(prompts, outs)]
    )
    agreement = []
    for p, o in zip(prompts, outs):
        theirs = _hf_greedy(hf, p)
        common = next(
            (i for i, (a, b) in enumerate(zip(o.token_ids, theirs)) if a != b),
            min(len(theirs), len(o.token_ids)),
        )
        agreement.append(common / max(len(theirs), 1))
    print(
        f"{name}: logprob |diff| mean {diffs.mean():.4f} max {diffs.max():.4f}; "
        f"greedy agreement (common prefix) {np.mean(agreement):.3f}"
    )
    assert diffs.mean() < 0.05 and diffs.max() < 0.5
    assert np.mean(agreement) >= 0.5


@pytest.mark.gpu
def test_cuda_graphs_match_eager(cuda_family):
    """Four prompts that finish together: every decode step is an exact graph bucket, so the
    graphs run the very kernels the eager steps run."""
    _, path, prompts, _ = cuda_family
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    results = []
    for eager in (True, False):
        with LLM(path, **GPU_ENGINE, enforce_eager=eager) as llm:
            assert bool(llm.stats.cuda_graph_sizes) is not eager
            results.append(llm.generate(prompts[:4], sampling, use_tqdm=False))
    diff = max(float(np.abs(a.logprobs - b.logprobs).max()) for a, b in zip(*results))
    print(f"graphs vs eager: max |logprob diff| {diff:.3g}")
    assert [o.token_ids for o in results[0]] == [o.token_ids for o in results[1]]
    assert diff <= 1e-3


@pytest.mark.gpu
def test_cuda_update_weights_keeps_graphs_valid(cuda_family, rng):
    _, path, prompts, _ = cuda_family
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    original = load_file(str(path / "model.safetensors"))
    with LLM(path, **GPU_ENGINE) as llm:
        before = llm.generate(prompts, sampling, use_tqdm=False)
        llm.update_weights(_perturbed(original, rng).items())
        changed = llm.generate(prompts, sampling, use_tqdm=False)
        llm.update_weights(original.items())
        after = llm.generate(prompts, sampling, use_tqdm=False)
    assert [o.token_ids for o in changed] != [o.token_ids for o in before]
    for b, a in zip(before, after):
        assert a.token_ids == b.token_ids and np.array_equal(a.logprobs, b.logprobs)


@pytest.mark.gpu
def test_cuda_head_size_without_flashinfer_kernels(tmp_path, rng):
    """Head size 16 (the tiny default, which FlashInfer has no kernels for) runs on the torch
    backend instead of failing at the first decode step, and still agrees with HF."""
    path = make_tiny_moe("qwen3_moe", tmp_path / "qwen3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    assert hf.config.head_dim == 16
    prompts = _prompts(hf.config.vocab_size, rng)
    with LLM(path, **GPU_ENGINE) as llm:
        assert llm.stats.cuda_graph_sizes == ()
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        diff = np.abs(out.logprobs - _hf_logprobs(hf, prompt, out.token_ids))
        assert diff.mean() < 0.05 and diff.max() < 0.5
