"""The installed top-level packages are this repository's, and ours never shadow another's.

transformers 5.25 started to depend on Hugging Face's ``kernels`` distribution, whose top-level
``kernels`` package shadowed this project's former ``kernels`` package. Our kernels now live in
the folder ``kernels/`` (the layout's top level) under the import name ``routing_kernels``;
``kernels/`` itself is no package, so Hugging Face's ``kernels`` stays importable from anywhere,
the repository root included.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "routing_kernels": ROOT / "kernels" / "routing_kernels",
    "rollout": ROOT / "rollout",
    "replay": ROOT / "replay",
}


def _module_files(cwd: Path, names: tuple[str, ...], env: dict[str, str] | None = None) -> dict:
    probe = (
        "import importlib, json; "
        f"print(json.dumps({{n: importlib.import_module(n).__file__ for n in {names!r}}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_top_level_packages_resolve_to_this_repository(tmp_path: Path) -> None:
    # cwd outside the repository: only the installation can put our packages on the path.
    files = _module_files(tmp_path, tuple(SOURCES))
    for name, folder in SOURCES.items():
        assert Path(files[name]).resolve() == folder / "__init__.py", (name, files[name])


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels is not installed")
def test_hf_kernels_is_not_shadowed_from_the_repository_root() -> None:
    # `python -c` puts the cwd first on sys.path, as `python -m pytest` does.
    files = _module_files(ROOT, ("kernels",))
    assert files["kernels"] is not None, "`import kernels` found a namespace folder"
    assert not Path(files["kernels"]).resolve().is_relative_to(ROOT), files["kernels"]


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels is not installed")
def test_hf_kernels_is_not_shadowed_inside_pytest() -> None:
    module = importlib.import_module("kernels")
    assert module.__file__ is not None and not Path(module.__file__).is_relative_to(ROOT)


@pytest.mark.slow
def test_wheel_installs_routing_kernels_at_top_level(tmp_path: Path) -> None:
    """A regular (non-editable) install maps kernels/routing_kernels to ``routing_kernels`` and
    ships no top-level ``kernels`` package."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("kernels", "rollout", "replay"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("routing_replay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "routing_kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), [n for n in names if "kernels/" in n]

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    files = _module_files(tmp_path, tuple(SOURCES), env=env)
    for name in SOURCES:
        assert Path(files[name]).resolve() == target / name / "__init__.py", (name, files[name])
