"""Where a run's checkpoints live, and the driver's part of them.

``<out_dir>/checkpoints/step_<NNNNNN>/`` holds ``policy/`` (an HF checkpoint the rollout
engine and the trainer load), ``trainer_state.pt`` (optimizer, step, trainer RNG: written by
``Learner.save``) and ``driver_state.json`` (the prompt RNG and the step: written here). A
checkpoint is written under ``step_<NNNNNN>.tmp`` and renamed when complete, so every
``step_*`` folder without the suffix is whole; a crash mid-write leaves only a ``.tmp``
folder, which the next save of that step replaces. Checkpoints are files on the node that
runs both the driver and the trainer actor (single-node runs).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "DRIVER_STATE",
    "checkpoint_dir",
    "commit_checkpoint",
    "latest_checkpoint",
    "load_driver_state",
    "prune_checkpoints",
    "save_driver_state",
    "staging_dir",
]

DRIVER_STATE = "driver_state.json"
_PATTERN = re.compile(r"step_(\d{6,})")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` steps."""
    return Path(out_dir) / "checkpoints" / f"step_{step:06d}"


def staging_dir(out_dir: str | Path, step: int) -> Path:
    """An empty folder to write the checkpoint of ``step`` into before ``commit_checkpoint``."""
    folder = checkpoint_dir(out_dir, step).with_suffix(".tmp")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def commit_checkpoint(out_dir: str | Path, step: int) -> Path:
    """Rename the staged checkpoint of ``step`` to its final name (replacing an older one)."""
    final = checkpoint_dir(out_dir, step)
    if final.exists():
        shutil.rmtree(final)
    final.with_suffix(".tmp").rename(final)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _PATTERN.fullmatch(path.name)) and path.is_dir()
    ]
    return max(steps)[1] if steps else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent complete checkpoints."""
    folder = Path(out_dir) / "checkpoints"
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _PATTERN.fullmatch(path.name)) and path.is_dir()
    )
    for _, path in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(path)


def save_driver_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write the driver's JSON-serialisable state into a checkpoint folder."""
    (Path(folder) / DRIVER_STATE).write_text(json.dumps(state))


def load_driver_state(folder: str | Path) -> dict[str, Any]:
    """The driver state of a checkpoint folder."""
    path = Path(folder) / DRIVER_STATE
    if not path.exists():
        raise ValueError(f"checkpoint {folder}: expected {DRIVER_STATE} in it, got none")
    return json.loads(path.read_text())
