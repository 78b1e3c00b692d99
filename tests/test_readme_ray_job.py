"""README.md's ``ray job submit`` block (the bash block under ``<!-- ray-job -->``) runs as
written, as on a fresh machine: a new HOME (no Ray token yet), no RAY_* settings, a temporary
copy of the checkout as the directory it runs in, a head on Ray's default ports. The job's
summary names the absolute run folder, where its files are.

The head's processes are stopped afterwards whatever happened, by pid: the block runs in a new
session, and its processes are those of that session, those naming this test's Ray temp folder
and their descendants. (``ray stop`` would stop every Ray instance on the machine.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from replay.trainer import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# GCS, jobs API (dashboard), Ray client server, dashboard agent: what `ray start --head` binds.
RAY_DEFAULT_PORTS = (6379, 8265, 10001, 52365)
NOT_COPIED = (".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def readme_block(marker: str) -> str:
    """The fenced bash block right under ``<!-- marker -->`` in README.md."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^<!-- {marker} -->\n```bash\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no bash block under <!-- {marker} -->"
    return match.group(1)


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), cmdline)
    return table


def processes_of(session: int, marker: str) -> set[int]:
    """Processes of ``session`` or naming ``marker``, and all their descendants."""
    table = process_table()
    ours = {pid for pid, (_, sid, cmd) in table.items() if sid == session or marker in cmd}
    while True:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        if not children:
            break
        ours |= children
    ours.discard(os.getpid())
    return ours


def stop(pids: set[int], grace_s: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_readme_ray_job_block_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("ray") is None or not Path("/proc/self/stat").exists():
        pytest.skip("needs the ray CLI and Linux /proc")
    taken = [port for port in RAY_DEFAULT_PORTS if port_taken(port)]
    if taken:
        pytest.skip(f"ports {taken} are taken (another Ray?): the README's block uses the defaults")
    block = readme_block("ray-job")
    assert "ray job submit" in block and "ray stop" not in block, block

    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(*NOT_COPIED))
    home = tmp_path / "home"
    home.mkdir()
    # Unix socket paths must stay under ~107 characters: a short folder, not tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayreadme", dir="/tmp"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),  # keeps this head out of /tmp/ray, where ray.init() looks
        RAY_USAGE_STATS_ENABLED="0",
        CUDA_VISIBLE_DEVICES="",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    shell = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = shell.communicate(timeout=420)
    finally:
        stop(processes_of(shell.pid, str(ray_tmp)))
        shell.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert shell.returncode == 0, output[-4000:]

    summaries = [json.loads(line) for line in output.splitlines() if line.startswith('{"out_dir"')]
    assert summaries, output[-4000:]
    summary = summaries[-1]
    out_dir = repo / "runs" / "tiny_cpu"  # $PWD/runs/tiny_cpu where the block ran
    assert summary["out_dir"] == str(out_dir)
    assert summary["metrics"] == str(out_dir / "metrics.jsonl")
    assert [r["step"] for r in read_metrics(out_dir)] == [1, 2]
    assert summary["steps_run"] == 2 and summary["router_agreement"] == 1.0
    assert summary["kl_k3_max"] >= summary["kl_k3"] >= 0.0
    assert summary["checkpoint"] == str(out_dir / "checkpoints" / "step_000002")
    assert (Path(summary["checkpoint"]) / "policy" / "config.json").is_file()
