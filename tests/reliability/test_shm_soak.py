"""The soak script (``examples/benchmarks/soak.py``) runs as written at tiny counts: both parts,
its tables, nothing of the run left in ``/dev/shm``, and its JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_script_at_tiny_counts(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "benchmarks" / "soak.py"),
            "--generate-calls=3",
            "--prompts-per-call=2",
            "--grpo-steps=1",
            f"--out={tmp_path}",
        ],
        check=False,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")])),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "3 capture-on generate calls (2 requests each):" in out
    assert "1 GRPO steps (tiny_cpu.yaml, local Ray):" in out
    for label in ("driver", "RolloutWorker", "TrainerWorker"):
        assert f"| open fds, {label}" in out and f"| RSS MB, {label}" in out
    # One segment per engine while it runs (the generate engine's, the rollout worker's) ...
    segments = [
        [cell.strip() for cell in line.split("|")[2:5]]
        for line in out.splitlines()
        if line.startswith("| /dev/shm segments of the run")
    ]
    assert segments == [["1", "1", "0"], ["1", "1", "0"]], out
    # ... and none once they are shut down.
    assert "after shutdown: 0 segments of the run's processes left []" in out
    samples = json.loads((tmp_path / "soak.json").read_text())
    assert [s["i"] for s in samples["generate"]] == [0, 1, 2, 3]
    assert [s["i"] for s in samples["grpo"]] == [0, 1]
    assert (tmp_path / "soak.png").stat().st_size > 10_000
