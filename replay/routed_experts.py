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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from routing_kernels.expert_ids import numpy_id_dtype

if TYPE_CHECKING:
    import torch

# Bumped whenever the .npz layout written by ``RoutedExperts.save`` changes.
_FORMAT_VERSION = 1


def compact_dtype(num_experts: int) -> np.dtype:
    """The smallest id dtype of DESIGN.md for ``num_experts`` experts.

    ``uint8`` up to 256 experts, ``int16`` up to 32768, else ``int32``.
    """
    return numpy_id_dtype(_check_int("num_experts", num_experts, minimum=1))


class RoutedExperts:
    """An immutable routing trace: ids ``[rows, num_moe_layers, top_k]`` plus its spec.

    Construct with ``RoutedExperts(ids, moe_layers, num_experts, start=0, valid=None)``.
    The inputs are validated and copied; the stored arrays are read-only, so a trace never
    changes after construction. Every bad input raises ValueError (TypeError for a wrong
    Python type) naming the field, the expected and the actual value.

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
        """Read a trace written by ``save``; the contents are validated as on construction."""
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            required = {"format_version", "ids", "moe_layers", "num_experts", "start"}
            if not required <= keys:
                raise ValueError(
                    f"{os.fspath(path)}: expected keys {sorted(required)}, "
                    f"missing {sorted(required - keys)}"
                )
            version = int(data["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)}: format_version: expected {_FORMAT_VERSION}, got {version}"
                )
            return cls(
                data["ids"],
                [int(layer) for layer in data["moe_layers"]],
                int(data["num_experts"]),
                start=int(data["start"]),
                valid=data["valid"] if "valid" in keys else None,
            )

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
    ) -> RoutedExperts:
        """Wrap SGLang's ``meta_info["routed_experts"]``: base64 text (str or ASCII bytes) of
        flat little-endian int32, reshaped ``(-1, num_hidden_layers, top_k)``; the dense layers
        are dropped, keeping the ``moe_layers`` columns.
        """
        if not isinstance(payload, (str, bytes)):
            raise TypeError(f"payload: expected str or bytes, got {type(payload).__name__}")
        num_hidden_layers = _check_int("num_hidden_layers", num_hidden_layers, minimum=1)
        top_k = _check_int("top_k", top_k, minimum=1)
        raw = _b64decode("payload", payload)
        row_bytes = 4 * num_hidden_layers * top_k
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
    # astype copies, so later writes to the caller's array cannot reach the trace.
    stored = array.astype(compact_dtype(num_experts), copy=True)
    stored.setflags(write=False)
    return stored


def _check_valid(valid: npt.ArrayLike, rows: int) -> np.ndarray:
    array = np.asarray(valid)
    if array.dtype != np.bool_:
        raise ValueError(f"valid: expected dtype bool, got {array.dtype}")
    if array.shape != (rows,):
        raise ValueError(f"valid: expected shape ({rows},) (one per row), got {array.shape}")
    stored = array.copy()
    stored.setflags(write=False)
    return stored


def _b64decode(name: str, text: str | bytes) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"{name}: expected base64 text, could not decode: {err}") from err
