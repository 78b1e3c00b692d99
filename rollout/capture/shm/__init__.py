"""POSIX shared-memory segments holding one array each: owned, attached, and reclaimed when their
owner is gone. Linux only (``/dev/shm``, ``flock``, ``O_TMPFILE``).

A segment is the file ``/dev/shm/<name>``: a 4096-byte header (magic, the creating process's
pid, the array's shape and dtype) followed by the array. It has one *owner*, the process that
made it with ``create`` (the engine process of one DP rank, which writes it), and any number of
*readers* (the front end, a trainer on the same node) that ``attach`` by name.

Lifetime rules, exactly:

- ``create`` builds the segment as an unnamed file (``O_TMPFILE``, mode 0600), takes an
  exclusive ``flock`` on it, reserves its pages (``posix_fallocate``: a full ``/dev/shm``
  fails here, with nothing left behind, instead of a SIGBUS on a later write), writes the
  header and only then links it under its name. A segment is therefore never seen half-built,
  and the owner's ``flock`` is held for as long as the owner process (or a child it forked)
  lives. The kernel drops it when the process dies, SIGKILL included: an unlocked segment is
  an orphan.
- ``create`` first reclaims orphans: every segment of this user whose name starts with
  ``routing-replay-`` and whose lock it can take is unlinked (``reclaim_orphans``). The lock
  is taken on the file itself, so a recycled pid cannot keep garbage alive and a live owner's
  segment is never reclaimed. Segments of earlier releases (no header, no lock) are reclaimed
  when the pid in their name (``new_instance_id``) no longer exists.
- A name held by a live owner cannot be created again: ``FileExistsError`` (two engines given
  one ``instance_id``). An orphan of that name is replaced by a fresh segment.
- The owner's ``OwnedSegment`` unlinks the segment when it is closed (``close()``, the end of a
  ``with`` block, exceptions included), garbage collected, or at interpreter exit, whichever
  comes first, and only in the process that created it: a forked child that drops its copy or
  exits leaves the parent's segment alone.
- SIGTERM: while SIGTERM has its default action (it would kill the process without running
  Python's exit handlers), ``create`` installs a handler that unlinks this process's segments,
  restores the default action and sends SIGTERM to the process again, so it dies exactly as it
  would have (same exit status), without leaving segments behind. A handler the application
  installed (before or after) is never replaced or wrapped: it decides what SIGTERM does, and
  the owner's usual clean-up runs if it exits. Nothing is installed outside the main thread.
  Caveat: Python runs the handler when the main thread next executes bytecode; a process
  blocked for good inside a C call then needs SIGKILL (its segments are reclaimed later).
- ``attach`` (a reader) maps an existing segment and checks its header. Neither it nor its
  process's exit ever unlinks anything; a reader killed while attached leaves the owner as
  it was.
- ``create`` and ``reclaim_orphans`` run under an exclusive ``flock`` on a lock file in a
  directory only this user can write (``default_lock_path``), opened without following a
  symbolic link, waiting at most ``lock_timeout_s`` (``TimeoutError`` naming the file).

No ``multiprocessing.shared_memory`` and so no resource tracker: it would unlink a segment at
the exit of any process that attached it (CPython 3.11 / 3.12).
"""

from rollout.capture.shm.lock import default_lock_path
from rollout.capture.shm.segment import (
    DEFAULT_LOCK_TIMEOUT_S,
    SEGMENT_PREFIX,
    OwnedSegment,
    Segment,
    attach,
    create,
    new_instance_id,
    reclaim_orphans,
    segment_name,
    unlink_if_present,
)

__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "SEGMENT_PREFIX",
    "OwnedSegment",
    "Segment",
    "attach",
    "create",
    "default_lock_path",
    "new_instance_id",
    "reclaim_orphans",
    "segment_name",
    "unlink_if_present",
]
