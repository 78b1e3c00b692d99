"""README.md's main command runs as written: its generation table, the mismatch table, a legend
under each, progress bars (generation, both scoring passes) on stderr, and the JSON summary as
the last line."""

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


def tables(lines: list[str]) -> list[tuple[dict[str, list[str]], str]]:
    """Each Markdown table of ``lines`` (first cell -> other cells, header and rule skipped)
    with the line right under it."""
    found, rows = [], None
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if rows is None:
                rows = {}
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows is not None:
            found.append(({k: v for k, v in rows.items() if k != "metric" and set(k) != {"-"}},
                          line))  # fmt: skip
            rows = None
    return found


@pytest.mark.slow
def test_readme_main_job_runs_and_replay_agrees():
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"^<!-- main-job: (.*) -->$", readme, flags=re.MULTILINE)
    argv = shlex.split(command)
    assert argv[0] == "python", command
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, as CI runs it
    result = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"kl_none", "kl_r3", "router_agreement_none", "router_agreement_r3", "tokens"} <= set(
        summary
    )
    assert summary["tokens"] > 0
    assert summary["router_agreement_r3"] == 1.0
    assert 0.0 <= summary["router_agreement_none"] <= 1.0

    (generation, legend), (mismatch, mismatch_legend) = tables(lines)
    assert generation["requests"] == ["32"] and int(generation["generated tokens"][0]) > 0
    assert float(generation["prefix-cache hit rate"][0].rstrip("%")) > 0  # the shared prefix
    assert float(generation["engine start-up (s)"][0]) > 0
    assert legend.startswith("engine start-up: ") and "tokens/s: " in legend
    assert mismatch["router agreement"][1] == "1.0000"  # the r3 column
    for term in ("k3: ", "F(2): ", "none: ", "r3: "):
        assert term in mismatch_legend, mismatch_legend
    # Progress on stderr: the engine's bar over requests, then one bar per scoring pass.
    for desc in ("generate", "scoring, native routing", "scoring, replayed (r3)"):
        assert re.search(rf"{re.escape(desc)}: 100%.* 32/32 ", result.stderr), desc
