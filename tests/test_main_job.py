"""README.md's main command runs as written and ends with its JSON summary line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_main_job_runs_and_replay_agrees():
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^<!-- main-job: (.*) -->$", readme, flags=re.MULTILINE)
    argv = shlex.split(command)
    assert argv[0] == "python", command
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, as CI runs it
    result = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"kl_none", "kl_r3", "router_agreement_none", "router_agreement_r3", "tokens"} <= set(
        summary
    )
    assert summary["tokens"] > 0
    assert summary["router_agreement_r3"] == 1.0
    assert 0.0 <= summary["router_agreement_none"] <= 1.0
