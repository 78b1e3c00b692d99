"""The header at the start of every segment ``rollout.capture.shm.create`` makes: what marks a
file in ``/dev/shm`` as one of ours, the pid of the process that created it, and its array's
shape and dtype (a reader checks them: a store of another shape with the same byte size is refused).

Layout (little-endian, in the first ``HEADER_BYTES`` = 4096 bytes, so the array that follows
is page-aligned): 8 magic bytes (format version included), the owner's pid (int64), the
array's bytes (uint64), the dtype's ``numpy.dtype.str`` (16 bytes, NUL-padded), ndim (uint8),
then ``MAX_DIMS`` uint64 dims (unused ones 0).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Sequence

import numpy as np

__all__ = ["HEADER_BYTES", "MAX_DIMS", "Header", "check_dtype", "check_shape", "read_header"]

MAGIC = b"RRSHM\x00\x01\x00"
MAX_DIMS = 8
HEADER_BYTES = 4096
_STRUCT = struct.Struct(f"<8sqQ16sB7x{MAX_DIMS}Q")


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """A segment's header: the creating process and the array it holds."""

    owner_pid: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def pack(self) -> bytes:
        dims = (*self.shape, *[0] * (MAX_DIMS - len(self.shape)))
        dtype = self.dtype.str.encode()
        return _STRUCT.pack(MAGIC, self.owner_pid, self.nbytes, dtype, len(self.shape), *dims)

    @classmethod
    def unpack(cls, raw: bytes) -> Header | None:
        """The header in ``raw``, or None when it is not one of ours."""
        if len(raw) < _STRUCT.size:
            return None
        magic, pid, nbytes, dtype, ndim, *dims = _STRUCT.unpack_from(raw)
        if magic != MAGIC or ndim > MAX_DIMS:
            return None
        try:
            header = cls(pid, tuple(dims[:ndim]), np.dtype(dtype.rstrip(b"\0").decode()))
        except (TypeError, UnicodeDecodeError):
            return None
        return header if header.nbytes == nbytes else None


def read_header(fd: int) -> Header | None:
    """The header of the open file ``fd``, or None when it has none of ours."""
    return Header.unpack(os.pread(fd, _STRUCT.size, 0))


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; ValueError unless it has 1 to ``MAX_DIMS`` dims >= 1."""
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if (
        dims is None
        or not 1 <= len(dims) <= MAX_DIMS
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims)
    ):
        raise ValueError(f"shape: expected 1 to {MAX_DIMS} ints >= 1, got {shape!r}")
    return tuple(int(d) for d in dims)


def check_dtype(dtype: object) -> np.dtype:
    """``dtype`` as a numpy dtype; ValueError unless it is a numeric one."""
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype: expected a numpy dtype, got {dtype!r}") from err
    if resolved.kind not in "biufc":
        raise ValueError(f"dtype: expected a numeric numpy dtype, got {dtype!r}")
    return resolved
