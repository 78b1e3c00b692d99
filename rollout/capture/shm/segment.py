"""Segments: create, attach, unlink, the orphan sweep and the SIGTERM clean-up (the rules are in
``rollout.capture.shm``'s docstring, which also exports the public names)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import signal
import stat
import threading
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import Self

import numpy as np

from rollout.capture.shm.header import HEADER_BYTES, Header, check_dtype, check_shape, read_header
from rollout.capture.shm.lock import default_lock_path, file_lock

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "routing-replay"
DEFAULT_LOCK_TIMEOUT_S = 30.0
_DEV_SHM = "/dev/shm"
_MODE = 0o600
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
# Segments of releases before the header: "routing-replay-<pid>-<12 hex>-dp<rank>".
_LEGACY_NAME_RE = re.compile(re.escape(SEGMENT_PREFIX) + r"-(\d+)-[0-9a-f]{12}-dp\d+")

# Segments this process created and has not released: name -> (creating pid, inode). What the
# SIGTERM handler unlinks; process-wide because a signal is.
_OWNED: dict[str, tuple[int, int]] = {}


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


class Segment:
    """A mapping of one segment: what ``attach`` returns, and the base of ``OwnedSegment``.

    Attributes:
        name: the segment's name (the file ``/dev/shm/<name>``).
        shape, dtype: the array's, from the header.
        owner_pid: the pid of the process that created the segment.
        array: the array [shape] of ``dtype`` over the shared memory (None after ``close``).
    """

    def __init__(self, name: str, fd: int, header: Header) -> None:
        self.name = name
        self.shape = header.shape
        self.dtype = header.dtype
        self.owner_pid = header.owner_pid
        self._mmap: mmap.mmap | None = mmap.mmap(fd, HEADER_BYTES + header.nbytes)
        # frombuffer keeps an export of the mapping alive (np.ndarray(buffer=...) does not), so
        # unmapping under a live view raises BufferError instead of leaving it dangling.
        count = math.prod(header.shape)
        self.array: np.ndarray | None = np.frombuffer(
            self._mmap, header.dtype, count, HEADER_BYTES
        ).reshape(header.shape)

    @property
    def nbytes(self) -> int:
        """The array's size in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def close(self) -> None:
        """Unmap (idempotent). Raises BufferError while views of ``array`` are alive."""
        self.array = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> object:
        raise TypeError(
            f"{type(self).__name__}: cannot be pickled; attach to {self.name!r} with "
            "rollout.capture.shm.attach in the other process"
        )


class OwnedSegment(Segment):
    """The owner's handle (made by ``create``): ``close()``, leaving a ``with`` block, garbage
    collection and interpreter exit unlink the segment, once, in the creating process only.
    Holds the segment's ``flock`` (the mark of a live owner) until then."""

    def __init__(self, name: str, fd: int, header: Header, inode: int) -> None:
        super().__init__(name, fd, header)
        _OWNED[name] = (os.getpid(), inode)
        # Must not reference self, or the handle would never be collected.
        self._finalizer = weakref.finalize(self, _release, name, fd, os.getpid(), inode)

    def close(self) -> None:
        """Unlink the segment (creating process only, once) and release its lock, then unmap
        (BufferError while views of ``array`` are alive: drop them first)."""
        self.unlink()
        super().close()

    def unlink(self) -> None:
        """Unlink the segment if this handle has not done so yet; readers keep their mappings."""
        self._finalizer()


def create(
    name: str,
    shape: Sequence[int],
    dtype: object,
    *,
    lock_path: str | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> OwnedSegment:
    """Create the segment ``name`` holding a zero-filled array of ``shape`` and ``dtype``.

    Under the lock ``lock_path`` (None: ``default_lock_path()``): reclaim orphans, then build
    the segment and publish it under ``name`` (see the module docstring). The caller is the
    owner.

    Raises:
        TypeError / ValueError: a bad ``name``, ``shape`` (1 to 8 dims, each >= 1), ``dtype``,
            ``lock_path`` or ``lock_timeout_s``.
        FileExistsError: a live process owns a segment of that name.
        OSError: ``/dev/shm`` cannot hold the segment (ENOSPC, naming its size and the free
            space; nothing is left behind); the lock file is a symbolic link or not ours.
        TimeoutError: the lock was not free within ``lock_timeout_s``.
    """
    _check_name(name)
    header = Header(os.getpid(), check_shape(shape), check_dtype(dtype))
    _install_sigterm_cleanup()
    with file_lock(default_lock_path() if lock_path is None else lock_path, lock_timeout_s):
        _reclaim_orphans_locked()
        fd = _build_unnamed(name, header)
        try:
            inode = os.fstat(fd).st_ino
            _publish(fd, name)
            try:
                segment = OwnedSegment(name, fd, header, inode)
            except BaseException:
                _unlink_if_same(name, inode)
                raise
        except BaseException:
            os.close(fd)  # an unnamed file vanishes with its last descriptor
            raise
    logger.debug("created shared memory %s (%s %s)", name, header.dtype.name, header.shape)
    return segment


def attach(name: str) -> Segment:
    """Map the existing segment ``name`` as a reader (read-write mapping). Never unlinks it;
    ``close()`` unmaps.

    Raises:
        FileNotFoundError: no segment of that name.
        PermissionError: the segment belongs to another user.
        ValueError: the file is not a segment made by ``create`` (no valid header, or a size
            that does not match it).
    """
    _check_name(name)
    fd = _open_segment(name)
    try:
        size = os.fstat(fd).st_size
        header = read_header(fd)
        if header is None or size != HEADER_BYTES + header.nbytes:
            raise ValueError(
                f"name: expected a segment made by rollout.capture.shm.create, {_DEV_SHM}/{name} "
                f"has {'no valid header' if header is None else 'another size than its header'} "
                f"({size} bytes)"
            )
        return Segment(name, fd, header)
    finally:
        os.close(fd)


def reclaim_orphans(
    *, lock_path: str | None = None, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> list[str]:
    """Unlink this user's ``routing-replay-*`` segments whose owner process is gone (``create``
    does this first); return their names."""
    with file_lock(default_lock_path() if lock_path is None else lock_path, lock_timeout_s):
        return _reclaim_orphans_locked()


def unlink_if_present(name: str) -> None:
    """Unlink segment ``name`` if it still exists, whoever owns it: for a caller that knows its
    owner died (a data-parallel front end cleaning up after a rank)."""
    _check_name(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_DEV_SHM, name))
        logger.debug("unlinked shared memory %s", name)


# ------------------------------------------------------------------------------- internals


def _build_unnamed(name: str, header: Header) -> int:
    """An unnamed, locked, fully reserved file in ``/dev/shm`` holding ``header``; its fd."""
    fd = os.open(_DEV_SHM, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, _MODE)
    try:
        os.fchmod(fd, _MODE)  # whatever the umask
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know this file yet
        size = HEADER_BYTES + header.nbytes
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            vfs = os.statvfs(_DEV_SHM)
            raise OSError(
                err.errno,
                f"shared memory {name}: cannot reserve {size} bytes in {_DEV_SHM} "
                f"({os.strerror(err.errno)}; {vfs.f_bavail * vfs.f_frsize} bytes free of "
                f"{vfs.f_blocks * vfs.f_frsize}); enlarge it (e.g. docker --shm-size)",
            ) from err
        os.pwrite(fd, header.pack(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _publish(fd: int, name: str) -> None:
    """Link the unnamed file ``fd`` as ``name``, replacing an orphan of that name."""
    path = os.path.join(_DEV_SHM, name)
    for _ in range(3):
        try:
            # A dst_dir_fd makes os.link use linkat(AT_SYMLINK_FOLLOW), which /proc/self/fd needs.
            with _dir_fd(_DEV_SHM) as dir_fd:
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
            return
        except FileExistsError:
            if not _reclaim_if_orphaned(name):
                owner = _read_owner(name)
                raise FileExistsError(
                    errno.EEXIST,
                    f"shared memory {name}: in use by a live owner (pid {owner}); two engines "
                    "or stores cannot share one segment name: give them distinct instance_id",
                    path,
                ) from None
    raise FileExistsError(errno.EEXIST, f"shared memory {name}: recreated under us", path)


def _reclaim_orphans_locked() -> list[str]:
    reclaimed = []
    for entry in os.scandir(_DEV_SHM):
        if entry.name.startswith(SEGMENT_PREFIX + "-") and _reclaim_if_orphaned(entry.name):
            reclaimed.append(entry.name)
    if reclaimed:
        logger.info("reclaimed %d orphaned shared memory segments: %s", len(reclaimed), reclaimed)
    return reclaimed


def _reclaim_if_orphaned(name: str) -> bool:
    """Unlink ``name`` if it is this user's and no live process owns it; whether it did."""
    try:
        fd = _open_segment(name)
    except (FileNotFoundError, PermissionError, ValueError):
        return False  # gone, another user's, or not a regular file
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            return False
        if read_header(fd) is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live owner holds it
        else:
            legacy = _LEGACY_NAME_RE.fullmatch(name)
            if legacy is None or _pid_alive(int(legacy.group(1))):
                return False
        # Every unlinker of ours holds the file's lock first, so the name cannot move now;
        # the inode check is against a name that was replaced between the scan and the open.
        return _unlink_if_same(name, info.st_ino)
    finally:
        os.close(fd)


def _unlink_if_same(name: str, inode: int) -> bool:
    path = os.path.join(_DEV_SHM, name)
    try:
        if os.stat(path, follow_symlinks=False).st_ino != inode:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    logger.debug("unlinked shared memory %s", name)
    return True


def _release(name: str, fd: int, creator_pid: int, inode: int) -> None:
    """The owner's finalizer: unlink (in the creating process only), then drop the lock by
    closing the descriptor (never ``LOCK_UN``: a forked child shares the parent's lock)."""
    if os.getpid() == creator_pid:
        _unlink_if_same(name, inode)
        _OWNED.pop(name, None)
    os.close(fd)


def _install_sigterm_cleanup() -> None:
    """Take over SIGTERM's default action only (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _unlink_owned_then_terminate)


def _unlink_owned_then_terminate(signum: int, frame: object) -> None:
    for name, (pid, inode) in list(_OWNED.items()):
        if pid == os.getpid():
            _unlink_if_same(name, inode)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _open_segment(name: str) -> int:
    """``/dev/shm/<name>`` opened read-write without following a link; ValueError if it is not
    a regular file."""
    path = os.path.join(_DEV_SHM, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise ValueError(f"name: expected a regular file, {path} is a symbolic link") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"name: expected a regular file, {_DEV_SHM}/{name} is not one")
    return fd


def _read_owner(name: str) -> int | str:
    try:
        fd = _open_segment(name)
    except (OSError, ValueError):
        return "unknown"
    try:
        header = read_header(fd)
    finally:
        os.close(fd)
    return "unknown" if header is None else header.owner_pid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def _dir_fd(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"name: expected 1-200 characters of [A-Za-z0-9._-], got {name!r}")
