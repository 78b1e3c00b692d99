"""rollout.capture.shm: create, attach, the header, 0600, the lock, and who unlinks a segment (and
who never). The fault cases (fork, orphans, SIGTERM, lock-file attacks, ENOSPC, a reader's death)
are in tests/reliability/test_shm_*.py.

Processes that must exit on their own terms (normal exit, uncaught exception, ``os._exit``)
are real subprocesses running ``python -c``; every segment a test makes is checked gone after it.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from rollout.capture import shm

REPO = Path(__file__).resolve().parents[2]
# Names of this test process's segments all start so (new_instance_id embeds the pid).
PREFIX = f"{shm.SEGMENT_PREFIX}-{os.getpid()}-"


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join("/dev/shm", name))


@pytest.fixture
def name() -> str:
    """A fresh segment name; after the test, no segment of this process may be left."""
    yield shm.segment_name(shm.new_instance_id(), 0)
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(PREFIX)]
    for leftover in leftovers:
        os.unlink(os.path.join("/dev/shm", leftover))
    assert not leftovers, f"segments left behind: {leftovers}"


@pytest.fixture
def lock_path(tmp_path: Path) -> str:
    return str(tmp_path / "shm.lock")


def _run(code: str, *, expect_rc: int = 0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the repository importable."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == expect_rc, proc.stderr
    return proc


# --------------------------------------------------------------------------------------------
# Names and arguments
# --------------------------------------------------------------------------------------------


def test_segment_names_are_unique_per_instance_and_rank():
    a, b = shm.new_instance_id(), shm.new_instance_id()
    assert a != b and a.startswith(f"{os.getpid()}-")
    names = {shm.segment_name(i, r) for i in (a, b) for r in (0, 1, 2)}
    assert len(names) == 6
    assert shm.segment_name(a, 3) == f"{shm.SEGMENT_PREFIX}-{a}-dp3"
    with pytest.raises(ValueError, match="instance_id: expected 1-200 characters"):
        shm.segment_name("a/b", 0)
    with pytest.raises(ValueError, match="dp_rank: expected >= 0, got -1"):
        shm.segment_name(a, -1)
    with pytest.raises(TypeError, match="dp_rank"):
        shm.segment_name(a, "0")


def test_bad_arguments(name, lock_path):
    cases = [
        (ValueError, r"shape: expected 1 to 8 ints >= 1, got \(0,\)", ((0,), "uint8"), {}),
        (ValueError, "shape: expected", ((2.0,), "uint8"), {}),
        (ValueError, "shape: expected", ((1,) * 9, "uint8"), {}),
        (ValueError, "shape: expected", (8, "uint8"), {}),
        (ValueError, "dtype: expected a numeric numpy dtype", ((8,), object), {}),
        (ValueError, "dtype: expected a numpy dtype", ((8,), "nonsense"), {}),
        (TypeError, "lock_path: expected a str", ((8,), "uint8"), {"lock_path": 3}),
        (
            ValueError,
            "lock_timeout_s: expected a number >= 0",
            ((8,), "u1"),
            {"lock_timeout_s": -1},
        ),
        (ValueError, "lock_timeout_s", ((8,), "u1"), {"lock_timeout_s": float("nan")}),
    ]
    for error, pattern, args, kwargs in cases:
        with pytest.raises(error, match=pattern):
            shm.create(name, *args, **{"lock_path": lock_path, **kwargs})
    with pytest.raises(ValueError, match="name: expected 1-200 characters"):
        shm.create("/" + name, (8,), "uint8", lock_path=lock_path)
    with pytest.raises(FileNotFoundError):
        shm.attach(name)
    assert not _exists(name)


# --------------------------------------------------------------------------------------------
# create / attach / header / permissions / lock
# --------------------------------------------------------------------------------------------


def test_create_then_attach_shares_the_array(name, lock_path):
    with shm.create(name, (10, 3), np.int16, lock_path=lock_path) as owner:
        assert owner.shape == (10, 3) and owner.dtype == np.int16 and owner.name == name
        assert owner.owner_pid == os.getpid() and owner.nbytes == 60
        info = os.stat(f"/dev/shm/{name}")
        assert info.st_mode & 0o777 == 0o600 and info.st_size == 4096 + 60
        assert not owner.array.any()  # zero-filled
        owner.array[2] = [1, -2, 3]
        with shm.attach(name) as reader:
            assert isinstance(reader, shm.Segment) and not isinstance(reader, shm.OwnedSegment)
            assert reader.shape == (10, 3) and reader.dtype == np.int16
            assert reader.owner_pid == os.getpid()
            np.testing.assert_array_equal(reader.array[2], [1, -2, 3])
            reader.array[3, 0] = 9
            assert owner.array[3, 0] == 9  # the same memory
        assert _exists(name)  # a reader's close never unlinks
    assert not _exists(name)


def test_mode_is_0600_whatever_the_umask(name, lock_path):
    old_umask = os.umask(0)
    try:
        with shm.create(name, (64,), np.uint8, lock_path=lock_path):
            assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def test_attach_refuses_a_file_without_our_header(name):
    # A segment of an earlier release (no header), or anything else of that name.
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 8192)
    os.close(fd)
    try:
        with pytest.raises(
            ValueError, match="expected a segment made by rollout.capture.shm.create"
        ):
            shm.attach(name)
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_create_waits_for_the_lock(name, lock_path):
    done = threading.Event()
    result = []

    def create():
        result.append(shm.create(name, (64,), np.uint8, lock_path=lock_path))
        done.set()

    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    thread = threading.Thread(target=create)
    thread.start()
    try:
        assert not done.wait(0.3), "create ran while another holder had the lock"
        assert not _exists(name)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    thread.join(10)
    assert done.is_set() and result[0].shape == (64,)
    result[0].close()


def test_default_lock_path_is_in_a_private_directory():
    path = Path(shm.default_lock_path())
    info = path.parent.lstat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o077 == 0
    assert not path.parent.is_symlink()


# --------------------------------------------------------------------------------------------
# Who unlinks
# --------------------------------------------------------------------------------------------


def test_owner_unlinks_on_close_with_block_exception_and_gc(name, lock_path):
    owner = shm.create(name, (64,), np.uint8, lock_path=lock_path)
    owner.close()
    assert not _exists(name)
    owner.close()  # idempotent

    with (
        pytest.raises(RuntimeError, match="boom"),
        shm.create(name, (64,), np.uint8, lock_path=lock_path),
    ):
        assert _exists(name)
        raise RuntimeError("boom")
    assert not _exists(name)

    owner = shm.create(name, (64,), np.uint8, lock_path=lock_path)
    del owner
    gc.collect()
    assert not _exists(name)


def test_close_with_a_live_view_unlinks_then_refuses_to_unmap(name, lock_path):
    owner = shm.create(name, (64,), np.uint8, lock_path=lock_path)
    view = owner.array[:8]
    with pytest.raises(BufferError):
        owner.close()
    assert not _exists(name)  # the name went first; the mapping stays for the view
    view[0] = 1
    del view
    owner.close()


def test_segments_are_not_picklable(name, lock_path):
    with shm.create(name, (64,), np.uint8, lock_path=lock_path) as owner:
        with pytest.raises(TypeError, match="attach to"):
            pickle.dumps(owner)
        with shm.attach(name) as reader, pytest.raises(TypeError, match="attach to"):
            pickle.dumps(reader)


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_owner_unlinks_at_interpreter_exit(ending, name, lock_path):
    _run(
        f"""
        import numpy as np
        from rollout.capture import shm
        owner = shm.create({name!r}, (4096,), np.uint8, lock_path={lock_path!r})
        owner.array[0] = 1
        if {ending == "raise"}:
            raise RuntimeError("the owner fails")
        """,
        expect_rc=1 if ending == "raise" else 0,
    )
    assert not _exists(name)


def test_attach_only_process_exit_does_not_unlink(name, lock_path):
    with shm.create(name, (4096,), np.uint8, lock_path=lock_path) as owner:
        # A reader that exits with and without closing its mapping, and one that dies.
        for ending in ("reader.close()", "pass", "import os; os._exit(3)"):
            _run(
                f"""
                from rollout.capture import shm
                reader = shm.attach({name!r})
                reader.array[0] += 1
                {ending}
                """,
                expect_rc=3 if "_exit" in ending else 0,
            )
            assert _exists(name)
        assert owner.array[0] == 3


def test_dead_owner_leftover_is_replaced(name, lock_path):
    _run(
        f"""
        import os
        import numpy as np
        from rollout.capture import shm
        owner = shm.create({name!r}, (4096,), np.uint8, lock_path={lock_path!r})
        owner.array[:5] = list(b"crash")
        os._exit(1)
        """,
        expect_rc=1,
    )
    assert _exists(name)  # no clean-up ran
    with shm.create(name, (4096,), np.uint8, lock_path=lock_path) as owner:
        assert owner.owner_pid == os.getpid()
        assert not owner.array.any()  # a fresh segment, not the leftover
    assert not _exists(name)
