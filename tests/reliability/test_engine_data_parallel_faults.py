"""Faults in ``LLM(data_parallel_size=2)`` (issue 13, sections 1 and 7), both modes, CPU (gloo),
routing capture on.

A failed run leaves every rank ready: NaN written into ``lm_head`` raises
``NonFiniteLogitsError`` naming the prompt (also when the other rank has no request: with
dp_attention it runs idle steps and learns of the failure in the lockstep round), NaN in a
router raises the layer's error on every rank, and a Ctrl-C (SIGINT to the front end and to the
ranks, which ignore it) while the ranks step stops them between steps. Each time the exception
reaches the caller, no reply is left owed, every rank is alive, and once the good weights are
back the next ``generate`` returns exactly what the engine returned fresh: tokens, logprobs
and routed-expert rows. A rank killed with SIGKILL mid-``generate`` raises RuntimeError naming
the rank, its pid and the signal (not a bare EOFError); the other rank is stopped, both ranks'
segments are gone, and later calls say the ranks were shut down.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rollout import LLM, SamplingParams
from rollout.engine import data_parallel
from rollout.engine.llm_engine import NonFiniteLogitsError
from rollout.testing import make_tiny_moe

ENGINE = {
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 8,
    "capture_routing": True,
    "device": "cpu",
    "data_parallel_size": 2,
}
# Long enough that the ranks are still stepping when a fault is injected.
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


class _Ranks:
    """A data-parallel ``LLM`` of one mode, its checkpoint's weights, requests and the outputs
    it gave them fresh; rebuilt once a test has killed a rank."""

    def __init__(self, path, mode: str, seed: int) -> None:
        self.path, self.mode = path, mode
        self.weights = load_file(os.path.join(path, "model.safetensors"))
        rng = torch.Generator().manual_seed(seed)
        self.prompts = [torch.randint(0, 300, (n,), generator=rng).tolist() for n in (9, 21, 6)]
        self.params = [
            SamplingParams(
                max_tokens=8 + 2 * i,
                temperature=0.0 if i != 1 else 0.9,
                seed=None if i != 1 else 7,
                ignore_eos=True,
                return_routed_experts=True,
            )
            for i in range(len(self.prompts))
        ]
        self._llm: LLM | None = None
        self.want = self.generate()

    @property
    def llm(self) -> LLM:
        if self._llm is None or self._llm.engine._shut_down_because is not None:
            self._llm = LLM(self.path, data_parallel_mode=self.mode, **ENGINE)
        return self._llm

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    def generate(self, count: int | None = None):
        count = len(self.prompts) if count is None else count
        return self.llm.generate(self.prompts[:count], self.params[:count], use_tqdm=False)

    def assert_ready(self) -> None:
        """Every rank alive, no reply owed, and fresh outputs again."""
        front = self.llm.engine
        assert all(p.is_alive() for p in front._processes)
        assert front._owed == [0, 0]
        for i, (out, ref) in enumerate(zip(self.generate(), self.want, strict=True)):
            assert out.token_ids == ref.token_ids, f"request {i}"
            np.testing.assert_array_equal(out.logprobs, ref.logprobs, err_msg=f"request {i}")
            np.testing.assert_array_equal(out.routed_experts, ref.routed_experts)

    def write(self, name: str | None = None, index=None) -> None:
        """The checkpoint's weights, with NaN at ``name[index]`` if given."""
        weights = dict(self.weights)
        if name is not None:
            weights[name] = weights[name].clone()
            weights[name][index] = float("nan")
        self.llm.update_weights(weights.items())


@pytest.fixture(scope="module", params=["replicas", "dp_attention"])
def ranks(request, qwen3, seed_for):
    ranks = _Ranks(qwen3, request.param, seed_for(f"{request.node.nodeid}[{request.param}]"))
    yield ranks
    ranks.shutdown()


@pytest.mark.parametrize("count", [1, 3])
def test_nan_logits_name_the_prompt_and_leave_the_ranks_ready(ranks, count):
    ranks.write("lm_head.weight", 5)
    try:
        with pytest.raises(NonFiniteLogitsError, match=r"^prompts\[0\]: .* data parallel rank 0"):
            ranks.generate(count)
    finally:
        ranks.write()
    ranks.assert_ready()


def test_a_layer_error_on_every_rank_leaves_the_ranks_ready(ranks):
    # The CPU router checks its logits: a NaN router weight raises inside the MoE layer.
    router = f"model.layers.{ranks.llm.routing_spec.moe_layers[0]}.mlp.gate.weight"
    ranks.write(router, (0, 0))
    try:
        with pytest.raises(ValueError, match="logits: expected finite values"):
            ranks.generate()
    finally:
        ranks.write()
    ranks.assert_ready()


def _when_the_ranks_step(monkeypatch, action) -> None:
    """Run ``action`` once the ranks have been told to run and had a moment to step: the
    progress bar opens right after "run" is sent."""

    class Bar(data_parallel.tqdm):
        def __enter__(self):
            time.sleep(0.5)
            action()
            return super().__enter__()

    monkeypatch.setattr(data_parallel, "tqdm", Bar)


def test_ctrl_c_stops_the_ranks_between_steps(ranks, monkeypatch):
    pids = [p.pid for p in ranks.llm.engine._processes]

    def ctrl_c():  # a terminal's Ctrl-C signals the whole process group
        for pid in [os.getpid(), *pids]:
            os.kill(pid, signal.SIGINT)
        time.sleep(1.0)  # the interrupt is raised here, the ranks stepping on

    _when_the_ranks_step(monkeypatch, ctrl_c)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ranks.llm.generate([ranks.prompts[0]] * 4, LONG, use_tqdm=False)
    monkeypatch.undo()
    assert time.monotonic() - start < 30
    ranks.assert_ready()


def test_a_killed_rank_is_named_and_everything_is_cleaned_up(ranks, monkeypatch):
    llm = ranks.llm
    front = llm.engine
    segments = [f"/dev/shm/{name}" for name in front.segment_names]
    assert all(os.path.exists(s) for s in segments)
    victim = front._processes[1]
    _when_the_ranks_step(monkeypatch, lambda: os.kill(victim.pid, signal.SIGKILL))
    with pytest.raises(RuntimeError) as raised:
        llm.generate([ranks.prompts[0]] * 4, LONG, use_tqdm=False)
    monkeypatch.undo()
    message = str(raised.value)
    assert f"data parallel rank 1 (pid {victim.pid}) died: killed by signal 9 (SIGKILL)" in message
    assert not any(p.is_alive() for p in front._processes), "the other rank is stopped"
    assert not any(os.path.exists(s) for s in segments), "segments left behind"
    with pytest.raises(RuntimeError, match="ranks shut down .*rank 1 .* died"):
        llm.generate(ranks.prompts[:1], ranks.params[:1], use_tqdm=False)
