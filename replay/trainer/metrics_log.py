"""``MetricsLog``: one JSON line per training step in ``metrics.jsonl``, TensorBoard scalars,
and a Weights & Biases run.

TensorBoard needs the ``tensorboard`` package (a dependency of routing-replay, which
``torch.utils.tensorboard`` imports), W&B the optional ``wandb`` package (the ``wandb``
extra); asked for without its package, the log raises naming the field rather than drop what a
user asked for. On resume the JSONL keeps the records up to the checkpoint's step and drops
later ones (they belong to the run that was cut off), so the file always describes one history;
a resumed run starts a new W&B run, whose steps continue from the checkpoint's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from replay.trainer.config import WandbConfig

__all__ = ["MetricsLog", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends step records to ``<out_dir>/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        out_dir: the run folder (created if missing).
        tensorboard: also write TensorBoard events into ``out_dir``.
        wandb: also log to this Weights & Biases run (its files under ``out_dir/wandb``).
        run_config: the run's configuration as plain data, recorded by the W&B run.
        resume_step: keep the existing records with ``step <= resume_step`` (0: start anew).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: bool,
        wandb: WandbConfig | None = None,
        run_config: dict[str, Any] | None = None,
        resume_step: int = 0,
    ) -> None:
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
        self._wandb_run = None
        if wandb is not None:
            self._wandb_run = _start_wandb(wandb, self.out_dir, run_config, self.path)

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard events are written."""
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must have an int ``step``); its finite scalars go to TensorBoard
        and W&B."""
        step = record["step"]
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            name: value
            for name, value in record.items()
            if name != "step"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._wandb_run is not None:
            # commit: the step is written now (W&B would hold it back until the next step).
            self._wandb_run.log(scalars, step=step, commit=True)

    def close(self) -> None:
        """Flush and close TensorBoard and finish the W&B run (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _start_wandb(
    config: WandbConfig, out_dir: Path, run_config: dict[str, Any] | None, jsonl: Path
) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            f"log.wandb: expected the wandb package for log.wandb (pip install "
            f"'routing-replay[wandb]'), got {err}; set log.wandb=null to write {jsonl} only"
        ) from err
    return wandb.init(
        project=config.project,
        name=config.name,
        mode=config.mode,
        dir=out_dir,
        config=run_config,
        # No stdout/stderr capture: W&B's console wrapper fights tqdm and Ray's log streaming,
        # and every number it would show is in the records logged here.
        settings=wandb.Settings(console="off"),
    )


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<out_dir>/metrics.jsonl``, in order."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]
