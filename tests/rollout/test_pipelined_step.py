"""The pipelined engine step (batch N+1 launched before batch N's tokens are waited for) against
the synchronous step (``LLMEngine(pipelined=False)``), end to end on a tiny checkpoint, CPU
float32, routing capture on.

Without stop tokens or a full KV cache the two build the very same batches, so every output is
bit for bit the same: tokens, logprobs, routed-expert rows, prefix-cache and preemption
counters (chunked prefill, prefix hits, greedy and seeded sampling, different ``max_tokens``,
an abort of a request in flight). With stop tokens hit mid-run and a cache small enough to
preempt, a pipelined batch also holds the entries of sequences that stopped (their results are
dropped) and may preempt differently: tokens, finish reasons and rows stay identical, logprobs
equal up to the float rounding of a different batch. The step's order: it launches batch N+1
before it waits for batch N (recorded calls); a batch still in flight after ``generate`` is
drained by ``update_weights`` and ``sleep``. gpu: the launch does not wait for the batch in
flight (a long kernel in it is still running when the next batch is launched), no synchronising
CUDA call in a step, and pipelined outputs equal synchronous ones with CUDA graphs and capture.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.llm_engine import LLMEngine
from rollout.sampler import SampledTokens
from rollout.testing import flashinfer_overrides, make_tiny_moe

# Small blocks and token budget: chunked prefill, many blocks per prompt, mixed steps.
ENGINE = dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
LOGPROB_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """Dense first layer and grouped routing: rows of every kind."""
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4"))


def _engine(path, *, pipelined: bool, **overrides) -> LLMEngine:
    config = EngineConfig(
        model=str(path), device="cpu", capture_routing=True, **{**ENGINE, **overrides}
    )
    return LLMEngine(config, pipelined=pipelined)


def _generate(engine: LLMEngine, prompts, params, abort_at: dict[int, int] | None = None):
    """Step until done; ``abort_at``: step index -> request to abort before that step. Returns
    the outputs in request order (None for an aborted request) and the scheduled batches."""
    abort_at = abort_at or {}
    batches = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch is not None:
            batches.append([(e.seq.seq_id, e.start, e.num_new_tokens) for e in batch.entries])
        return batch

    engine.scheduler.schedule = recording_schedule
    ids = [engine.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
    outputs, steps = {}, 0
    while engine.has_unfinished():
        if steps in abort_at:
            engine.abort_request(ids[abort_at[steps]])
        for out in engine.step():
            outputs[out.request_id] = out
        steps += 1
    return [outputs.get(request_id) for request_id in ids], batches


def _workload(rng):
    """Prompts sharing a prefix (one repeated, for same-step and later prefix hits), greedy
    requests of different lengths, one seeded sampled request; no request stops early."""

    def rand(n):
        return torch.randint(0, 300, (n,), generator=rng).tolist()

    shared = rand(10)
    prompts = [rand(5), shared + rand(7), shared + rand(3), rand(23), rand(9)]
    prompts.append(list(prompts[2]))
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, return_routed_experts=True)
        for m in (20, 14, 18, 9, 24, 11)
    ]
    params[3] = SamplingParams(
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        ignore_eos=True,
        return_routed_experts=True,
    )
    return prompts, params


def _mid_run_stop(tokens: list[int]) -> int | None:
    """A token whose first occurrence in ``tokens`` is neither the first nor the last (the
    latest such), or None: as a stop token it ends the request mid-run."""
    firsts = [k for k in range(1, len(tokens) - 1) if tokens[k] not in tokens[:k]]
    return tokens[firsts[-1]] if firsts else None


def _compare(pipelined_outs, synchronous_outs, *, logprob_atol: float) -> float:
    """Same tokens, finish reasons and rows; logprobs within ``logprob_atol``; returns the
    largest logprob difference."""
    largest = 0.0
    for i, (a, b) in enumerate(zip(pipelined_outs, synchronous_outs, strict=True)):
        assert (a is None) == (b is None), f"request {i}: output in one mode only"
        if a is None:
            continue
        assert a.token_ids == b.token_ids, f"request {i}: tokens differ"
        assert a.finish_reason == b.finish_reason
        np.testing.assert_array_equal(a.routed_experts, b.routed_experts, err_msg=f"request {i}")
        assert not np.isnan(a.logprobs).any(), f"request {i}: a placeholder's logprob is left"
        if len(a.logprobs):
            largest = max(largest, float(np.abs(a.logprobs - b.logprobs).max()))
    assert largest <= logprob_atol, f"max |logprob diff| {largest:.3g}"
    return largest


def test_pipelined_steps_equal_synchronous_steps_bit_for_bit(glm4, rng):
    """Without stops and preemption the schedules are the same, so is every output bit for
    bit (request 1 is aborted while a batch holding it is in flight)."""
    prompts, params = _workload(rng)
    results = []
    for pipelined in (True, False):
        engine = _engine(glm4, pipelined=pipelined)
        outs, batches = _generate(engine, prompts, params, abort_at={3: 1})
        results.append((outs, batches, engine.stats))
        engine.shutdown()
    (outs, batches, stats), (want, want_batches, want_stats) = results
    assert batches == want_batches
    assert stats == want_stats and stats.prefix_cache_hits > 0 and stats.num_preemptions == 0
    assert any(b[0][2] > 1 and len(b) > 1 for b in batches), "expected mixed prefill steps"
    assert outs[1] is None and all(out is not None for i, out in enumerate(outs) if i != 1)
    _compare(outs, want, logprob_atol=0.0)
    assert [o and o.num_cached_tokens for o in outs] == [o and o.num_cached_tokens for o in want]


@pytest.mark.parametrize("kv_cache_blocks", [None, 12])
def test_pipelined_steps_match_synchronous_steps_with_stops_and_preemption(
    glm4, rng, kv_cache_blocks
):
    """Stop tokens taken from what greedy generates stop the greedy requests mid-run (a
    pipelined batch has fed their stop token already); a small cache forces preemption;
    request 0 is aborted. Tokens, finish reasons and rows are identical, logprobs equal up to
    the rounding of differently composed batches."""
    prompts, params = _workload(rng)
    engine = _engine(glm4, pipelined=False)
    free, _ = _generate(engine, prompts, params)
    engine.shutdown()
    stopping = []
    for i, out in enumerate(free):
        stop = _mid_run_stop(out.token_ids)
        # Request 0 is aborted at step 4: it must not be able to finish before (a pipelined
        # engine learns of a stop one step later, so the abort would race the stop).
        if i != 0 and params[i].temperature == 0.0 and stop is not None:
            params[i] = dataclasses.replace(params[i], stop_token_ids=(stop,))
            stopping.append(i)
    assert len(stopping) >= 2, "expected greedy outputs with new tokens mid-run"
    results = []
    for pipelined in (True, False):
        engine = _engine(glm4, pipelined=pipelined, kv_cache_blocks=kv_cache_blocks)
        outs, _ = _generate(engine, prompts, params, abort_at={4: 0})
        results.append((outs, engine.stats))
        engine.shutdown()
    (outs, stats), (want, want_stats) = results
    for i in stopping:
        if outs[i] is not None:
            assert outs[i].finish_reason == "stop"
            assert len(outs[i].token_ids) < params[i].max_tokens
    if kv_cache_blocks is not None:
        assert stats.num_preemptions > 0 and want_stats.num_preemptions > 0
    diff = _compare(outs, want, logprob_atol=LOGPROB_ATOL)
    print(
        f"kv_cache_blocks={kv_cache_blocks}: max |logprob diff| {diff:.3g}, preemptions "
        f"{stats.num_preemptions} pipelined / {want_stats.num_preemptions} synchronous"
    )


@pytest.mark.parametrize("pipelined", [True, False])
def test_step_launches_the_next_batch_before_waiting(glm4, rng, monkeypatch, pipelined):
    """The call order of the runner's launch and of the wait for sampled tokens: a pipelined
    step launches batch N+1 before it waits for batch N (and waits for nothing else); a
    synchronous step waits for the batch it launched."""
    engine = _engine(glm4, pipelined=pipelined)
    events: list[tuple[str, int]] = []
    launched: list[SampledTokens] = []  # batch n's sampled tokens at index n
    sample_async = engine.runner.sample_async

    def recording_sample_async(logits, inputs):
        launched.append(sample_async(logits, inputs))
        events.append(("launch", len(launched) - 1))
        return launched[-1]

    tolist = SampledTokens.tolist

    def recording_tolist(sampled):
        events.append(("wait", next(n for n, s in enumerate(launched) if s is sampled)))
        return tolist(sampled)

    engine.runner.sample_async = recording_sample_async
    monkeypatch.setattr(SampledTokens, "tolist", recording_tolist)
    prompts, params = _workload(rng)
    for p, s in zip(prompts, params):
        engine.add_request(p, s)
    per_step = []
    while engine.has_unfinished():
        start = len(events)
        engine.step()
        per_step.append(events[start:])
    engine.shutdown()
    assert len(launched) > 10
    assert sorted(n for kind, n in events if kind == "wait") == list(range(len(launched)))
    for step_events in per_step:
        launched = [n for kind, n in step_events if kind == "launch"]
        waited = [n for kind, n in step_events if kind == "wait"]
        assert len(launched) <= 1 and len(waited) <= 1, step_events
        if pipelined:
            # Launch N+1, then wait for N: the device works on N+1 while the host waits.
            assert all(n + 1 == launched[0] for n in waited if launched), step_events
            assert step_events == sorted(step_events, key=lambda e: e[0] == "wait")
        else:
            assert step_events == [("launch", launched[0]), ("wait", launched[0])]


def test_a_batch_in_flight_after_generate_is_drained(glm4, rng):
    """A request that stops leaves the batch after its stop in flight when ``generate``
    returns: ``has_unfinished`` says so, and ``update_weights`` and ``sleep`` wait for it;
    the next outputs are unchanged."""
    prompt = torch.randint(0, 300, (9,), generator=rng).tolist()
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # No prefix cache: every call computes the prompt alike (sleep forgets the cache).
    with LLM(glm4, **ENGINE, capture_routing=True, enable_prefix_caching=False) as llm:
        free = llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids
        stop = _mid_run_stop(free)
        assert stop is not None, f"expected a new token mid-run in {free}"
        stopping = dataclasses.replace(greedy, stop_token_ids=(stop,))
        first = llm.generate([prompt], stopping, use_tqdm=False)[0]
        assert first.finish_reason == "stop" and first.token_ids == free[: free.index(stop) + 1]
        engine = llm.engine
        assert engine.has_unfinished() and not engine.scheduler.has_unfinished()
        llm.update_weights(load_file(str(glm4 / "model.safetensors")).items())
        assert not engine.has_unfinished()
        llm.generate([prompt], stopping, use_tqdm=False)
        assert engine.has_unfinished()
        llm.sleep()
        assert not engine.has_unfinished()
        llm.wake_up()
        again = llm.generate([prompt], stopping, use_tqdm=False)[0]
    assert again.token_ids == first.token_ids
    np.testing.assert_array_equal(again.logprobs, first.logprobs)


def test_pipelined_is_checked(glm4):
    config = EngineConfig(model=str(glm4), data_parallel_size=2, data_parallel_mode="dp_attention")
    with pytest.raises(ValueError, match=r"pipelined: expected None or False .*dp_attention"):
        LLMEngine(config, pipelined=True)
    with pytest.raises(TypeError, match="pipelined: expected None or a bool, got int"):
        LLMEngine(EngineConfig(model=str(glm4)), pipelined=1)


# ---- CUDA ----------------------------------------------------------------------------------------

GPU_ENGINE = dict(dtype="bfloat16", device="cuda", max_num_seqs=8, kv_cache_blocks=256)


@pytest.fixture(scope="module")
def cuda_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_cuda")
    return make_tiny_moe("qwen3_moe", path, **flashinfer_overrides("qwen3_moe"))


def _cuda_engine(path, *, pipelined: bool, **overrides) -> LLMEngine:
    config = EngineConfig(model=str(path), **{**GPU_ENGINE, **overrides})
    return LLMEngine(config, pipelined=pipelined)


@pytest.mark.gpu
@pytest.mark.parametrize("capture", [False, True])
def test_cuda_launch_does_not_wait_for_the_batch_in_flight(cuda_qwen3, rng, capture):
    """Decode steps (CUDA graphs; greedy, seeded and unseeded sampling) under
    ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call raises (waiting
    on an event is allowed). With a ~0.1 s kernel queued ahead of one batch's forward, that
    batch's tokens are not ready when the next step launches its batch (the launch did not
    wait for it), nor when the step that launched it returns."""
    engine = _cuda_engine(cuda_qwen3, pipelined=True, capture_routing=capture)
    greedy = SamplingParams(
        max_tokens=40, temperature=0.0, ignore_eos=True, return_routed_experts=capture
    )
    params = [
        greedy,
        dataclasses.replace(greedy, temperature=1.0, top_p=0.9),
        dataclasses.replace(greedy, temperature=1.0, seed=5),
    ]
    for n, sampling in zip((5, 9, 14), params):
        engine.add_request(torch.randint(0, 300, (n,), generator=rng).tolist(), sampling)
    for _ in range(8):  # prefill and warm-up (lazy initialisations may synchronise)
        engine.step()
    torch.cuda.synchronize()
    run, sample_async = engine.runner.run, engine.runner.sample_async
    launched: list[SampledTokens] = []
    ready_at_launch: list[bool] = []

    def slow_run(inputs):
        if len(launched) == 2:
            torch.cuda._sleep(1 << 28)  # ~0.1-0.3 s of device time ahead of this forward
        if launched:
            ready_at_launch.append(launched[-1].is_ready())
        return run(inputs)

    def recording_sample_async(logits, inputs):
        launched.append(sample_async(logits, inputs))
        return launched[-1]

    engine.runner.run, engine.runner.sample_async = slow_run, recording_sample_async
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            engine.step()
        slow_ready_after_its_step = launched[2].is_ready()
        for _ in range(3):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while engine.has_unfinished():
        engine.step()
    engine.shutdown()
    assert not slow_ready_after_its_step, "the step that launched the slow batch waited for it"
    assert not ready_at_launch[2], "the launch of the next batch waited for the slow one"


@pytest.mark.gpu
def test_cuda_pipelined_outputs_equal_synchronous_ones(cuda_qwen3, rng):
    """bf16, CUDA graphs, routing capture, no stops or preemption: the same batches, so the
    same tokens, logprobs and rows."""
    prompts = [torch.randint(0, 300, (n,), generator=rng).tolist() for n in (5, 9, 14, 20, 31)]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, return_routed_experts=True)
        for m in (12, 30, 7, 24, 16)
    ]
    params[2] = SamplingParams(max_tokens=20, temperature=1.0, seed=3, return_routed_experts=True)
    results = []
    for pipelined in (True, False):
        engine = _cuda_engine(cuda_qwen3, pipelined=pipelined, capture_routing=True)
        assert engine.runner.graph_sizes
        results.append(_generate(engine, prompts, params))
        engine.shutdown()
    (outs, batches), (want, want_batches) = results
    assert batches == want_batches
    _compare(outs, want, logprob_atol=0.0)
