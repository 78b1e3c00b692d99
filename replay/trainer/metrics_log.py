"""``MetricsLog``: one JSON line per training step in ``metrics.jsonl``, and TensorBoard scalars.

TensorBoard needs the ``tensorboard`` package (a dependency of routing-replay, which
``torch.utils.tensorboard`` imports); asked for without it, the log raises rather than drop the
events a user asked for. On resume the JSONL
keeps the records up to the checkpoint's step and drops later ones (they belong to the run
that was cut off), so the file always describes one history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends step records to ``<out_dir>/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        out_dir: the run folder (created if missing).
        tensorboard: also write TensorBoard events into ``out_dir``.
        resume_step: keep the existing records with ``step <= resume_step`` (0: start anew).
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    f"log.tensorboard: expected the tensorboard package for tensorboard=True "
                    f"(pip install tensorboard), got {err}; set log.tensorboard=false to write "
                    f"{self.path} only"
                ) from err
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must have an int ``step``); its finite scalars go to TensorBoard."""
        step = record["step"]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in record.items():
                if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<out_dir>/metrics.jsonl``, in order."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]
