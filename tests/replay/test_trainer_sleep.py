"""``rollout.release_kv_while_training``: the GRPO loop puts the rollout workers to sleep for the
trainer's update and the weight sync, and wakes them afterwards: one step through Ray on CPU,
and one on a GPU shared by the trainer and the worker (CUDA graphs, weights pushed by CUDA IPC
into the sleeping engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import rollout
from replay.trainer import load_config
from replay.trainer.loop import GRPOTrainer
from replay.trainer.workers import RolloutWorkers

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class _TrainerSpy:
    """The loop's trainer handle, recording whether the rollout workers sleep when the loop's
    calls of the update (``step``) and of the weight sync (``push_weights``) start and end."""

    def __init__(self, trainer: Any, workers: RolloutWorkers) -> None:
        self.trainer = trainer
        self.workers = workers
        self.seen: list[tuple[str, list[bool]]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.trainer, name)
        if name not in ("step", "push_weights"):
            return attribute

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.seen.append((f"{name} start", self.workers.is_sleeping()))
            result = attribute(*args, **kwargs)
            self.seen.append((f"{name} end", self.workers.is_sleeping()))
            return result

        return recorded


# The trainer and the rollout worker share one GPU; the engine's KV stays small (the other GPU
# tests run beside this one), and its CUDA graphs are on.
ON_ONE_GPU = [
    "rollout.device=cuda",
    "rollout.num_gpus_per_worker=0.5",
    "rollout.dtype=bfloat16",
    "rollout.kv_cache_blocks=64",
    "rollout.enforce_eager=false",
    "trainer.device=cuda",
    "trainer.num_gpus=0.5",
    "trainer.compute_dtype=bfloat16",
    "trainer.weight_sync=cuda_ipc",
]


@pytest.mark.timeout(300)
def test_workers_sleep_through_the_update_and_wake_for_the_next_rollout(
    local_ray: None, tmp_path: Path
) -> None:
    check_one_step_sleeps_through_the_update(tmp_path, [])


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_cuda_workers_sleep_through_the_update_and_take_ipc_weights_asleep(
    local_ray: None, tmp_path: Path
) -> None:
    check_one_step_sleeps_through_the_update(tmp_path, ON_ONE_GPU)


def check_one_step_sleeps_through_the_update(tmp_path: Path, overrides: list[str]) -> None:
    config = load_config(
        TINY,
        [
            f"model={tmp_path / 'model'}",
            f"log.out_dir={tmp_path / 'run'}",
            "steps=1",
            "rollout.release_kv_while_training=true",
            "log.progress=false",
            "log.tensorboard=false",
            "log.checkpoint_every=0",
            *overrides,
        ],
    )
    assert config.rollout.release_kv_while_training
    trainer = GRPOTrainer(config)
    handle = trainer.trainer
    try:
        assert trainer.workers.is_sleeping() == [False]
        spy = _TrainerSpy(handle, trainer.workers)
        trainer.trainer = spy
        (record,) = trainer.run()
        # Asleep through the update and the weight sync (pushed into the sleeping engine),
        # awake again for the next rollout.
        assert spy.seen == [
            ("step start", [True]),
            ("step end", [True]),
            ("push_weights start", [True]),
            ("push_weights end", [True]),
        ]
        assert trainer.workers.is_sleeping() == [False]
        assert record["step"] == 1 and 0.0 <= record["reward_mean"] <= 1.0
        assert record["time_release_s"] > 0.0
        assert record["time_step_s"] >= (
            record["time_rollout_s"] + record["time_train_s"] + record["time_release_s"]
        )
        # The awake engine generates again.
        batch = trainer.workers.generate(["1+2="], rollout.SamplingParams(max_tokens=3))
        assert len(batch) == 1
    finally:
        trainer.trainer = handle
        trainer.shutdown()
