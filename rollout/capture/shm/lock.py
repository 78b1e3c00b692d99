"""The lock file that serializes ``rollout.capture.shm.create`` and its orphan sweep among one
user's processes: in a directory only that user can write, opened without following a symbolic link,
locked with a timeout.

Why not the temp directory itself: it is world-writable, so another user could create the file
first and hold its lock (our ``create`` would wait forever) or plant a symbolic link there that
makes us create a file at the link's target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator

__all__ = ["default_lock_path", "file_lock"]

_LOCK_FILE = "routing-replay-shm.lock"
_DIR_PREFIX = "routing-replay"
_MODE = 0o600


def default_lock_path() -> str:
    """The lock file ``create`` callers share by default, in a directory only this user can
    write: ``$XDG_RUNTIME_DIR`` when it is a directory of ours without group or other
    permissions, else ``<tmp>/routing-replay-<uid>`` (created 0700 if absent). The file is
    never deleted: removing it while another process waits on it would break the exclusion.

    Raises:
        PermissionError: ``<tmp>/routing-replay-<uid>`` exists and is a symbolic link, not a
            directory, another user's, or open to group or others.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private_dir_problem(runtime) is None:
        return os.path.join(runtime, _LOCK_FILE)
    directory = os.path.join(tempfile.gettempdir(), f"{_DIR_PREFIX}-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    problem = _private_dir_problem(directory)
    if problem is not None:
        raise PermissionError(
            errno.EACCES,
            f"lock directory: expected a directory of uid {os.getuid()} without group or other "
            f"permissions, {directory} is {problem}; remove it",
        )
    return os.path.join(directory, _LOCK_FILE)


@contextlib.contextmanager
def file_lock(lock_path: str, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600 if absent, never through a
    symbolic link) for the block, waiting at most ``timeout_s``."""
    if not isinstance(lock_path, str):
        raise TypeError(f"lock_path: expected a str, got {type(lock_path).__name__}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s >= 0:
        raise ValueError(f"lock_timeout_s: expected a number >= 0, got {timeout_s!r}")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _MODE)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise OSError(
            errno.ELOOP, f"lock_path: expected a regular file, {lock_path} is a symbolic link"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise PermissionError(
                errno.EACCES,
                f"lock_path: expected a regular file of uid {os.getuid()}, {lock_path} has "
                f"mode {info.st_mode:o} and uid {info.st_uid}",
            )
        deadline, delay = time.monotonic() + timeout_s, 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"lock_path: could not lock {lock_path} within {timeout_s} s "
                        "(lock_timeout_s): another process holds it"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _private_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a directory only this user can write, or None."""
    try:
        info = os.lstat(path)
    except OSError as err:
        return f"not usable ({err.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid}"
    if info.st_mode & 0o077:
        return f"mode {info.st_mode & 0o777:o}"
    return None
