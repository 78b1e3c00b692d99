"""The lock file of ``rollout.capture.shm.create`` (issue 13 section 4): in a directory only this
user can write, never opened through a symbolic link, and a lock held elsewhere raises after the
timeout naming the file instead of hanging.

The temp directory and ``$XDG_RUNTIME_DIR`` are pointed at this test's own folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from rollout.capture import shm

LOCK_FILE = "routing-replay-shm.lock"


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A world-writable (sticky) temp directory standing in for /tmp, and no runtime dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    temp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return temp


@pytest.fixture
def name() -> str:
    name = shm.segment_name(shm.new_instance_id(), 0)
    yield name
    assert not os.path.exists(f"/dev/shm/{name}")


def test_runtime_dir_when_it_is_private(temp_dir, tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert shm.default_lock_path() == str(runtime / LOCK_FILE)


@pytest.mark.parametrize("problem", ["group-writable", "symlink", "missing"])
def test_runtime_dir_that_is_not_private_is_passed_over(problem, temp_dir, tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    if problem == "group-writable":
        runtime.mkdir()
        runtime.chmod(0o770)
    elif problem == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        runtime.symlink_to(tmp_path / "real")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    private = temp_dir / f"routing-replay-{os.getuid()}"
    assert shm.default_lock_path() == str(private / LOCK_FILE)
    info = private.lstat()
    assert info.st_mode & 0o777 == 0o700 and info.st_uid == os.getuid()


@pytest.mark.parametrize("planted", ["symlink", "open-directory"])
def test_a_planted_lock_directory_is_refused(planted, temp_dir, tmp_path):
    private = temp_dir / f"routing-replay-{os.getuid()}"
    target = tmp_path / "victim"
    if planted == "symlink":  # another user's link to a directory of their choosing
        target.mkdir(mode=0o700)
        private.symlink_to(target)
        pattern = "is a symbolic link"
    else:
        private.mkdir()
        private.chmod(0o777)
        pattern = "is mode 777"
    with pytest.raises(PermissionError, match=f"lock directory: expected .*{private} {pattern}"):
        shm.default_lock_path()
    assert not (target / LOCK_FILE).exists()


def test_a_symlink_at_the_lock_path_is_never_followed(name, tmp_path):
    target = tmp_path / "elsewhere" / "created-by-the-victim"
    target.parent.mkdir()
    lock = tmp_path / "shm.lock"
    lock.symlink_to(target)
    with pytest.raises(OSError, match=f"lock_path: expected a regular file, {lock} is a symbolic"):
        shm.create(name, (8,), np.uint8, lock_path=str(lock))
    assert not target.exists()


def test_a_lock_held_by_another_process_times_out_naming_the_file(name, tmp_path):
    lock = tmp_path / "shm.lock"
    hold = (
        "import fcntl, os, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"lock_path: could not lock {lock} within 0.5 s"):
            shm.create(name, (8,), np.uint8, lock_path=str(lock), lock_timeout_s=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        with pytest.raises(TimeoutError, match=str(lock)):
            shm.reclaim_orphans(lock_path=str(lock), lock_timeout_s=0)
    finally:
        holder.kill()
        holder.wait()
    with shm.create(name, (8,), np.uint8, lock_path=str(lock), lock_timeout_s=0.5):
        pass  # free again once the holder is gone
