"""End to end on CPU through Ray: the tiny config for 2 steps, resume, and ``ray job submit``.

The job-submission test starts its own head node with ``ray start --head --block`` on free
ports in a short temporary folder, submits ``examples/train_grpo.py`` with the tiny config and
tears the cluster down by terminating that ``ray start`` process (which stops exactly the
processes of that cluster; ``ray stop`` would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from replay.trainer import load_config, read_metrics, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
TIMING = ("time_", "tokens_per_s", "trainer_compute_s")


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING)}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_config_two_steps_then_resume(local_ray: None, tmp_path: Path) -> None:
    model = tmp_path / "model"

    def config(out: str, steps: int, resume: bool = False):
        return load_config(
            TINY,
            [
                f"model={model}",
                f"log.out_dir={tmp_path / out}",
                f"steps={steps}",
                "log.checkpoint_every=2",
                f"log.resume={str(resume).lower()}",
                "log.progress=false",
            ],
        )

    straight = train(config("straight", 3))
    assert [r["step"] for r in straight] == [1, 2, 3]
    for record in straight:
        assert 0.0 <= record["reward_mean"] <= 1.0
        assert record["kl_k3"] >= 0.0 and record["rollout_tokens_per_s"] > 0
        assert record["time_step_s"] >= record["time_rollout_s"] + record["time_train_s"]
    assert read_metrics(tmp_path / "straight") == straight
    assert (tmp_path / "straight" / "tensorboard").is_dir()
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000003",
    ]

    first = train(config("resumed", 2))
    resumed = train(config("resumed", 3, resume=True))
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in resumed] == [3]
    # Same seeds, restored optimizer, RNG and weights: the resumed step is the straight one.
    assert comparable(resumed[0]) == comparable(straight[2])
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_routing_modes_report_router_agreement(local_ray: None, tmp_path: Path) -> None:
    model = tmp_path / "model"
    seen = {}
    for routing in ("r3", "none", "r2"):
        config = load_config(
            TINY,
            [
                f"model={model}",
                f"log.out_dir={tmp_path / routing}",
                f"routing={routing}",
                "steps=1",
                "log.progress=false",
                "log.tensorboard=false",
            ],
        )
        (record,) = train(config)
        seen[routing] = record
    # Replay hands the experts exactly the rollout's ids.
    assert seen["r3"]["router_agreement"] == 1.0
    for routing in ("r3", "none", "r2"):
        assert 0.0 < seen[routing]["router_agreement_native"] <= 1.0
        assert len(seen[routing]["router_agreement_per_layer"]) == 2
    # Step 1 of every mode samples from the same initial policy with the same seeds.
    assert seen["none"]["reward_mean"] == seen["r3"]["reward_mean"] == seen["r2"]["reward_mean"]
    assert seen["none"]["router_agreement_native"] == seen["r3"]["router_agreement_native"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_job_submit_runs_the_example(tmp_path: Path) -> None:
    if shutil.which("ray") is None:
        pytest.skip("the ray CLI is not on PATH")
    # Unix socket paths must stay under ~107 characters: a short folder, not tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--port={free_port()}",
            "--include-dashboard=true",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_jobs_api(address, env, head)
        out_dir = tmp_path / "job"
        result = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                f"--address={address}",
                "--working-dir",
                ".",
                "--",
                sys.executable,
                "examples/train_grpo.py",
                "--config",
                "examples/configs/tiny_cpu.yaml",
                "--set",
                f"model={tmp_path / 'model'}",
                "--set",
                f"log.out_dir={out_dir}",
                "--set",
                "log.progress=false",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summaries = [
            json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"out_dir"')
        ]
        assert summaries and summaries[-1]["steps_run"] == 2 and summaries[-1]["step"] == 2
        assert summaries[-1]["kl_k3_max"] >= summaries[-1]["kl_k3"] >= 0.0
        assert [r["step"] for r in read_metrics(out_dir)] == [1, 2]
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_jobs_api(address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}")
        probe = subprocess.run(
            ["ray", "job", "list", f"--address={address}"],
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"the Ray jobs API at {address} did not come up in 90 s")
