"""POSIX shared-memory segments for the routing store: locked create-or-attach, owner cleanup.

A segment has one *owner* (the engine process of one DP rank, which writes it and unlinks it)
and any number of *readers* (the front end, a trainer process on the same node) that attach by
name and never unlink. Linux only (``fcntl`` locks, ``/dev/shm``).

Lifetime rules, exactly:

- ``create_or_attach`` (the owner) runs under an exclusive ``flock`` on ``lock_path``: it
  creates the segment if absent, attaches to it if present with the requested size (a leftover
  of a crashed owner is reused as it is, contents included), and unlinks and recreates it if
  the present one has another size. The segment is then mode 0600 (owner-only; a leftover with
  wider permissions is narrowed) and its pages are reserved with ``posix_fallocate``, so a full
  ``/dev/shm`` fails here with ``OSError`` instead of a SIGBUS on a later write.
- The owner's ``OwnedSharedMemory`` unlinks the segment when it is closed (``close()``, or the
  end of a ``with`` block, exceptions included), when it is garbage collected, or at
  interpreter exit, whichever comes first and only once (a ``weakref.finalize``, no global
  registry). A process that dies without running Python's exit handlers (SIGKILL,
  ``os._exit``) leaves the segment behind; the next ``create_or_attach`` of that name reuses or
  recreates it.
- ``attach`` (a reader) maps an existing segment. Neither it nor its process's exit ever
  unlinks the segment.
- Neither kind is registered with CPython's ``multiprocessing.resource_tracker``. On Python
  3.11 and 3.12 every ``SharedMemory`` registers itself there and the tracker unlinks what is
  still registered when the process (or the process tree sharing the tracker) exits, which
  would let a reader's exit destroy the owner's segment, and a crashed owner's tracker unlink
  a segment the next owner has already reused. We pass ``track=False`` on 3.13+ and unregister
  right after opening on 3.11 / 3.12.

One owner per name at a time: two owners of one name would unlink it under each other. Names
from ``segment_name(new_instance_id(), dp_rank)`` are unique per engine instance and DP rank.
"""

from __future__ import annotations

import _posixshmem  # CPython's shm_open / shm_unlink, what SharedMemory itself uses
import contextlib
import fcntl
import logging
import os
import re
import sys
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Self

__all__ = [
    "SEGMENT_PREFIX",
    "OwnedSharedMemory",
    "attach",
    "create_or_attach",
    "default_lock_path",
    "new_instance_id",
    "segment_name",
    "unlink_if_present",
]

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "routing-replay"
_DEV_SHM = "/dev/shm"
_MODE = 0o600
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
_HAS_TRACK_ARG = sys.version_info >= (3, 13)


def new_instance_id() -> str:
    """A fresh engine-instance id, ``"<pid>-<12 hex digits of a uuid4>"``.

    The front end draws one per engine and hands it to every DP rank, so the ranks' segment
    names are distinct from every other engine's on the node (even after pid reuse) and the
    front end can name each rank's segment without asking.
    """
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def segment_name(instance_id: str, dp_rank: int) -> str:
    """The segment name of DP rank ``dp_rank`` of engine ``instance_id``:
    ``"routing-replay-<instance_id>-dp<rank>"`` (a file ``/dev/shm/<name>``).

    Raises:
        TypeError: ``instance_id`` not a str or ``dp_rank`` not an int.
        ValueError: ``instance_id`` empty or with characters outside ``[A-Za-z0-9._-]``, or
            ``dp_rank`` negative.
    """
    if not isinstance(instance_id, str):
        raise TypeError(f"instance_id: expected a str, got {type(instance_id).__name__}")
    if not _NAME_RE.fullmatch(instance_id):
        raise ValueError(
            f"instance_id: expected 1-200 characters of [A-Za-z0-9._-], got {instance_id!r}"
        )
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int):
        raise TypeError(f"dp_rank: expected an int, got {type(dp_rank).__name__}")
    if dp_rank < 0:
        raise ValueError(f"dp_rank: expected >= 0, got {dp_rank}")
    return f"{SEGMENT_PREFIX}-{instance_id}-dp{dp_rank}"


def default_lock_path() -> str:
    """The lock file ``create_or_attach`` callers share by default: one per user in the temp
    directory (``<tmp>/routing-replay-shm-<uid>.lock``). It is never deleted: removing a lock
    file while another process waits on it would break the mutual exclusion."""
    return os.path.join(tempfile.gettempdir(), f"{SEGMENT_PREFIX}-shm-{os.getuid()}.lock")


class OwnedSharedMemory(SharedMemory):
    """The owner's handle on a segment (made by ``create_or_attach``): a ``SharedMemory`` whose
    ``close()`` also unlinks the segment.

    ``close()``, leaving a ``with`` block (normally or by an exception), garbage collection and
    interpreter exit all unlink it, once. ``close()`` then unmaps it, which raises BufferError
    while arrays over ``buf`` are alive (drop them first). Not picklable: another process
    attaches by name with ``attach`` (and so never becomes a second owner).
    """

    _finalizer: weakref.finalize | None = None

    def close(self) -> None:
        """Unlink the segment (if not done yet), then unmap it."""
        self.unlink()
        super().close()

    def unlink(self) -> None:
        """Unlink the segment if this handle has not yet done so; readers keep their mappings."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The finalizer unlinks; only the mapping and the descriptor are left to release here.
        # Arrays still viewing ``buf`` keep the mapping alive: nothing else to do then.
        with contextlib.suppress(BufferError):
            super().close()

    def __reduce__(self) -> object:
        raise TypeError(
            "OwnedSharedMemory: cannot be pickled (a copy would be a second owner); "
            f"attach to {self.name!r} with rollout.shm.attach in the other process"
        )

    def _arm(self) -> None:
        # The finalizer must not reference self, or the handle would never be collected.
        self._finalizer = weakref.finalize(self, unlink_if_present, self.name)


def create_or_attach(name: str, size: int, lock_path: str) -> OwnedSharedMemory:
    """Create the segment ``name`` of ``size`` bytes, or attach to the one already there.

    Under an exclusive ``flock`` on ``lock_path`` (created with mode 0600 if absent, never
    deleted): create if absent (zero-filled); attach if present with exactly ``size`` bytes
    (contents kept: a crashed owner's leftover is reused); unlink and recreate if present with
    another size. Then the segment is made mode 0600 and its pages are reserved. The caller
    becomes the owner: see ``OwnedSharedMemory`` for when the segment is unlinked.

    Raises:
        TypeError: ``name`` or ``lock_path`` not a str, ``size`` not an int.
        ValueError: ``name`` empty, longer than 200 or with characters outside
            ``[A-Za-z0-9._-]``; ``size`` < 1.
        PermissionError: the segment exists and belongs to another user.
        OSError: ``/dev/shm`` cannot hold ``size`` bytes (ENOSPC; the segment is removed).
    """
    _check_name(name)
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size: expected an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size: expected >= 1 byte, got {size}")
    if not isinstance(lock_path, str):
        raise TypeError(f"lock_path: expected a str, got {type(lock_path).__name__}")

    with _file_lock(lock_path):
        try:
            existing = os.stat(os.path.join(_DEV_SHM, name)).st_size
        except FileNotFoundError:
            existing = None
        if existing is not None and existing != size:
            # Also an empty leftover of an owner that died between creating and sizing it,
            # which could not even be mapped.
            logger.info(
                "shared memory %s exists with %d bytes, recreating it with %d", name, existing, size
            )
            unlink_if_present(name)
            existing = None
        shm = _open(OwnedSharedMemory, name, create=existing is None, size=size)
        shm._arm()
        if existing is None:
            logger.debug("created shared memory %s (%d bytes)", name, size)
        else:
            logger.info("reusing existing shared memory %s (%d bytes)", name, size)
        try:
            _restrict_and_reserve(name, size)
        except BaseException:
            shm.close()
            raise
    return shm


def attach(name: str) -> SharedMemory:
    """Map the existing segment ``name`` as a reader: read-write mapping, never unlinked by this
    process (not by ``close()``, not at exit). Call ``close()`` to unmap; never ``unlink()``.

    Raises:
        FileNotFoundError: no segment of that name.
        PermissionError: the segment belongs to another user.
    """
    _check_name(name)
    return _open(SharedMemory, name, create=False)


def _open(cls: type[SharedMemory], name: str, *, create: bool, size: int = 0) -> SharedMemory:
    """``cls(name, create, size)`` kept out of the resource tracker (see the module docstring)."""
    if _HAS_TRACK_ARG:
        return cls(name=name, create=create, size=size, track=False)
    shm = cls(name=name, create=create, size=size)
    # SharedMemory.__init__ registered the name (with its leading slash) just now.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _restrict_and_reserve(name: str, size: int) -> None:
    """Make ``name`` mode 0600 and reserve its pages (``posix_fallocate``)."""
    fd = os.open(os.path.join(_DEV_SHM, name), os.O_RDWR)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode != _MODE:
            logger.info("shared memory %s had mode %o, setting %o", name, mode, _MODE)
            os.fchmod(fd, _MODE)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            raise OSError(
                err.errno,
                f"shared memory {name}: cannot reserve {size} bytes in {_DEV_SHM} "
                f"({os.strerror(err.errno)}); enlarge it (e.g. docker --shm-size)",
            ) from err
    finally:
        os.close(fd)


def unlink_if_present(name: str) -> None:
    """Unlink segment ``name`` if it still exists: the owner's finalizer, and the clean-up of a
    segment whose owner process died (a data-parallel rank)."""
    try:
        _posixshmem.shm_unlink("/" + name)
        logger.debug("unlinked shared memory %s", name)
    except FileNotFoundError:
        logger.debug("shared memory %s was already unlinked", name)


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"name: expected 1-200 characters of [A-Za-z0-9._-], got {name!r}")


@contextlib.contextmanager
def _file_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600 if absent) for the block."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
