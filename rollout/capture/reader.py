"""Reading routed-expert rows out of a routing store's shared-memory segment, from any process.

Legend: S KV slots (rows of the store), R rows read, L MoE layers, K top_k.

The store (``rollout.capture.RoutingStore``, one per DP rank, owned by the engine) is a host
array ``[S, L, K]`` indexed by KV slot. ``RoutingStore.reader_spec()`` gives the plain data a
``RoutedExpertsReader`` needs to attach to it by name, in the same process or another one on
the same node (front end, trainer). A reader never unlinks the segment.

Rows of a slot are those of the last step that wrote it: a reader must read a request's rows
after the engine committed the step that computed them and before the engine reuses their KV
blocks (the engine's output path does exactly that; a trainer reading directly needs the
engine to tell it when).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Self

import numpy as np
import numpy.typing as npt
import torch

from rollout.capture import shm

__all__ = ["ReaderSpec", "RoutedExpertsReader", "gather_rows", "id_dtype_name"]

_ID_DTYPES = ("uint8", "int16", "int32")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class ReaderSpec:
    """What a reader needs to attach to a store: plain data, picklable.

    Attributes:
        name: the shared-memory segment's name.
        num_kv_slots, num_moe_layers, top_k: the store's shape ``[S, L, K]``, each >= 1.
        dtype: the id dtype's name: "uint8", "int16" or "int32" (a numpy or torch dtype is
            accepted and stored by name).
    """

    name: str
    num_kv_slots: int
    num_moe_layers: int
    top_k: int
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        if not self.name:
            raise ValueError("name: expected a non-empty segment name, got ''")
        for field in ("num_kv_slots", "num_moe_layers", "top_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{field}: expected an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{field}: expected >= 1, got {value}")
            object.__setattr__(self, field, int(value))
        object.__setattr__(self, "dtype", id_dtype_name(self.dtype))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_kv_slots, num_moe_layers, top_k)``."""
        return (self.num_kv_slots, self.num_moe_layers, self.top_k)

    @property
    def nbytes(self) -> int:
        """Size of the store's array (and of its segment) in bytes."""
        return self.num_kv_slots * self.num_moe_layers * self.top_k * np.dtype(self.dtype).itemsize


class RoutedExpertsReader:
    """A read handle on one routing store, attached by segment name.

    Args:
        name: the store's segment name (``ReaderSpec.name``).
        num_kv_slots, num_moe_layers, top_k, dtype: the store's shape and id dtype, as in
            ``ReaderSpec`` (use ``RoutedExpertsReader.from_spec``).

    Raises:
        FileNotFoundError: no segment of that name.
        ValueError: the segment holds another shape or dtype (a different store), or is not
            a routing store's segment at all.
    """

    def __init__(
        self,
        name: str,
        num_kv_slots: int,
        num_moe_layers: int,
        top_k: int,
        dtype: object,
    ) -> None:
        self.spec = ReaderSpec(
            name=name,
            num_kv_slots=num_kv_slots,
            num_moe_layers=num_moe_layers,
            top_k=top_k,
            dtype=dtype,
        )
        self._segment = shm.attach(name)
        if self._segment.shape != self.spec.shape or self._segment.dtype != self.spec.dtype:
            got = (self._segment.shape, self._segment.dtype.name)
            self._segment.close()
            raise ValueError(
                f"name: expected segment {name!r} to hold a store of shape {self.spec.shape} "
                f"(num_kv_slots, num_moe_layers, top_k) {self.spec.dtype}, got shape {got[0]} "
                f"{got[1]}"
            )
        self._rows_SLK: np.ndarray | None = self._segment.array

    @classmethod
    def from_spec(cls, spec: ReaderSpec) -> RoutedExpertsReader:
        """Attach to the store described by ``spec`` (from ``RoutingStore.reader_spec()``)."""
        if not isinstance(spec, ReaderSpec):
            raise TypeError(f"spec: expected a ReaderSpec, got {type(spec).__name__}")
        return cls(spec.name, spec.num_kv_slots, spec.num_moe_layers, spec.top_k, spec.dtype)

    def read(self, slots: npt.ArrayLike) -> np.ndarray:
        """The rows ``[len(slots), L, K]`` stored at ``slots`` (a copy), in the given order.

        Raises:
            RuntimeError: the reader is closed.
            ValueError: ``slots`` not a 1-D integer sequence of values in [0, num_kv_slots).
        """
        if self._rows_SLK is None:
            raise RuntimeError(f"RoutedExpertsReader({self.spec.name!r}): read after close()")
        return gather_rows(self._rows_SLK, slots)

    def close(self) -> None:
        """Unmap the segment (idempotent). Never unlinks it: the store's owner does that."""
        if self._rows_SLK is None:
            return
        self._rows_SLK = None
        self._segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Drop the array before the mapping (unmapping under a live view raises BufferError);
        # skipped when __init__ failed before the attributes existed.
        if getattr(self, "_rows_SLK", None) is not None:
            self.close()


def gather_rows(
    rows_SLK: np.ndarray, slots: npt.ArrayLike, out: np.ndarray | None = None
) -> np.ndarray:
    """``rows_SLK[slots]`` [R, L, K] after checking ``slots``: into ``out`` when given (a
    C-contiguous array of that shape and dtype), else a new array. Returns it.

    Raises:
        ValueError: ``slots`` not 1-D, not integers, or a value outside [0, S) (``-1``
            included: a missing row is never filled in); ``out`` of another shape or dtype, or
            not C-contiguous.
    """
    slots_R = np.asarray(slots)
    if slots_R.ndim != 1:
        raise ValueError(f"slots: expected a 1-D sequence of KV slots, got shape {slots_R.shape}")
    shape = (slots_R.size, *rows_SLK.shape[1:])
    if out is None:
        out = np.empty(shape, dtype=rows_SLK.dtype)
    elif out.shape != shape or out.dtype != rows_SLK.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out: expected a C-contiguous {rows_SLK.dtype} array of shape {shape}, got "
            f"{out.dtype} {out.shape} (C-contiguous: {out.flags.c_contiguous})"
        )
    if slots_R.size == 0:
        return out
    if slots_R.dtype.kind not in "iu":
        raise ValueError(f"slots: expected integers, got dtype {slots_R.dtype}")
    num_slots = rows_SLK.shape[0]
    low, high = int(slots_R.min()), int(slots_R.max())
    if low < 0 or high >= num_slots:
        raise ValueError(
            f"slots: expected values in [0, {num_slots}) (num_kv_slots), got min {low} max {high}"
        )
    # np.take over [S, L*K] rows is about twice as fast as fancy indexing of [S, L, K]; the
    # slots are checked, and mode="raise" would buffer the result before copying it to out.
    flat_SX = rows_SLK.reshape(num_slots, -1)
    np.take(flat_SX, slots_R, axis=0, out=out.reshape(slots_R.size, -1), mode="clip")
    return out


def id_dtype_name(dtype: object) -> str:
    """The name ("uint8", "int16" or "int32") of a capture id dtype given as a numpy dtype, a
    torch dtype or a name.

    Raises:
        ValueError: any other dtype.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    try:
        name = np.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype: expected uint8, int16 or int32, got {dtype!r}") from err
    if name not in _ID_DTYPES:
        raise ValueError(f"dtype: expected uint8, int16 or int32, got {dtype!r}")
    return name
