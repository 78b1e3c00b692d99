"""The installed top-level packages are this repository's, whatever else is installed.

transformers 5.25 started to depend on Hugging Face's ``kernels`` distribution, whose top-level
``kernels`` package shadowed this project's former ``kernels`` in every script run outside the
repository root (the main job broke). A process started elsewhere must import ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("routing_kernels", "rollout", "replay")


def test_top_level_packages_resolve_to_this_repository(tmp_path: Path) -> None:
    # cwd outside the repository: only the installation can put our packages on the path.
    probe = (
        "import importlib, json; "
        f"print(json.dumps({{n: importlib.import_module(n).__file__ for n in {PACKAGES!r}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    for name in PACKAGES:
        assert Path(files[name]).resolve() == ROOT / name / "__init__.py", (name, files[name])
