"""The routing trace of one sequence: which experts each MoE layer chose for each token.

Conventions (DESIGN.md): row ``t`` is the routing of the forward pass that consumed token
``start + t``; the layer axis holds MoE layers only, in model order (``moe_layers`` are their
global decoder-layer indices); ids are logical expert ids, distinct within a row, stored in the
compact dtype of ``compact_dtype(num_experts)``; an optional per-row ``valid`` mask marks rows
that replay must route natively.

Legend: R = rows (tokens), L = MoE layers, H = all decoder layers, K = top_k.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from routing_kernels.expert_ids import numpy_id_dtype

if TYPE_CHECKING:
    import torch

# Bumped whenever the .npz layout written by ``RoutedExperts.save`` changes.
_FORMAT_VERSION = 1
_REQUIRED_KEYS = frozenset({"format_version", "ids", "moe_layers", "num_experts", "start"})
_NPZ_KEYS = _REQUIRED_KEYS | {"valid"}
# What zipfile, zlib and numpy's .npy parser raise on truncated or corrupted bytes (measured by
# flipping every byte of a saved trace and truncating it at every length: tests/reliability).
_CORRUPT_FILE_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # a flipped compression-method field
    RuntimeError,  # a flipped encryption flag
    KeyError,
    struct.error,
    OverflowError,
    MemoryError,  # a corrupted .npy header declaring an absurd shape
)
# The zip end-of-central-directory record, at the very end of a file without an archive
# comment (``save`` writes none): signature, disk numbers, member counts, directory size and
# offset, comment length.
_END_RECORD = struct.Struct("<4s4H2LH")


def compact_dtype(num_experts: int) -> np.dtype:
    """The smallest id dtype of DESIGN.md for ``num_experts`` experts.

    ``uint8`` up to 256 experts, ``int16`` up to 32768, else ``int32``.
    """
    return numpy_id_dtype(_check_int("num_experts", num_experts, minimum=1))


class RoutedExperts:
    """An immutable routing trace: ids ``[rows, num_moe_layers, top_k]`` plus its spec.

    Construct with ``RoutedExperts(ids, moe_layers, num_experts, start=0, valid=None)``.
    The inputs are validated and copied; the stored arrays are views of immutable ``bytes``, so
    they cannot be written nor flagged writable again: a trace never changes after
    construction (replay trusts a validated trace's ids). Every bad input raises ValueError
    (TypeError for a wrong Python type) naming the field, the expected and the actual value.

    Args:
        ids: integer array-like ``[rows, len(moe_layers), top_k]`` of logical expert ids in
            ``[0, num_experts)``, distinct within each (row, layer).
        moe_layers: global decoder-layer indices of the MoE layers, strictly increasing.
        num_experts: routed experts per MoE layer.
        start: token index of row 0 (non-zero for continuations of a sequence).
        valid: optional bool ``[rows]``; False marks a row whose routing is unknown.
    """

    __slots__ = ("_ids_RLK", "_moe_layers", "_num_experts", "_start", "_valid_R")

    def __init__(
        self,
        ids: npt.ArrayLike,
        moe_layers: Sequence[int],
        num_experts: int,
        start: int = 0,
        valid: npt.ArrayLike | None = None,
    ) -> None:
        self._num_experts = _check_int("num_experts", num_experts, minimum=1)
        self._start = _check_int("start", start, minimum=0)
        self._moe_layers = _check_moe_layers(moe_layers)
        self._ids_RLK = _check_ids(ids, self._moe_layers, self._num_experts)
        self._valid_R = None if valid is None else _check_valid(valid, self._ids_RLK.shape[0])

    # ------------------------------------------------------------------ properties

    @property
    def ids(self) -> np.ndarray:
        """Read-only ids ``[rows, num_moe_layers, top_k]`` in ``compact_dtype(num_experts)``."""
        return self._ids_RLK

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global decoder-layer indices of the MoE layers, strictly increasing."""
        return self._moe_layers

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer; every id is in ``[0, num_experts)``."""
        return self._num_experts

    @property
    def start(self) -> int:
        """Token index that row 0 belongs to."""
        return self._start

    @property
    def valid(self) -> np.ndarray | None:
        """Read-only bool ``[rows]`` (False: routing unknown, replay routes natively), or None."""
        return self._valid_R

    @property
    def top_k(self) -> int:
        """Experts chosen per (row, layer)."""
        return int(self._ids_RLK.shape[2])

    @property
    def num_rows(self) -> int:
        """Number of rows (tokens fed forward)."""
        return int(self._ids_RLK.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    # ------------------------------------------------------------------ value semantics

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutedExperts):
            return NotImplemented
        if (self._moe_layers, self._num_experts, self._start) != (
            other._moe_layers,
            other._num_experts,
            other._start,
        ):
            return False
        if not np.array_equal(self._ids_RLK, other._ids_RLK):
            return False
        if self._valid_R is None or other._valid_R is None:
            return self._valid_R is None and other._valid_R is None
        return np.array_equal(self._valid_R, other._valid_R)

    # Equality is by value over mutable-looking arrays, as for numpy arrays: not hashable.
    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Pickle (Ray, copy.deepcopy) rebuilds numpy arrays writable; ship the bytes instead so
        # the copy's arrays are read-only views again. The contents were validated when built.
        valid = None if self._valid_R is None else self._valid_R.tobytes()
        return (
            _restore,
            (
                self._ids_RLK.tobytes(),
                self._ids_RLK.shape,
                self._moe_layers,
                self._num_experts,
                self._start,
                valid,
            ),
        )

    def __repr__(self) -> str:
        layers = self._moe_layers
        layer_text = f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
        valid_text = (
            "" if self._valid_R is None else f", valid={int(self._valid_R.sum())}/{self.num_rows}"
        )
        return (
            f"RoutedExperts(rows={self.num_rows}, moe_layers={len(layers)} [{layer_text}], "
            f"top_k={self.top_k}, num_experts={self._num_experts}, start={self._start}"
            f"{valid_text})"
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace to ``path`` as a compressed .npz (exactly that path, no suffix added)."""
        arrays: dict[str, np.ndarray] = {
            "format_version": np.int64(_FORMAT_VERSION),
            "ids": self._ids_RLK,
            "moe_layers": np.asarray(self._moe_layers, dtype=np.int64),
            "num_experts": np.int64(self._num_experts),
            "start": np.int64(self._start),
        }
        if self._valid_R is not None:
            arrays["valid"] = self._valid_R
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutedExperts:
        """Read a trace written by ``save``; the contents are validated as on construction.

        A missing or unreadable file raises its OSError; a file that is not such a trace
        (truncated, corrupted, another format, unknown or missing keys, non-integer fields)
        raises ValueError naming ``path`` and what is wrong.
        """
        name = os.fspath(path)
        arrays = _read_npz(name)
        keys = set(arrays)
        if keys - _NPZ_KEYS:
            raise ValueError(
                f"{name}: expected keys from {sorted(_NPZ_KEYS)}, got unknown keys "
                f"{sorted(keys - _NPZ_KEYS)}"
            )
        if not _REQUIRED_KEYS <= keys:
            raise ValueError(
                f"{name}: expected keys {sorted(_REQUIRED_KEYS)}, "
                f"missing {sorted(_REQUIRED_KEYS - keys)}"
            )
        version = _stored_int(name, "format_version", arrays["format_version"])
        if version != _FORMAT_VERSION:
            raise ValueError(f"{name}: format_version: expected {_FORMAT_VERSION}, got {version}")
        moe_layers = arrays["moe_layers"]
        if moe_layers.ndim != 1 or not np.issubdtype(moe_layers.dtype, np.integer):
            raise ValueError(
                f"{name}: moe_layers: expected a 1-D integer array, got {moe_layers.dtype} "
                f"shape {moe_layers.shape}: {_preview(moe_layers)}"
            )
        num_experts = _stored_int(name, "num_experts", arrays["num_experts"])
        start = _stored_int(name, "start", arrays["start"])
        try:
            return cls(
                arrays["ids"],
                moe_layers.tolist(),
                num_experts,
                start=start,
                valid=arrays.get("valid"),
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err

    # ------------------------------------------------------------------ combination

    def extend(self, other: RoutedExperts) -> RoutedExperts:
        """Append a continuation of the same sequence (later turn, resumed rollout).

        ``other.start`` must equal ``self.start + self.num_rows`` and the spec (``moe_layers``,
        ``num_experts``, ``top_k``) must match. When either trace has a ``valid`` mask the
        result has one, a missing mask counting as all rows valid.
        """
        if not isinstance(other, RoutedExperts):
            raise TypeError(f"other: expected RoutedExperts, got {type(other).__name__}")
        for field in ("moe_layers", "num_experts", "top_k"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise ValueError(f"other.{field}: expected {mine} (as this trace), got {theirs}")
        expected_start = self._start + self.num_rows
        if other.start != expected_start:
            raise ValueError(
                f"other.start: expected {expected_start} (this trace's start {self._start} + "
                f"{self.num_rows} rows), got {other.start}"
            )
        valid = None
        if self._valid_R is not None or other._valid_R is not None:
            valid = np.concatenate([self._valid_or_ones(), other._valid_or_ones()])
        return RoutedExperts(
            np.concatenate([self._ids_RLK, other._ids_RLK]),
            self._moe_layers,
            self._num_experts,
            start=self._start,
            valid=valid,
        )

    def _valid_or_ones(self) -> np.ndarray:
        if self._valid_R is None:
            return np.ones(self.num_rows, dtype=bool)
        return self._valid_R

    # ------------------------------------------------------------------ engine formats

    @classmethod
    def from_vllm(
        cls,
        payload: np.ndarray | str | bytes,
        *,
        moe_layers: Sequence[int],
        num_experts: int,
        start: int = 0,
    ) -> RoutedExperts:
        """Wrap vLLM's routed experts: an array ``(N-1, num_hidden_layers, k)`` or the base64 text
        (str or ASCII bytes) of its ``np.save`` bytes.

        vLLM keeps a slot for every decoder layer; the dense ones are dropped here, keeping the
        ``moe_layers`` columns (all must be ``< num_hidden_layers``).
        """
        if isinstance(payload, (str, bytes)):
            raw = _b64decode("payload", payload)
            try:
                array_RHK = np.load(io.BytesIO(raw), allow_pickle=False)
            except (ValueError, EOFError, OSError) as err:
                raise ValueError(
                    f"payload: expected base64 of np.save bytes, could not load an array: {err}"
                ) from err
        elif isinstance(payload, np.ndarray):
            array_RHK = payload
        else:
            raise TypeError(
                f"payload: expected numpy.ndarray, str or bytes, got {type(payload).__name__}"
            )
        return cls._from_all_layers(array_RHK, moe_layers, num_experts, start)

    @classmethod
    def from_sglang(
        cls,
        payload: str | bytes,
        *,
        num_hidden_layers: int,
        top_k: int,
        moe_layers: Sequence[int],
        num_experts: int,
        start: int = 0,
        num_rows: int | None = None,
    ) -> RoutedExperts:
        """Wrap SGLang's ``meta_info["routed_experts"]``: base64 text (str or ASCII bytes) of
        flat little-endian int32, reshaped ``(-1, num_hidden_layers, top_k)``; the dense layers
        are dropped, keeping the ``moe_layers`` columns.

        ``num_rows`` (optional, recommended) is the number of rows the payload must hold (the
        tokens fed forward for the request). The wire format carries no dtype nor row count,
        so only with it is a payload of another element size caught: int64 ids of ``n`` rows
        are ``8 n H K`` bytes, which without ``num_rows`` would read as ``2 n`` rows of int32.
        With it the byte length must be exactly ``4 * num_rows * num_hidden_layers * top_k``.
        """
        if not isinstance(payload, (str, bytes)):
            raise TypeError(f"payload: expected str or bytes, got {type(payload).__name__}")
        num_hidden_layers = _check_int("num_hidden_layers", num_hidden_layers, minimum=1)
        top_k = _check_int("top_k", top_k, minimum=1)
        raw = _b64decode("payload", payload)
        row_bytes = 4 * num_hidden_layers * top_k
        if num_rows is not None:
            num_rows = _check_int("num_rows", num_rows, minimum=0)
            if len(raw) != num_rows * row_bytes:
                per_id = len(raw) / (num_rows * num_hidden_layers * top_k) if num_rows else None
                hint = "" if per_id is None else f", {per_id:g} bytes per id where int32 has 4"
                raise ValueError(
                    f"payload: expected {num_rows * row_bytes} bytes (int32 x num_rows "
                    f"{num_rows} x num_hidden_layers {num_hidden_layers} x top_k {top_k}), got "
                    f"{len(raw)} bytes{hint}"
                )
        if len(raw) % row_bytes:
            raise ValueError(
                f"payload: expected a multiple of {row_bytes} bytes (int32 x num_hidden_layers "
                f"{num_hidden_layers} x top_k {top_k}), got {len(raw)} bytes"
            )
        array_RHK = np.frombuffer(raw, dtype="<i4").reshape(-1, num_hidden_layers, top_k)
        return cls._from_all_layers(array_RHK, moe_layers, num_experts, start)

    @classmethod
    def _from_all_layers(
        cls,
        array_RHK: np.ndarray,
        moe_layers: Sequence[int],
        num_experts: int,
        start: int,
    ) -> RoutedExperts:
        """Keep the ``moe_layers`` columns of an array holding every decoder layer."""
        if array_RHK.ndim != 3:
            raise ValueError(
                f"payload: expected a 3-D array (rows, num_hidden_layers, top_k), "
                f"got shape {array_RHK.shape}"
            )
        layers = _check_moe_layers(moe_layers)
        num_hidden_layers = array_RHK.shape[1]
        if layers[-1] >= num_hidden_layers:
            raise ValueError(
                f"moe_layers: expected indices < num_hidden_layers {num_hidden_layers} "
                f"(payload shape {array_RHK.shape}), got {layers[-1]}"
            )
        return cls(array_RHK[:, list(layers), :], layers, num_experts, start=start)

    # ------------------------------------------------------------------ trainer

    def to_torch(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The ids as a new ``torch.int64`` tensor ``[rows, num_moe_layers, top_k]`` on ``device``.

        int64 because trainer code indexes and scatters with them.
        """
        import torch

        return torch.from_numpy(self._ids_RLK.astype(np.int64)).to(device)


# ---------------------------------------------------------------------- validation


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return int(value)


def _check_moe_layers(moe_layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Iterable):
        raise TypeError(f"moe_layers: expected a sequence of ints, got {type(moe_layers).__name__}")
    layers = tuple(
        _check_int(f"moe_layers[{i}]", layer, minimum=0) for i, layer in enumerate(moe_layers)
    )
    if not layers:
        raise ValueError("moe_layers: expected at least one MoE layer, got none")
    for i in range(1, len(layers)):
        if layers[i] <= layers[i - 1]:
            raise ValueError(
                f"moe_layers: expected strictly increasing indices, got {layers[i]} after "
                f"{layers[i - 1]} at position {i}"
            )
    return layers


def _check_ids(ids: npt.ArrayLike, moe_layers: tuple[int, ...], num_experts: int) -> np.ndarray:
    num_layers = len(moe_layers)
    array = np.asarray(ids)
    if array.ndim != 3:
        raise ValueError(
            f"ids: expected a 3-D array [rows, num_moe_layers, top_k], got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids: expected an integer dtype, got {array.dtype}")
    rows, width, top_k = array.shape
    if width != num_layers:
        raise ValueError(
            f"ids: expected shape[1] == len(moe_layers) == {num_layers}, got {width} "
            f"(shape {array.shape})"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"ids: expected top_k (shape[2]) in [1, {num_experts}], got {top_k}")
    if rows:
        bad_RLK = (array < 0) | (array >= num_experts)
        if bad_RLK.any():
            row, layer, slot = (int(i) for i in np.argwhere(bad_RLK)[0])  # layer: axis index
            raise ValueError(
                f"ids: expected values in [0, {num_experts}), got {array[row, layer, slot]} "
                f"at (row {row}, layer {moe_layers[layer]}); min {array.min()}, max {array.max()}"
            )
        sorted_RLK = np.sort(array, axis=2)
        dup_RLK = sorted_RLK[:, :, 1:] == sorted_RLK[:, :, :-1]
        if dup_RLK.any():
            row, layer, slot = (int(i) for i in np.argwhere(dup_RLK)[0])
            raise ValueError(
                f"ids: expected distinct ids within each (row, layer), got "
                f"{sorted_RLK[row, layer, slot]} twice at (row {row}, layer {moe_layers[layer]}): "
                f"{array[row, layer].tolist()}"
            )
    return _immutable(array.astype(compact_dtype(num_experts), copy=False))


def _check_valid(valid: npt.ArrayLike, rows: int) -> np.ndarray:
    array = np.asarray(valid)
    if array.dtype != np.bool_:
        raise ValueError(f"valid: expected dtype bool, got {array.dtype}")
    if array.shape != (rows,):
        raise ValueError(f"valid: expected shape ({rows},) (one per row), got {array.shape}")
    return _immutable(array)


def _immutable(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` viewing an immutable ``bytes`` object: read-only, and (unlike a
    ``setflags(write=False)`` array) impossible to flag writable again; later writes to the
    caller's array cannot reach it."""
    return np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)


def _restore(
    ids: bytes,
    shape: tuple[int, int, int],
    moe_layers: tuple[int, ...],
    num_experts: int,
    start: int,
    valid: bytes | None,
) -> RoutedExperts:
    """Unpickle a trace (see ``RoutedExperts.__reduce__``): views of the pickled bytes."""
    trace = RoutedExperts.__new__(RoutedExperts)
    trace._ids_RLK = np.frombuffer(ids, dtype=compact_dtype(num_experts)).reshape(shape)
    trace._moe_layers, trace._num_experts, trace._start = moe_layers, num_experts, start
    trace._valid_R = None if valid is None else np.frombuffer(valid, dtype=np.bool_)
    return trace


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of the .npz at ``path`` by key; ValueError naming ``path`` if the bytes are
    not an intact .npz of plain arrays."""
    with open(path, "rb") as file:  # a missing or unreadable file raises its own OSError
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise ValueError(
                f"{path}: expected a trace .npz (RoutedExperts.save), got an empty file"
            )
        try:
            with zipfile.ZipFile(file) as archive:
                members = archive.namelist()
                # zipfile stops at a corrupted directory entry without a word, so a flipped
                # byte there would silently drop ``valid``: count against the end record.
                file.seek(size - _END_RECORD.size)
                signature, *_, declared, _, _, _ = _END_RECORD.unpack(file.read())
                if signature != b"PK\x05\x06" or declared != len(members):
                    raise zipfile.BadZipFile(
                        f"the archive's end record declares {declared} members, its directory "
                        f"lists {len(members)}"
                    )
                # archive.read checks each member's CRC before numpy parses a byte of it.
                return {
                    name.removesuffix(".npy"): np.lib.format.read_array(
                        io.BytesIO(archive.read(name)), allow_pickle=False
                    )
                    for name in members
                }
        except _CORRUPT_FILE_ERRORS as err:
            raise ValueError(
                f"{path}: expected a trace .npz (RoutedExperts.save), could not read it: "
                f"{type(err).__name__}: {err}"
            ) from err


def _stored_int(path: str, key: str, array: np.ndarray) -> int:
    """An integer scalar of a loaded .npz (``int()`` would truncate 8.9 to 8)."""
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{path}: {key}: expected an integer scalar, got {array.dtype} shape {array.shape}: "
            f"{_preview(array)}"
        )
    return int(array)


def _preview(array: np.ndarray) -> str:
    return repr(array.ravel()[:8].tolist()) if array.ndim else repr(array.item())


def _b64decode(name: str, text: str | bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{name}: expected base64 text, could not decode: {err}") from err
