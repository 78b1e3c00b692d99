"""replay.trainer run outputs: the metrics log (JSONL, TensorBoard) and checkpoint folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from replay.trainer.checkpoint import (
    checkpoint_dir,
    commit_checkpoint,
    latest_checkpoint,
    load_driver_state,
    prune_checkpoints,
    save_driver_state,
    staging_dir,
)
from replay.trainer.metrics_log import MetricsLog, read_metrics


def test_jsonl_and_tensorboard(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=True)
    assert log.tensorboard
    log.write({"step": 1, "reward_mean": 0.5, "router_agreement_per_layer": [1.0, 0.5]})
    log.write({"step": 2, "reward_mean": 0.75, "finished": True})
    log.close()
    assert [r["reward_mean"] for r in read_metrics(tmp_path)] == [0.5, 0.75]
    assert read_metrics(tmp_path)[0]["router_agreement_per_layer"] == [1.0, 0.5]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_asked_for_without_the_package_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"log\.tensorboard: expected the tensorboard package"):
        MetricsLog(tmp_path, tensorboard=True)
    assert not (tmp_path / "tensorboard").exists()
    log = MetricsLog(tmp_path, tensorboard=False)  # JSONL only, as asked
    log.write({"step": 1, "reward_mean": 0.25})
    assert read_metrics(tmp_path) == [{"step": 1, "reward_mean": 0.25}]


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"step": step})
    MetricsLog(tmp_path, tensorboard=False, resume_step=2).write({"step": 3, "again": True})
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}, {"step": 3, "again": True}]
    MetricsLog(tmp_path, tensorboard=False)  # a fresh run starts a new file
    assert read_metrics(tmp_path) == []


def test_checkpoint_folders(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 4, 10):
        folder = staging_dir(tmp_path, step)
        save_driver_state(folder, {"step": step})
        commit_checkpoint(tmp_path, step)
    # A checkpoint cut off mid-write is never picked.
    (staging_dir(tmp_path, 12) / "partial").write_text("x")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert load_driver_state(latest_checkpoint(tmp_path)) == {"step": 10}
    prune_checkpoints(tmp_path, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000010", "step_000012.tmp"]
    # Saving the same step again replaces it whole.
    folder = staging_dir(tmp_path, 10)
    save_driver_state(folder, {"step": 10, "second": True})
    commit_checkpoint(tmp_path, 10)
    assert json.loads((checkpoint_dir(tmp_path, 10) / "driver_state.json").read_text())["second"]
    with pytest.raises(ValueError, match="expected driver_state.json in it"):
        load_driver_state(tmp_path)
