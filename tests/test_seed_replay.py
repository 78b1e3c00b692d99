"""The suite's random seed is fresh per run, printed on failure, and replays a run exactly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

PROBE = '''
import torch

def test_draws(rng, seed):
    print("DRAW", seed, torch.randint(0, 2**31, (4,), generator=rng).tolist())
    assert False, "fails on purpose, to show the seed report"
'''


def _run(folder: Path, *args: str) -> tuple[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, str(folder)],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    (draw,) = re.findall(r"^DRAW .*$", result.stdout, re.M)
    return draw, result.stdout


def test_seed_is_printed_and_replays_the_run(tmp_path: Path) -> None:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    first, out = _run(tmp_path)
    (run_seed,) = re.findall(r"replay with `python -m pytest --seed (\d+) ", out)
    assert f"random seed: {run_seed}" in out  # the header
    replayed, _ = _run(tmp_path, "--seed", run_seed)
    assert replayed == first
    other, _ = _run(tmp_path, "--seed", str((int(run_seed) + 1) % 2**32))
    assert other != first
