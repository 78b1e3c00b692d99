"""End to end on CPU through Ray: the tiny config for 2 steps, resume, and the routing modes.

``ray job submit`` of the same example is tests/test_readme_ray_job.py, which runs README.md's
own block.
"""

from __future__ import annotations

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
