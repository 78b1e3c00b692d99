"""``LLM.sleep`` / ``LLM.wake_up``: the KV cache (and CUDA graphs, attention workspaces) released
while a colocated trainer runs, and rebuilt afterwards.

CPU float32, tiny models, capture on: greedy tokens, logprobs and routed-expert rows after
sleep -> wake_up equal those before; the KV cache is gone while asleep and comes back with the
same number of blocks; the prefix cache is forgotten; weights pushed while asleep are the ones
generating after wake_up (and restoring them restores the outputs); the routing store keeps the
rows of finished requests (the last step's included) for a reader while the engine sleeps;
generate / add_request / step raise while asleep; sleep with unfinished requests raises naming
their count; a wake_up that runs out of memory leaves the engine asleep and can be retried;
sleep twice and wake_up when awake do nothing; the data-parallel front end forwards all of it
to its ranks.
gpu (bf16 on CUDA, CUDA graphs): ``memory_reserved`` and the device's free memory grow by at
least the KV cache's size on sleep; graph replays after wake_up give the outputs of before, also
after weights pushed while asleep.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, RequestOutput, SamplingParams
from rollout.capture import RoutedExpertsReader
from rollout.engine import kv_cache
from rollout.testing import flashinfer_overrides, make_tiny_moe

# On the CPU (gloo ranks for the data-parallel test), also on a machine with a GPU.
ENGINE = dict(
    device="cpu", block_size=4, max_num_batched_tokens=32, max_num_seqs=8, capture_routing=True
)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, return_routed_experts=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """Dense first layer and grouped selection: rows of a subset of the layers."""
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4"))


def _prompts(rng, lengths, vocab=300) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]


def _perturbed(path, gen) -> tuple[dict, dict]:
    """(the checkpoint's tensors, the same with noise): other outputs and other routes."""
    original = load_file(os.path.join(path, "model.safetensors"))
    noisy = {n: t + 0.2 * torch.randn(t.shape, generator=gen) for n, t in original.items()}
    return original, noisy


def _assert_same(outs: list[RequestOutput], want: list[RequestOutput], context: str) -> None:
    """Exactly equal tokens, logprobs and rows (same engine, same batches, same kernels)."""
    assert len(outs) == len(want), context
    for i, (out, ref) in enumerate(zip(outs, want, strict=True)):
        assert out.token_ids == ref.token_ids, f"{context} {i}: tokens differ"
        np.testing.assert_array_equal(out.logprobs, ref.logprobs, err_msg=f"{context} {i}")
        if ref.routed_experts is None:
            assert out.routed_experts is None, f"{context} {i}"
        else:
            rows = len(out.prompt_token_ids) + len(out.token_ids) - 1
            assert out.routed_experts.shape[0] == rows, f"{context} {i}: row count"
            np.testing.assert_array_equal(
                out.routed_experts,
                ref.routed_experts,
                err_msg=f"{context} {i}: rows differ",
            )


def _kv_views(llm: LLM) -> list:
    return [layer.self_attn.attn.kv_cache for layer in llm.engine.runner.model.model.layers]


def test_outputs_and_rows_after_wake_up_equal_those_before(glm4, rng):
    prompts = _prompts(rng, [5, 13, 21, 9])
    prompts.append(list(prompts[1]))  # a repeat: served from the prefix cache when there is one
    with LLM(glm4, **ENGINE) as llm:
        runner = llm.engine.runner
        blocks, kv_shape = runner.num_kv_blocks, tuple(runner.kv_cache.shape)
        before = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert before[4].num_cached_tokens > 0, "the repeat should hit the prefix cache"
        assert not llm.is_sleeping

        llm.sleep()
        assert llm.is_sleeping and llm.engine.is_sleeping
        assert runner.kv_cache is None and runner.backend is None
        assert all(view is None for view in _kv_views(llm)), "a layer keeps the cache alive"
        llm.sleep()  # a no-op
        assert llm.is_sleeping
        assert llm.stats.num_kv_blocks == blocks

        llm.wake_up()
        assert not llm.is_sleeping
        assert runner.num_kv_blocks == blocks and tuple(runner.kv_cache.shape) == kv_shape
        assert all(view is not None for view in _kv_views(llm))
        kv = runner.kv_cache
        llm.wake_up()  # a no-op: the cache is the same tensor
        assert runner.kv_cache is kv
        after = llm.generate(prompts, GREEDY, use_tqdm=False)
        # The prefix cache was forgotten (its KV is gone): the first prompts are computed anew.
        assert after[0].num_cached_tokens == after[1].num_cached_tokens == 0
        _assert_same(after, before, "after wake_up")


def test_update_weights_while_asleep_is_used_after_wake_up(glm4, rng):
    prompts = _prompts(rng, [7, 16, 11])
    original, noisy = _perturbed(glm4, rng)
    with LLM(glm4, **ENGINE) as llm:
        before = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.update_weights(noisy.items())  # awake: the reference for the new weights
        want_changed = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.update_weights(original.items())
        assert [o.token_ids for o in want_changed] != [o.token_ids for o in before]

        llm.sleep()
        written = llm.update_weights(noisy.items())
        assert written == {name for name, _ in llm.engine.runner.model.named_parameters()}
        assert llm.is_sleeping
        llm.wake_up()
        _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), want_changed, "new weights")

        llm.sleep()
        llm.update_weights(original.items())
        llm.wake_up()
        _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), before, "restored weights")


def test_asleep_engine_refuses_work_and_busy_engine_refuses_sleep(glm4, rng):
    prompt = _prompts(rng, [6])[0]
    with LLM(glm4, **ENGINE) as llm:
        engine = llm.engine
        first = engine.add_request(prompt, GREEDY)
        engine.add_request(prompt, GREEDY)
        engine.step()
        with pytest.raises(RuntimeError, match="sleep: expected no unfinished requests, got 2"):
            llm.sleep()
        assert not llm.is_sleeping and llm.engine.runner.kv_cache is not None
        engine.abort_request(first)
        with pytest.raises(RuntimeError, match="got 1"):
            llm.sleep()
        while engine.has_unfinished():
            engine.step()

        llm.sleep()
        with pytest.raises(RuntimeError, match=r"generate: engine is asleep: call wake_up\(\)"):
            llm.generate([prompt], GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match=r"add_request: engine is asleep: call wake_up\(\)"):
            engine.add_request(prompt, GREEDY)
        with pytest.raises(RuntimeError, match=r"step: engine is asleep: call wake_up\(\)"):
            engine.step()
        assert not engine.has_unfinished(), "a refused request must not stay queued"
        llm.wake_up()
        (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert len(out.token_ids) == GREEDY.max_tokens
    # Shutting down an asleep engine works too.
    llm = LLM(glm4, **ENGINE)
    llm.sleep()
    llm.shutdown()


def test_failed_wake_up_stays_asleep_and_can_be_retried(glm4, rng, monkeypatch):
    """Out of memory while waking (the trainer still holds it): nothing half-built is kept, the
    engine stays asleep, and a later wake_up works."""
    prompts = _prompts(rng, [6, 11])
    with LLM(glm4, **ENGINE) as llm:
        before = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.sleep()
        runner = llm.engine.runner

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("no room for the KV cache")

        with monkeypatch.context() as patch:
            patch.setattr(kv_cache, "allocate_kv_cache", out_of_memory)
            with pytest.raises(torch.OutOfMemoryError, match="no room"):
                llm.wake_up()
        assert llm.is_sleeping and runner.kv_cache is None and runner.backend is None
        with pytest.raises(RuntimeError, match="engine is asleep"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.wake_up()
        _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), before, "after a retry")


def test_routing_store_keeps_finished_rows_while_asleep(glm4, rng):
    """A trainer-side reader reads a finished request's rows by slot while the engine sleeps,
    those of its last step included (sleep files the step's pending copy). The request did not
    ask for rows, so nothing else committed that step; its rows are compared with those of the
    same greedy request asking for them after wake_up (the store starts zeroed, and a row's k
    ids are distinct: stale rows cannot pass)."""
    prompt = _prompts(rng, [9])[0]
    no_rows = dataclasses.replace(GREEDY, return_routed_experts=False)
    with LLM(glm4, **ENGINE) as llm:
        engine = llm.engine
        slots: list[int] = []
        save_rows = engine.capture.on_finish

        def on_finish(seq):
            slots.extend(seq.slots(0, len(seq) - 1))
            save_rows(seq)

        engine.capture.on_finish = on_finish
        llm.generate([prompt], no_rows, use_tqdm=False)
        llm.sleep()
        with RoutedExpertsReader.from_spec(llm.routing_reader_spec) as reader:
            rows = reader.read(slots)
        llm.wake_up()
        (want,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    np.testing.assert_array_equal(rows, want.routed_experts)


def test_data_parallel_ranks_sleep_and_wake_up(glm4, rng):
    prompts = _prompts(rng, [5, 14, 9, 20])
    original, noisy = _perturbed(glm4, rng)
    with LLM(glm4, **ENGINE, data_parallel_size=2) as dp:
        before = dp.generate(prompts, GREEDY, use_tqdm=False)
        dp.update_weights(noisy.items())
        want_changed = dp.generate(prompts, GREEDY, use_tqdm=False)
        dp.update_weights(original.items())

        dp.sleep()
        assert dp.is_sleeping
        for rank in range(2):  # every rank is asleep itself, not only the front end
            with pytest.raises(RuntimeError, match="add_request: engine is asleep"):
                dp.engine._command([rank], ("add", [(prompts[0], GREEDY)]))
        with pytest.raises(RuntimeError, match="generate: engine is asleep"):
            dp.generate(prompts, GREEDY, use_tqdm=False)
        dp.update_weights(noisy.items())
        dp.wake_up()
        assert not dp.is_sleeping
        _assert_same(dp.generate(prompts, GREEDY, use_tqdm=False), want_changed, "dp new weights")
        dp.sleep()
        dp.update_weights(original.items())
        dp.wake_up()
        _assert_same(dp.generate(prompts, GREEDY, use_tqdm=False), before, "dp restored")


# ---- CUDA, bf16, CUDA graphs ---------------------------------------------------------------------

# A KV cache of ~200 MB: far above the caching allocator's segment sharing, so freeing it must
# show in memory_reserved.
GPU_ENGINE = dict(dtype="bfloat16", device="cuda", max_num_seqs=8, kv_cache_blocks=8192)
MIN_GPU_KV_BYTES = 64 << 20


@pytest.fixture(scope="module")
def cuda_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_cuda")
    return make_tiny_moe("qwen3_moe", path, **flashinfer_overrides("qwen3_moe"))


@pytest.mark.gpu
def test_cuda_sleep_returns_the_kv_memory_and_graphs_replay_the_same(cuda_qwen3, rng):
    """Four prompts that finish together: every decode step replays the batch-4 graph."""
    prompts = _prompts(rng, [5, 9, 14, 20])
    with LLM(cuda_qwen3, **GPU_ENGINE, capture_routing=True) as llm:
        runner = llm.engine.runner
        sizes = list(runner.graph_sizes)
        assert sizes, "expected CUDA graphs (FlashInfer installed, enforce_eager off)"
        kv_bytes = runner.kv_cache.nbytes
        assert kv_bytes >= MIN_GPU_KV_BYTES
        before = llm.generate(prompts, GREEDY, use_tqdm=False)
        torch.cuda.synchronize()
        reserved, free = torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0]

        llm.sleep()
        released = reserved - torch.cuda.memory_reserved()
        freed = torch.cuda.mem_get_info()[0] - free
        print(
            f"KV cache {kv_bytes / 2**20:.0f} MiB; sleep released {released / 2**20:.0f} MiB "
            f"reserved, device free memory +{freed / 2**20:.0f} MiB"
        )
        assert released >= kv_bytes and freed >= kv_bytes

        llm.wake_up()
        assert runner.graph_sizes == sizes and runner.kv_cache.nbytes == kv_bytes
        after = llm.generate(prompts, GREEDY, use_tqdm=False)
    _assert_same(after, before, "graphs after wake_up")


@pytest.mark.gpu
def test_cuda_update_weights_while_asleep_reaches_the_new_graphs(cuda_qwen3, rng):
    prompts = _prompts(rng, [5, 9, 14, 20])
    original, noisy = _perturbed(cuda_qwen3, rng)
    with LLM(cuda_qwen3, **GPU_ENGINE, capture_routing=True) as llm:
        before = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.update_weights(noisy.items())
        want_changed = llm.generate(prompts, GREEDY, use_tqdm=False)
        llm.update_weights(original.items())

        llm.sleep()
        llm.update_weights(noisy.items())
        llm.wake_up()
        _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), want_changed, "new weights")
        llm.sleep()
        llm.update_weights(original.items())
        llm.wake_up()
        _assert_same(llm.generate(prompts, GREEDY, use_tqdm=False), before, "restored")
    assert [o.token_ids for o in want_changed] != [o.token_ids for o in before]
