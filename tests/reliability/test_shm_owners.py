"""Owners, orphans and readers (issue 13 sections 4 and 8): SIGTERM and SIGKILL of an owner and
the sweep that reclaims what they leave when the next store starts; a second owner of a live
name refused; a reader killed while attached.

Owners and readers here are forked children of the test process (no interpreter start-up): each
builds its store or reader, reports through a pipe, and waits to be killed. Liveness is the
owner's lock on the segment file, never its pid: a live owner's segment survives every sweep
even with a dead pid in its header, and an orphan is reclaimed even when its pid was recycled
by a live process. Segments of earlier releases (no header) are reclaimed when the pid in their
name is dead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from rollout.capture import RoutedExpertsReader, RoutingStore, shm
from rollout.capture.shm.header import Header

DEV_SHM = Path("/dev/shm")


@pytest.fixture
def tag() -> str:
    """An instance-id prefix of this test's segments; none may be left after it."""
    tag = f"t{os.getpid()}x{uuid.uuid4().hex[:6]}"
    yield tag
    leftovers = sorted(p.name for p in DEV_SHM.iterdir() if tag in p.name)
    for leftover in leftovers:
        (DEV_SHM / leftover).unlink()
    assert not leftovers, f"segments left behind: {leftovers}"


@pytest.fixture
def lock_path(tmp_path: Path) -> str:
    return str(tmp_path / "shm.lock")


def _store(name: str, lock_path: str) -> RoutingStore:
    return RoutingStore(
        name=name,
        num_kv_slots=64,
        num_moe_layers=2,
        top_k=2,
        max_num_tokens=8,
        device="cpu",
        lock_path=lock_path,
    )


def _fork_owner(body: Callable[[], None], *, reports: bool = True) -> int:
    """Fork a child that runs ``body`` (which builds its store or reader, calls ``ready`` and
    may then block); return its pid once it reported (or, with ``reports=False``, once it has
    failed without reporting). The child never returns into pytest."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready_r)
            body(lambda: os.write(ready_w, b"r"))
        except SystemExit as exit:
            code = exit.code
        except BaseException:  # noqa: BLE001 (nothing may escape into pytest's frames)
            code = 1
        finally:
            os._exit(code)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert ready.read(1) == (b"r" if reports else b""), f"child reported: {not reports}"
    return pid


def _wait(pid: int) -> int:
    """The exit code of child ``pid`` (-N: killed by signal N)."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _hold(name: str, lock_path: str) -> Callable[[Callable[[], None]], None]:
    def body(ready: Callable[[], None]) -> None:
        store = _store(name, lock_path)  # noqa: F841 (kept alive until the signal)
        ready()
        while True:
            time.sleep(1)

    return body


def _hold_with_default_sigterm_in_a_thread(name: str, lock_path: str):
    """The store is built off the main thread, where no handler can be installed; SIGTERM keeps
    its default action (the process dies without any clean-up)."""

    def body(ready: Callable[[], None]) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stores = []
        thread = threading.Thread(target=lambda: stores.append(_store(name, lock_path)))
        thread.start()
        thread.join()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ready()
        while True:
            time.sleep(1)

    return body


def _hold_under_an_app_handler(name: str, lock_path: str):
    """The application's own SIGTERM handler (exit) stays in charge; the store's usual clean-up
    runs as the exit unwinds."""

    def body(ready: Callable[[], None]) -> None:
        def app_handler(*_):
            sys.exit(0)

        signal.signal(signal.SIGTERM, app_handler)
        with _store(name, lock_path):
            assert signal.getsignal(signal.SIGTERM) is app_handler
            ready()
            while True:
                time.sleep(1)

    return body


def test_sigterm_and_sigkill_leave_nothing_after_the_next_store_starts(tag, lock_path):
    names = {case: shm.segment_name(f"{tag}-{case}", 0) for case in ("term", "bare", "app", "kill")}
    owners = {
        "term": _hold(names["term"], lock_path),
        "bare": _hold_with_default_sigterm_in_a_thread(names["bare"], lock_path),
        "app": _hold_under_an_app_handler(names["app"], lock_path),
        "kill": _hold(names["kill"], lock_path),
    }
    pids = {case: _fork_owner(body) for case, body in owners.items()}
    assert all((DEV_SHM / name).exists() for name in names.values())
    for case, pid in pids.items():
        os.kill(pid, signal.SIGKILL if case == "kill" else signal.SIGTERM)
    codes = {case: _wait(pid) for case, pid in pids.items()}
    # Each died as it would have without the library: by the signal, or the app's exit code.
    assert codes == {"term": -15, "bare": -15, "app": 0, "kill": -9}
    # The clean-up handler and the app's exit cleaned up; the other two left their segments.
    left = {case for case, name in names.items() if (DEV_SHM / name).exists()}
    assert left == {"bare", "kill"}

    # The next store to start reclaims them; nothing of ours is left but the new store.
    fresh = shm.segment_name(f"{tag}-fresh", 0)
    with _store(fresh, lock_path):
        assert sorted(p.name for p in DEV_SHM.iterdir() if tag in p.name) == [fresh]


def test_liveness_is_the_owners_lock_not_its_pid(tag, lock_path):
    live, orphan = shm.segment_name(f"{tag}-live", 0), shm.segment_name(f"{tag}-orphan", 0)
    live_pid = _fork_owner(_hold(live, lock_path))
    orphan_pid = _fork_owner(lambda ready: (_store(orphan, lock_path), ready(), os._exit(0)))
    assert _wait(orphan_pid) == 0
    dead_pid = orphan_pid
    try:
        # The live owner's header names a dead pid; the orphan's names a live process (ours),
        # as if its pid had been recycled.
        _rewrite_owner_pid(live, dead_pid)
        _rewrite_owner_pid(orphan, os.getpid())
        reclaimed = shm.reclaim_orphans(lock_path=lock_path)
        assert orphan in reclaimed and live not in reclaimed
        assert (DEV_SHM / live).exists() and not (DEV_SHM / orphan).exists()
        # A second owner of the live name is refused (its owner is alive).
        with pytest.raises(FileExistsError, match=f"shared memory {live}: in use by a live owner"):
            _store(live, lock_path)
    finally:
        os.kill(live_pid, signal.SIGKILL)
        assert _wait(live_pid) == -9
    assert live in shm.reclaim_orphans(lock_path=lock_path)


def test_segments_of_earlier_releases_are_reclaimed_when_their_pid_is_dead(tag, lock_path):
    dead_pid = _fork_owner(lambda ready: (ready(), os._exit(0)))
    assert _wait(dead_pid) == 0
    # Names as earlier releases made them: "routing-replay-<pid>-<12 hex>-dp<rank>", no header.
    dead = f"{shm.SEGMENT_PREFIX}-{dead_pid}-{uuid.uuid4().hex[:12]}-dp0"
    alive = f"{shm.SEGMENT_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}-dp0"
    unknown = f"{shm.SEGMENT_PREFIX}-{tag}-not-ours"
    link = f"{shm.SEGMENT_PREFIX}-{dead_pid}-{uuid.uuid4().hex[:12]}-dp1"
    target = DEV_SHM / f"{tag}-link-target"
    for name in (dead, alive, unknown):
        (DEV_SHM / name).write_bytes(b"\0" * 8192)
    target.write_bytes(b"x")
    (DEV_SHM / link).symlink_to(target)
    try:
        # (Other dead owners' leftovers on this machine may be reclaimed along with it.)
        reclaimed = shm.reclaim_orphans(lock_path=lock_path)
        assert dead in reclaimed and not {alive, unknown, link} & set(reclaimed)
        assert not (DEV_SHM / dead).exists()
        assert all((DEV_SHM / n).exists() for n in (alive, unknown, target.name))
        assert (DEV_SHM / link).is_symlink()
    finally:
        for name in (alive, unknown, link, target.name):
            (DEV_SHM / name).unlink()


def _rewrite_owner_pid(name: str, pid: int) -> None:
    """Put ``pid`` into the header of segment ``name`` (shape and dtype as they were)."""
    with shm.attach(name) as segment:
        header = Header(pid, segment.shape, np.dtype(segment.dtype))
    fd = os.open(DEV_SHM / name, os.O_WRONLY)
    try:
        os.pwrite(fd, header.pack(), 0)
    finally:
        os.close(fd)


def test_a_second_owner_of_a_live_name_is_refused(tag, lock_path, seed):
    name = shm.segment_name(f"{tag}-same", 0)
    with _store(name, lock_path) as first:
        _fill(first, np.random.default_rng(seed))
        rows = first.read(range(64))
        # In this process (two engines given one instance_id) and in another one.
        with pytest.raises(
            FileExistsError, match=f"{name}: in use by a live owner \\(pid {os.getpid()}"
        ):
            _store(name, lock_path)
        child = _fork_owner(lambda ready: (_store(name, lock_path), ready()), reports=False)
        assert _wait(child) == 1  # its store raised; the pipe closed without a report
        # The first owner is untouched: its segment, its rows, its liveness.
        np.testing.assert_array_equal(first.read(range(64)), rows)
        with RoutedExpertsReader.from_spec(first.reader_spec()) as reader:
            np.testing.assert_array_equal(reader.read(range(64)), rows)
        assert name not in shm.reclaim_orphans(lock_path=lock_path)
    assert not (DEV_SHM / name).exists()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_reader_killed_while_attached_leaves_the_owner_working(signum, tag, lock_path, seed):
    name = shm.segment_name(f"{tag}-read", 0)
    gen = np.random.default_rng(seed)
    with _store(name, lock_path) as store:
        _fill(store, gen)
        spec = store.reader_spec()

        def read_forever(ready):
            with RoutedExpertsReader.from_spec(spec) as reader:
                reader.read(range(64))
                ready()
                while True:
                    reader.read(range(64))

        reader_pid = _fork_owner(read_forever)
        os.kill(reader_pid, signum)
        assert _wait(reader_pid) == -signum
        assert (DEV_SHM / name).exists()
        assert name not in shm.reclaim_orphans(lock_path=lock_path)
        # The owner goes on: new steps land, and a new reader sees exactly what it wrote.
        rows = _fill(store, gen)
        with RoutedExpertsReader.from_spec(spec) as reader:
            np.testing.assert_array_equal(reader.read(range(64)), rows)
    assert not (DEV_SHM / name).exists()


def _fill(store: RoutingStore, gen: np.random.Generator) -> np.ndarray:
    """Write random rows to all 64 slots in steps of 8 tokens; return them [64, 2, 2]."""
    rows = gen.integers(0, 64, (64, 2, 2), dtype=np.int16)
    for first in range(0, 64, 8):
        store.after_forward(torch.from_numpy(rows[first : first + 8]), 8, range(first, first + 8))
        store.commit()
    return rows
