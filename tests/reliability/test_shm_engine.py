"""Engines and their segments (issue 13 sections 4 and 8), on the tiny Qwen3-MoE checkpoint:

- an engine process killed mid-generation by SIGTERM (its segment is unlinked on the way out)
  or SIGKILL (its segment is left, then reclaimed when the next engine starts); the next engine
  gives rows and tokens identical to those the killed one completed before the fault;
- a second live engine given the first one's instance id is refused, and the first goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rollout import LLM, SamplingParams
from rollout.engine.llm_engine import LLMEngine
from rollout.testing import make_tiny_moe

REPO = Path(__file__).resolve().parents[2]
ENGINE = {
    "block_size": 4,
    "max_num_batched_tokens": 32,
    "max_num_seqs": 8,
    "kv_cache_blocks": 256,
    "device": "cpu",
}
pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = {"temperature": 0.0, "ignore_eos": True, "return_routed_experts": True}
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 64], [200, 3, 15, 88, 9, 31, 44, 12, 6]]

# The victim: a clean run of PROMPTS saved to argv[2], its segment's name printed, then
# generation without end until the signal arrives.
VICTIM = f"""
import sys
import numpy as np, torch
from rollout import LLM, SamplingParams
torch.set_num_threads(1)
llm = LLM(sys.argv[1], capture_routing=True, **{ENGINE!r})
outs = llm.generate({PROMPTS!r}, SamplingParams(max_tokens=8, **{GREEDY!r}), use_tqdm=False)
np.savez(sys.argv[2], *[o.routed_experts for o in outs], tokens=[o.token_ids for o in outs])
print(llm.routing_reader_spec.name, flush=True)
endless = SamplingParams(max_tokens=400, **{GREEDY!r})
while True:
    llm.generate({PROMPTS!r} * 2, endless, use_tqdm=False)
"""


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


@pytest.mark.slow
def test_engine_killed_mid_generation_then_restarted(qwen3, tmp_path):
    victims = {}
    for signum in (signal.SIGTERM, signal.SIGKILL):
        victims[signum] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(VICTIM), str(qwen3), tmp_path / f"{signum}.npz"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        names = {signum: proc.stdout.readline().strip() for signum, proc in victims.items()}
        assert all(names.values()), "a victim failed before its first generate"
        time.sleep(0.5)  # well inside the endless generate
        for signum, proc in victims.items():
            assert proc.poll() is None and os.path.exists(f"/dev/shm/{names[signum]}")
            proc.send_signal(signum)
        codes = {signum: proc.wait(60) for signum, proc in victims.items()}
    finally:
        for proc in victims.values():
            proc.kill()
            proc.wait()
    assert codes == {signal.SIGTERM: -signal.SIGTERM, signal.SIGKILL: -signal.SIGKILL}
    assert not os.path.exists(f"/dev/shm/{names[signal.SIGTERM]}")  # unlinked on the way out
    assert os.path.exists(f"/dev/shm/{names[signal.SIGKILL]}")  # left behind ...

    with LLM(qwen3, capture_routing=True, **ENGINE) as llm:
        assert not os.path.exists(f"/dev/shm/{names[signal.SIGKILL]}")  # ... until now
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    for signum in victims:
        clean = np.load(tmp_path / f"{signum}.npz")
        assert [o.token_ids for o in outs] == clean["tokens"].tolist()
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out.routed_experts, clean[f"arr_{i}"])


def test_second_engine_with_the_same_instance_id_is_refused(qwen3):
    params = SamplingParams(max_tokens=6, **GREEDY)
    with LLM(qwen3, capture_routing=True, **ENGINE) as llm:
        before = llm.generate(PROMPTS, params, use_tqdm=False)
        name = llm.routing_reader_spec.name
        with pytest.raises(FileExistsError, match=f"shared memory {name}: in use by a live owner"):
            LLMEngine(llm.config, instance_id=llm.engine.instance_id)
        assert os.path.exists(f"/dev/shm/{name}")
        after = llm.generate(PROMPTS, params, use_tqdm=False)
        for a, b in zip(before, after, strict=True):
            assert a.token_ids == b.token_ids
            np.testing.assert_array_equal(a.routed_experts, b.routed_experts)
    assert not os.path.exists(f"/dev/shm/{name}")
