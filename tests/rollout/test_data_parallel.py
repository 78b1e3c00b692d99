"""``LLM(data_parallel_size=2)`` (mode "replicas") on CPU (gloo): two rank processes, each with its
own engine, KV cache and routing segment (``dp_attention``: test_data_parallel_attention.py).

Against a single-rank engine on the same requests (prefix caching on, capture on, one intra-op
thread like each rank): greedy and seeded-sampled tokens and routed-expert rows are identical,
logprobs equal to float32 rounding (each rank batches other shapes), outputs come back in prompt
order, both ranks serve requests, and each rank has its own segment
``segment_name(instance_id, rank)``. ``update_weights`` reaches every rank (outputs change like
the single engine's, and come back on restoring). A refused request raises naming
its prompt index and leaves the ranks usable. Bad arguments raise before any process starts.
``shutdown`` ends the rank processes and leaves no segment.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.engine.data_parallel import DataParallelEngine
from rollout.capture.shm import segment_name
from rollout.testing import make_tiny_moe

ENGINE = {
    "device": "cpu",  # gloo ranks, also on a machine with one GPU
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 8,
    "capture_routing": True,
}
# Each rank batches a subset of the requests: other GEMM shapes and prefill chunks than the single
# engine's batches, so float32 logprobs differ by rounding (tokens and rows are exact).
LOGPROB_ATOL = 1e-5
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, return_routed_experts=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4"))


def _prompts(rng, lengths, vocab=300) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]


def _assert_same(outs, want, context):
    for i, (out, ref) in enumerate(zip(outs, want, strict=True)):
        assert out.prompt_token_ids == ref.prompt_token_ids, f"{context} {i}: order"
        assert out.token_ids == ref.token_ids, f"{context} {i}: tokens differ"
        np.testing.assert_allclose(
            out.logprobs,
            ref.logprobs,
            rtol=0,
            atol=LOGPROB_ATOL,
            err_msg=f"{context} {i}",
        )
        assert out.finish_reason == ref.finish_reason
        if ref.routed_experts is None:
            assert out.routed_experts is None
        else:
            np.testing.assert_array_equal(
                out.routed_experts,
                ref.routed_experts,
                err_msg=f"{context} {i}: rows differ",
            )


def test_two_ranks_equal_one_engine(glm4, rng):
    shared = _prompts(rng, [13])[0]
    prompts = [
        *_prompts(rng, [5, 21]),
        shared + _prompts(rng, [4])[0],
        shared + _prompts(rng, [7])[0],
        *_prompts(rng, [9, 30]),
    ]
    prompts.append(list(prompts[1]))  # a repeat: a prefix-cache hit on whichever rank
    sampled = SamplingParams(
        max_tokens=10, temperature=1.0, top_p=0.9, seed=3, return_routed_experts=True
    )
    params = [GREEDY if i % 2 else sampled for i in range(len(prompts))]
    params[4] = dataclasses.replace(GREEDY, return_routed_experts=False)
    params[5] = dataclasses.replace(GREEDY, routed_experts_start=7)
    weights = load_file(os.path.join(glm4, "model.safetensors"))
    name = next(n for n in weights if n.endswith("mlp.gate.weight"))
    changed = [(name, weights[name].flip(0))]  # another expert order: other routes
    with LLM(glm4, **ENGINE) as single:
        want = single.generate(prompts, params, use_tqdm=False)
        want_again = single.generate(prompts, params, use_tqdm=False)
        single.update_weights(changed)
        want_changed = single.generate(prompts, params, use_tqdm=False)

    dp = LLM(glm4, **ENGINE, data_parallel_size=2)
    front = dp.engine
    assert isinstance(front, DataParallelEngine)
    processes = list(front._processes)
    names = [segment_name(front.instance_id, r) for r in range(2)]
    assert [spec.name for spec in dp.routing_reader_specs] == names
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    try:
        outs = dp.generate(prompts, params, use_tqdm=False)
        _assert_same(outs, want, "first call")
        assert [out.request_id for out in outs] == list(range(len(prompts)))
        again = dp.generate(prompts, params, use_tqdm=False)  # hits on both ranks' caches
        _assert_same(again, want_again, "second call")
        stats = dp.stats
        assert stats.prefix_cache_hits > 0
        # Both ranks served requests: each rank's cache saw queries.
        per_rank = front._command(range(2), ("stats",))
        assert all(s.prefix_cache_queries > 0 for s in per_rank)
        assert stats.prefix_cache_queries == sum(s.prefix_cache_queries for s in per_rank)

        dp.update_weights(changed)
        changed_outs = dp.generate(prompts, params, use_tqdm=False)
        _assert_same(changed_outs, want_changed, "after update_weights")
        assert any(a.token_ids != b.token_ids for a, b in zip(changed_outs, want, strict=True))
        dp.update_weights([(name, weights[name])])
        restored = dp.generate(prompts, params, use_tqdm=False)
        for out, ref in zip(restored, want, strict=True):
            assert out.token_ids == ref.token_ids
            np.testing.assert_array_equal(out.routed_experts, ref.routed_experts)

        too_far = dataclasses.replace(GREEDY, routed_experts_start=6)
        with pytest.raises(ValueError, match=r"prompts\[1\]: routed_experts_start"):
            dp.generate([prompts[2], prompts[0], prompts[3]], [GREEDY, too_far, GREEDY])
        with pytest.raises(ValueError, match="mlp.gate.weight"):
            dp.update_weights([(name, weights[name][:1])])
        _assert_same(
            dp.generate(prompts[:2], params[:2], use_tqdm=False),
            want[:2],
            "after errors",
        )
    finally:
        dp.shutdown()
    assert all(not p.is_alive() and p.exitcode == 0 for p in processes)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names), "shutdown unlinks segments"
    with pytest.raises(RuntimeError, match="shut down"):
        dp.generate(prompts[:1], GREEDY)


def test_bad_arguments_raise_before_any_rank_starts(glm4):
    with pytest.raises(ValueError, match=r"data_parallel_size: expected an int >= 1, got 0"):
        LLM(glm4, **ENGINE, data_parallel_size=0)
    with pytest.raises(TypeError, match="data_parallel_size: expected an int"):
        LLM(glm4, **ENGINE, data_parallel_size=2.0)
    with pytest.raises(ValueError, match=r"data_parallel_mode: expected one of .*'pipeline'"):
        LLM(glm4, **ENGINE, data_parallel_size=2, data_parallel_mode="pipeline")
    with pytest.raises(
        ValueError, match="num_experts: expected a multiple of data_parallel_size=3"
    ):
        LLM(glm4, **ENGINE, data_parallel_size=3, data_parallel_mode="dp_attention")
    with pytest.raises(ValueError, match="device: expected None, 'cpu' or 'cuda'"):
        LLM(glm4, **{**ENGINE, "device": "cuda:1"}, data_parallel_size=2)


def test_single_rank_runs_in_process(glm4):
    with LLM(glm4, **ENGINE, data_parallel_size=1, data_parallel_mode="dp_attention") as llm:
        assert not isinstance(llm.engine, DataParallelEngine)
        assert llm.routing_reader_specs == (llm.routing_reader_spec,)


def test_ranks_draw_independent_unseeded_samples(glm4, rng):
    """The same unseeded prompt on two ranks must not draw the same answer (each rank's sampler
    has its own stream; the weights' seed is shared)."""
    prompt = _prompts(rng, [9])[0]
    sampling = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    with LLM(glm4, data_parallel_size=2, **ENGINE) as llm:
        first, second = llm.generate([prompt, prompt], sampling, use_tqdm=False)
        assert llm.stats.prefix_cache_queries > 0
    assert first.token_ids != second.token_ids
