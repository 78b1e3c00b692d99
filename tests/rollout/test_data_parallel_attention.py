"""``LLM(data_parallel_size=2, data_parallel_mode="dp_attention")`` on CPU (gloo): two ranks that
run attention on their own requests and share the MoE layers (tokens all-gathered, each rank
computing half of the experts, outputs reduce-scattered).

Against a single-rank engine on the same requests (prefix caching on, capture on, one intra-op
thread like each rank), for Qwen3-MoE, Qwen2-MoE (shared expert with a gate) and GLM4-MoE
(DEEPSEEK_V3 routing, shared experts, a dense first layer): greedy tokens and routed-expert rows
are identical and logprobs equal to float32 rounding, with uneven work (3 requests of different
lengths on 2 ranks, so one rank runs idle steps; one request alone, so one rank has none at
all; a prompt longer than the step budget: chunked prefill), after prefix cache hits, after
``update_weights`` of a router and of every expert of one layer (per-expert names: both ranks'
experts), and after a full sync with HF's in-memory state dict (fused [E, ...] expert tensors),
which writes every parameter and restores the outputs. Each rank holds half of the experts
(its fused expert parameters are [E / 2, ...], everything else as in the single engine). The
config runs eager. Configurations that cannot work raise: experts that do not split evenly
over the ranks (before any rank starts), a dp_attention engine without its process group.

On two CUDA devices (NCCL; skipped with fewer): float32 (torch attention, Triton fused experts
over expert slices) matches the single engine like on CPU; bfloat16 (FlashInfer, the KV cache
sized by the collective memory profile) agrees on nearly every token and row (the expert halves
are summed in bfloat16).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rollout import LLM, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.data_parallel import DataParallelEngine
from rollout.engine.llm_engine import LLMEngine
from rollout.testing import flashinfer_overrides, make_tiny_moe

ENGINE = {
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 8,
    "capture_routing": True,
    "device": "cpu",
}
DP_ATTENTION = {"data_parallel_size": 2, "data_parallel_mode": "dp_attention"}
# Each rank batches its own requests and the MoE sums partial outputs of two expert halves:
# float32 logprobs differ by rounding (tokens and rows are exact).
LOGPROB_ATOL = 1e-5


def _greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        return_routed_experts=True,
        **kwargs,
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "glm4_moe"])
def tiny(request, tmp_path_factory):
    return make_tiny_moe(request.param, tmp_path_factory.mktemp(request.param))


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
            assert out.routed_experts is None, f"{context} {i}"
        else:
            np.testing.assert_array_equal(
                out.routed_experts,
                ref.routed_experts,
                err_msg=f"{context} {i}: rows differ",
            )


def test_dp_attention_equals_one_engine(tiny, rng):
    # Least-loaded assignment: requests 0 and 2 to rank 0, 1 to rank 1; rank 0 is done first
    # and runs idle steps while rank 1 decodes.
    uneven = _prompts(rng, [6, 23, 9])
    uneven_params = [_greedy(3), _greedy(14), _greedy(5)]
    shared = _prompts(rng, [13])[0]
    prompts = [
        uneven[1],  # a prefix-cache hit
        shared + _prompts(rng, [4])[0],
        shared + _prompts(rng, [7])[0],
        _prompts(rng, [40])[0],  # longer than the step budget: chunked prefill
    ]
    params = [
        _greedy(6),
        _greedy(8, routed_experts_start=5),
        dataclasses.replace(_greedy(7), return_routed_experts=False),
        _greedy(5),
    ]
    alone = _prompts(rng, [11])  # one request: the other rank gets none
    weights = load_file(os.path.join(tiny, "model.safetensors"))
    name = next(n for n in weights if n.endswith("mlp.gate.weight"))
    layer = name.removesuffix("gate.weight")
    # Another expert order (other routes), and every expert of that layer changed: per-expert
    # names, so each rank must copy its own experts' tensors and skip the others'.
    down = {
        int(n.split(".")[-3]): t
        for n, t in weights.items()
        if n.startswith(f"{layer}experts.") and n.endswith("down_proj.weight")
    }
    changed = [(name, weights[name].flip(0))] + [
        (f"{layer}experts.{j}.down_proj.weight", 3 * down[j]) for j in sorted(down)
    ]
    # A trainer's full sync: HF's in-memory names, fused experts [E, ...] (the original weights).
    full = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).state_dict()
    assert any(n.endswith("experts.gate_up_proj") for n in full)

    def run(llm, parameter_names):
        results = [
            llm.generate(uneven, uneven_params, use_tqdm=False),
            llm.generate(prompts, params, use_tqdm=False),
            llm.generate(alone, _greedy(9), use_tqdm=False),
        ]
        assert llm.update_weights(changed) == {
            f"{layer}gate.weight",
            f"{layer}experts.down_proj",
        }
        results.append(llm.generate(prompts, params, use_tqdm=False))
        # Only the first half of the experts (rank 0's): no parameter is written completely
        # (on one engine), so on every rank.
        assert llm.update_weights(changed[1 : 1 + len(down) // 2]) == set()
        assert llm.update_weights(full.items()) == parameter_names
        results.append(llm.generate(uneven, uneven_params, use_tqdm=False))
        return results

    with LLM(tiny, **ENGINE) as single:
        model = single.engine.runner.model
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert single.parameter_names == set(shapes)
        want = run(single, set(shapes))
    num_experts = model.routing_params.num_experts
    with LLM(tiny, **ENGINE, **DP_ATTENTION) as dp:
        assert isinstance(dp.engine, DataParallelEngine)
        assert dp.config.enforce_eager
        assert dp.parameter_names == set(shapes)
        rank_shapes = dp.engine.parameter_shapes()
        got = run(dp, set(shapes))
        stats = dp.stats
    assert stats.prefix_cache_hits > 0 and stats.cuda_graph_sizes == ()
    # Each rank holds half of the experts, and everything else whole.
    for rank, held in enumerate(rank_shapes):
        experts = [n for n in held if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        assert len(experts) == 2 * len(model.moe_layers), rank
        for n, shape in held.items():
            want_shape = (num_experts // 2, *shapes[n][1:]) if n in experts else shapes[n]
            assert shape == want_shape, (rank, n)
    contexts = ["uneven", "prefix hits", "alone", "after update_weights", "full sync"]
    for context, outs, ref in zip(contexts, got, want, strict=True):
        _assert_same(outs, ref, context)
    _assert_same(got[4], got[0], "restored by the full sync")
    assert any(
        a.token_ids != b.token_ids or not np.array_equal(a.routed_experts, b.routed_experts)
        for a, b in zip(got[3], got[1], strict=True)
    ), "update_weights changed nothing"


def test_experts_that_do_not_split_raise_before_any_rank_starts(tmp_path):
    path = make_tiny_moe("qwen3_moe", tmp_path / "qwen3")  # 8 experts
    with pytest.raises(
        ValueError,
        match=r"num_experts: expected a multiple of data_parallel_size=3 .* got 8",
    ):
        LLM(path, **ENGINE, data_parallel_size=3, data_parallel_mode="dp_attention")
    # A dp_attention rank's engine needs the process group of its ranks.
    config = EngineConfig(model=path, **ENGINE, **DP_ATTENTION)
    with pytest.raises(ValueError, match="expected rank 0 of an initialized default process group"):
        LLMEngine(config)


def test_dp_attention_runs_eager():
    config = EngineConfig(model="m", enforce_eager=False, **DP_ATTENTION)
    assert config.dp_attention and config.enforce_eager
    # One rank is the in-process engine: nothing is collective, CUDA graphs stay allowed.
    single = EngineConfig(model="m", data_parallel_size=1, data_parallel_mode="dp_attention")
    assert not single.dp_attention and not single.enforce_eager
    replicas = EngineConfig(model="m", data_parallel_size=2)
    assert not replicas.dp_attention and not replicas.enforce_eager


# ---- CUDA (NCCL) -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_dp_attention_matches_one_engine(dtype, tmp_path, rng):
    path = make_tiny_moe("qwen2_moe", tmp_path / "qwen2", **flashinfer_overrides("qwen2_moe"))
    engine = {**ENGINE, "device": "cuda", "dtype": dtype}
    if dtype == "float32":
        engine["kv_cache_blocks"] = 256
    prompts = _prompts(rng, [6, 23, 9, 40])
    params = [_greedy(3), _greedy(14), _greedy(5), _greedy(8)]
    with LLM(path, **engine) as single:
        want = single.generate(prompts, params, use_tqdm=False)
    with LLM(path, **engine, **DP_ATTENTION) as dp:
        got = dp.generate(prompts, params, use_tqdm=False)
        assert dp.stats.cuda_graph_sizes == ()
    if dtype == "float32":
        for out, ref in zip(got, want, strict=True):
            assert out.token_ids == ref.token_ids
            np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=0, atol=1e-4)
            np.testing.assert_array_equal(out.routed_experts, ref.routed_experts)
        return
    tokens = np.concatenate([np.equal(o.token_ids, r.token_ids) for o, r in zip(got, want)])
    rows = np.concatenate(
        [(o.routed_experts == r.routed_experts).all(-1).ravel() for o, r in zip(got, want)]
    )
    assert tokens.mean() >= 0.9 and rows.mean() >= 0.95, (tokens.mean(), rows.mean())
