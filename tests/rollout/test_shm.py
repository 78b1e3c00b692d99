"""rollout.shm: locked create-or-attach, 0600, resize, and who unlinks a segment (and who never).

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
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from rollout import shm

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


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --------------------------------------------------------------------------------------------
# Names
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
    with pytest.raises(ValueError, match="size: expected >= 1 byte, got 0"):
        shm.create_or_attach(name, 0, lock_path)
    with pytest.raises(TypeError, match="size"):
        shm.create_or_attach(name, 8.0, lock_path)
    with pytest.raises(ValueError, match="name: expected 1-200 characters"):
        shm.create_or_attach("/" + name, 8, lock_path)
    with pytest.raises(FileNotFoundError):
        shm.attach(name)
    assert not _exists(name)


# --------------------------------------------------------------------------------------------
# create / attach / resize / permissions / lock
# --------------------------------------------------------------------------------------------


def test_create_then_attach_keeps_contents(name, lock_path):
    with shm.create_or_attach(name, 1000, lock_path) as owner:
        assert owner.size == 1000 and owner.name == name
        assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
        assert bytes(owner.buf[:4]) == b"\0\0\0\0"
        owner.buf[:4] = b"abcd"
        again = shm.create_or_attach(name, 1000, lock_path)
        assert bytes(again.buf[:4]) == b"abcd"
        again.buf[4] = 9
        assert owner.buf[4] == 9  # the same memory
        reader = shm.attach(name)
        assert bytes(reader.buf[:5]) == b"abcd\x09"
        reader.close()
        # The second handle was an owner too: closing it unlinks the name (one owner per name).
        again.close()
        assert not _exists(name)
    assert not _exists(name)


def test_size_mismatch_recreates(name, lock_path):
    first = shm.create_or_attach(name, 100, lock_path)
    first.buf[:3] = b"old"
    second = shm.create_or_attach(name, 300, lock_path)
    assert second.size == 300 and os.stat(f"/dev/shm/{name}").st_size == 300
    assert bytes(second.buf[:3]) == b"\0\0\0"  # a new segment, not the old one grown
    assert bytes(first.buf[:3]) == b"old"  # the old mapping stays valid for its holder
    second.close()
    first.close()  # its name is already gone: no error
    assert not _exists(name)


def test_leftover_with_wider_permissions_is_narrowed(name, lock_path):
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask
    os.ftruncate(fd, 64)
    os.close(fd)
    assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o644
    with shm.create_or_attach(name, 64, lock_path):
        assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    old_umask = os.umask(0)
    try:
        with shm.create_or_attach(name, 64, lock_path):
            assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
    finally:
        os.umask(old_umask)


def test_empty_leftover_is_recreated(name, lock_path):
    # An owner that died between creating and sizing its segment leaves 0 bytes (unmappable).
    os.close(os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR, 0o600))
    with shm.create_or_attach(name, 64, lock_path) as owner:
        assert owner.size == 64 and os.stat(f"/dev/shm/{name}").st_size == 64


def test_create_or_attach_waits_for_the_lock(name, lock_path):
    done = threading.Event()
    result = []

    def create():
        result.append(shm.create_or_attach(name, 64, lock_path))
        done.set()

    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    thread = threading.Thread(target=create)
    thread.start()
    try:
        assert not done.wait(0.3), "create_or_attach ran while another process held the lock"
        assert not _exists(name)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    thread.join(10)
    assert done.is_set() and result[0].size == 64
    result[0].close()


# --------------------------------------------------------------------------------------------
# Who unlinks
# --------------------------------------------------------------------------------------------


def test_owner_unlinks_on_close_with_block_exception_and_gc(name, lock_path):
    owner = shm.create_or_attach(name, 64, lock_path)
    owner.close()
    assert not _exists(name)
    owner.close()  # idempotent

    with pytest.raises(RuntimeError, match="boom"), shm.create_or_attach(name, 64, lock_path):
        assert _exists(name)
        raise RuntimeError("boom")
    assert not _exists(name)

    owner = shm.create_or_attach(name, 64, lock_path)
    del owner
    gc.collect()
    assert not _exists(name)


def test_owner_handle_is_not_picklable(name, lock_path):
    with (
        shm.create_or_attach(name, 64, lock_path) as owner,
        pytest.raises(TypeError, match="attach to"),
    ):
        pickle.dumps(owner)


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_owner_unlinks_at_interpreter_exit(ending, name, lock_path):
    _run(
        f"""
        from rollout import shm
        owner = shm.create_or_attach({name!r}, 4096, {lock_path!r})
        owner.buf[0] = 1
        if {ending == "raise"}:
            raise RuntimeError("the owner fails")
        """,
        expect_rc=1 if ending == "raise" else 0,
    )
    assert not _exists(name)


def test_attach_only_process_exit_does_not_unlink(name, lock_path):
    with shm.create_or_attach(name, 4096, lock_path) as owner:
        # A reader that exits with and without closing its mapping.
        for close in ("reader.close()", "pass"):
            _run(
                f"""
                from rollout import shm
                reader = shm.attach({name!r})
                reader.buf[0] += 1
                {close}
                """
            )
            time.sleep(0.2)  # the resource tracker (if it were involved) unlinks after the exit
            assert _exists(name)
        assert owner.buf[0] == 2
        # Control: a plain SharedMemory attach is tracked and its process's exit unlinks the
        # owner's segment on every CPython this project supports; this is what shm.attach avoids.
        _run(
            f"""
            from multiprocessing.shared_memory import SharedMemory
            SharedMemory({name!r}).close()
            """
        )
        assert _wait_until(lambda: not _exists(name))
    assert not _exists(name)


def test_crashed_owner_leftover_is_reused_or_recreated(name, lock_path):
    crash = f"""
        import os
        from rollout import shm
        owner = shm.create_or_attach({name!r}, 4096, {lock_path!r})
        owner.buf[:5] = b"crash"
        os._exit(1)
        """
    _run(crash, expect_rc=1)
    time.sleep(0.2)
    assert _exists(name)  # no cleanup ran, and nothing unlinked it afterwards
    with shm.create_or_attach(name, 4096, lock_path) as owner:
        assert bytes(owner.buf[:5]) == b"crash"  # reused as it was
    assert not _exists(name)

    _run(crash, expect_rc=1)
    with shm.create_or_attach(name, 8192, lock_path) as owner:
        assert owner.size == 8192 and bytes(owner.buf[:5]) == b"\0" * 5  # recreated
    assert not _exists(name)


def test_reader_sees_owner_writes_and_never_unlinks(name, lock_path):
    owner = shm.create_or_attach(name, 64, lock_path)
    reader = shm.attach(name)
    assert isinstance(reader, SharedMemory) and not isinstance(reader, shm.OwnedSharedMemory)
    owner.buf[7] = 42
    assert reader.buf[7] == 42
    reader.close()
    assert _exists(name)  # a reader's close never unlinks
    owner.close()
    assert not _exists(name)
