"""replay.trainer run outputs: the metrics log (JSONL, TensorBoard, Weights & Biases offline),
the run folder's absolute path, and checkpoint folders."""

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
from replay.trainer.config import LogConfig, WandbConfig, load_config
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


def test_wandb_offline_run_gets_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    # Offline twice over (the config's mode and W&B's own switch), every W&B folder in tmp_path.
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out_dir = tmp_path / "run"
    config = WandbConfig(project="routing-replay-test", name="tiny-r3", mode="offline")
    log = MetricsLog(out_dir, tensorboard=False, wandb=config, run_config={"routing": "r3"})
    run = log._wandb_run
    assert (run.project, run.name, run.offline) == ("routing-replay-test", "tiny-r3", True)
    assert run.config["routing"] == "r3"
    log.write({"step": 1, "reward_mean": 0.5, "kl_k3": 1.25e-3, "per_layer": [1.0, 0.5]})
    log.write({"step": 2, "reward_mean": 0.75, "kl_k3": float("nan"), "finished": True})
    assert (run.summary["reward_mean"], run.summary["_step"]) == (0.75, 2)
    assert run.summary["kl_k3"] == 1.25e-3  # the NaN of step 2 was not logged
    log.close()
    log.close()  # idempotent
    wandb.teardown()  # the W&B service writes the run file in the background: wait for it
    assert [r["step"] for r in read_metrics(out_dir)] == [1, 2]
    (run_file,) = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")  # `wandb sync` uploads it
    data = run_file.read_bytes()
    assert b"reward_mean" in data and b"0.75" in data and b"tiny-r3" in data
    assert b"per_layer" not in data and b"finished" not in data  # scalars only


def test_wandb_asked_for_without_the_package_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    config = WandbConfig(project="p", mode="offline")
    with pytest.raises(ImportError, match=r"log\.wandb: expected the wandb package .*\[wandb\]"):
        MetricsLog(tmp_path, tensorboard=False, wandb=config)


def test_wandb_section_from_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlog:\n  wandb: {project: rr, mode: offline}\n")
    config = load_config(path, check_model=False)  # the values alone: there is no model "m"
    assert config.log.wandb == WandbConfig(project="rr", mode="offline")
    config = load_config(
        path, ["log.wandb.name=tiny", "log.wandb.mode=disabled"], check_model=False
    )
    assert config.log.wandb == WandbConfig(project="rr", name="tiny", mode="disabled")
    assert load_config(path, ["log.wandb=null"], check_model=False).log.wandb is None
    assert load_config(None, ["model=m"], check_model=False).log.wandb is None  # off by default
    for override, message in [
        ("log.wandb.mode=cloud", r"log\.wandb\.mode: expected one of \['online', 'offline', "),
        ("log.wandb.project=''", r"log\.wandb\.project: expected a non-empty str, got ''"),
        ("log.wandb.entity=me", r"log\.wandb\.entity: unknown field"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(path, [override], check_model=False)
    with pytest.raises(TypeError, match=r"log\.wandb: expected WandbConfig, got int"):
        load_config(path, ["log.wandb=3"], check_model=False)


def test_out_dir_is_made_absolute_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert LogConfig(out_dir="runs/a").out_path() == tmp_path / "runs" / "a"
    assert LogConfig(out_dir=str(tmp_path / "elsewhere")).out_path() == tmp_path / "elsewhere"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert LogConfig(out_dir="~/runs/b").out_path() == tmp_path / "home" / "runs" / "b"


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
