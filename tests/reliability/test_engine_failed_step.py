"""An engine survives a step that raises (issue 13, section 1), CPU float32, routing capture on.

Faults injected into a real engine mid-``generate``, with a batch in flight (the pipelined step
launches batch N+1 before it waits for batch N): an error raised by a forward hook of the first
decoder layer, of the last one, or of ``lm_head`` (after the capture hook has queued the step's
rows), on the hook's first or fourth call; a ``KeyboardInterrupt`` raised there (a simulated
Ctrl-C); a real SIGINT to the process, which lands wherever the interpreter is next; a checkpoint
whose ``lm_head`` holds a NaN. Each time the exception reaches the caller, every request of the
call is dropped (no sequence left, every KV block free with reference count 0, no batch in
flight, the routing store with nothing pending), and the next ``generate`` returns exactly what
a fresh engine returns: tokens, logprobs and routed-expert rows of greedy and seeded requests,
also after a fault under preemption with the prefix cache warm. gpu: the same for a fault in a
decode step replayed from a CUDA graph.
"""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout import LLM, SamplingParams
from rollout.engine.llm_engine import NonFiniteLogitsError
from rollout.testing import flashinfer_overrides, make_tiny_moe

ENGINE = {
    "block_size": 4,
    "max_num_batched_tokens": 24,
    "max_num_seqs": 4,
    "capture_routing": True,
    "device": "cpu",
}
# Few blocks: the five requests below preempt each other.
PREEMPT_KV_BLOCKS = 14


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def requests(qwen3, request, seed_for):
    """Five requests (``_requests``, fresh random prompts) and a fresh engine's outputs."""
    prompts, params = _requests(torch.Generator().manual_seed(seed_for(request.node.nodeid)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (one_thread): the same float rounding
    try:
        return prompts, params, LLM(qwen3, **ENGINE).generate(prompts, params, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)


def _requests(rng: torch.Generator, vocab: int = 300):
    """Five prompts (two sharing a prefix, chunked prefill) and greedy and seeded sampling."""
    lengths = (5, 30, 11, 17, 9)
    prompts = [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]
    prompts[3][:8] = prompts[1][:8]
    params = [
        SamplingParams(
            max_tokens=6 + 3 * i,
            temperature=0.0 if i % 2 else 0.8,
            seed=None if i % 2 else 100 + i,
            ignore_eos=True,
            return_routed_experts=True,
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def assert_same_outputs(outs, want):
    """Tokens, logprobs and routed-expert rows identical, bit for bit."""
    assert len(outs) == len(want)
    for i, (out, ref) in enumerate(zip(outs, want)):
        assert out.token_ids == ref.token_ids, f"request {i}: tokens"
        np.testing.assert_array_equal(out.logprobs, ref.logprobs, err_msg=f"request {i}")
        np.testing.assert_array_equal(out.routed_experts, ref.routed_experts, err_msg=f"{i}")
        assert out.finish_reason == ref.finish_reason


def assert_nothing_left(llm: LLM, *, after_failure: bool = True) -> None:
    """No request, no batch in flight, every KV block free, nothing pending in the store; after
    a failure also no block in the prefix cache."""
    engine = llm.engine
    scheduler, bm = engine.scheduler, engine.scheduler.block_manager
    assert not engine.has_unfinished()
    assert not scheduler.waiting and not scheduler.running
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    if after_failure:
        assert not any(bm.is_cached(b) for b in range(bm.num_blocks)), "half-written KV cached"
    assert not engine.capture.store.has_pending
    # A fresh schedule finds nothing to do, and no batch of the failed call.
    assert scheduler.schedule() is None


class _Fault:
    """A forward hook that raises ``error`` (or sends SIGINT to this process) on call ``at``."""

    def __init__(self, module: torch.nn.Module, at: int, error: BaseException | None) -> None:
        self.calls, self.at, self.error = 0, at, error
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.at:
            if self.error is None:
                os.kill(os.getpid(), signal.SIGINT)  # raised wherever Python is next
            else:
                raise self.error


def _module(llm: LLM, where: str) -> torch.nn.Module:
    model = llm.engine.runner.model
    return {
        "first_layer": model.model.layers[0],
        "last_layer": model.model.layers[-1],
        "lm_head": model.lm_head,
    }[where]


@pytest.mark.parametrize("at", [1, 4])
@pytest.mark.parametrize("where", ["first_layer", "last_layer", "lm_head"])
@pytest.mark.parametrize("error", ["RuntimeError", "KeyboardInterrupt", "SIGINT"])
def test_a_failed_step_leaves_an_engine_like_a_fresh_one(qwen3, requests, where, at, error):
    prompts, params, want = requests
    llm = LLM(qwen3, **ENGINE)
    raised = {"RuntimeError": RuntimeError("injected"), "KeyboardInterrupt": KeyboardInterrupt()}
    fault = _Fault(_module(llm, where), at, raised.get(error))
    with pytest.raises(RuntimeError if error == "RuntimeError" else KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    fault.handle.remove()
    assert fault.calls == at, "the fault ended the call"
    assert_nothing_left(llm)
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)
    assert_nothing_left(llm, after_failure=False)


def test_a_fault_under_preemption_with_a_warm_prefix_cache(qwen3, rng):
    """The failed call preempted and hit the prefix cache; blocks it registered are forgotten,
    so the next call cannot reuse KV that the failed step left half-written."""
    prompts, params = _requests(rng)
    engine = dict(ENGINE, kv_cache_blocks=PREEMPT_KV_BLOCKS)
    fresh = LLM(qwen3, **engine)
    want = fresh.generate(prompts, params, use_tqdm=False)
    assert fresh.stats.num_preemptions > 0
    llm = LLM(qwen3, **engine)
    llm.generate(prompts, params, use_tqdm=False)  # warms the prefix cache
    before = llm.stats.num_preemptions
    fault = _Fault(_module(llm, "last_layer"), 12, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompts, params, use_tqdm=False)
    fault.handle.remove()
    assert llm.stats.num_preemptions > before, "the failed call preempted"
    assert_nothing_left(llm)
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)


def nan_checkpoint(src, dst, name: str, index) -> str:
    """A copy of checkpoint ``src`` in ``dst`` whose tensor ``name`` is NaN at ``index``."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    tensors[name][index] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def test_a_nan_checkpoint_raises_and_good_weights_then_serve(qwen3, requests, tmp_path):
    prompts, params, want = requests
    llm = LLM(nan_checkpoint(qwen3, tmp_path / "nan", "lm_head.weight", 7), **ENGINE)
    with pytest.raises(NonFiniteLogitsError, match=r"prompts\[\d\]: logits: expected finite"):
        llm.generate(prompts, params, use_tqdm=False)
    assert_nothing_left(llm)
    llm.update_weights(load_file(os.path.join(qwen3, "model.safetensors")).items())
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)


@pytest.fixture(scope="module")
def cuda_qwen3(tmp_path_factory):
    """Heads FlashInfer supports: CUDA graphs for decode steps."""
    path = tmp_path_factory.mktemp("cuda_qwen3")
    return make_tiny_moe("qwen3_moe", path, **flashinfer_overrides("qwen3_moe"))


@pytest.mark.gpu
@pytest.mark.parametrize("error", [RuntimeError("injected"), KeyboardInterrupt()])
def test_cuda_a_failed_decode_step_under_cuda_graphs(cuda_qwen3, rng, error):
    """bf16, CUDA graphs: the third step that replays a graph raises where it would replay,
    with the previous batch still in flight on the device."""
    prompts, params = _requests(rng)
    cuda = dict(ENGINE, device="cuda", dtype="bfloat16", kv_cache_blocks=256)
    want = LLM(cuda_qwen3, **cuda).generate(prompts, params, use_tqdm=False)
    llm = LLM(cuda_qwen3, **cuda)
    runner = llm.engine.runner
    assert runner.graph_sizes
    replays = []
    forward = runner._forward

    def failing_forward(inputs):
        replays.append(inputs.graph_size is not None and llm.engine._in_flight is not None)
        if sum(replays) == 3:
            raise error
        return forward(inputs)

    runner._forward = failing_forward
    with pytest.raises(type(error)):
        llm.generate(prompts, params, use_tqdm=False)
    del runner._forward
    assert sum(replays) == 3
    assert_nothing_left(llm)
    assert_same_outputs(llm.generate(prompts, params, use_tqdm=False), want)
