"""The host routing store of one DP rank: rows by KV slot in shared memory, fed asynchronously
(holders 2 and 3 of the story in ``rollout.capture``).

Legend: T tokens of a step, S KV slots, L MoE layers, K top_k.

``RoutingStore`` owns a shared-memory segment holding ``rows_SLK`` [S, L, K]. The contract of
its three calls:

1. ``after_forward(capture_buffer, T, slot_mapping)`` right after the forward is launched:
   enqueues ``capture_buffer[:T]`` -> pinned staging behind everything on the current stream,
   on a side stream, and makes the current stream wait for that copy. No host synchronization.
   On CPU the copy is a plain synchronous copy.
2. ``commit()`` before the next ``after_forward`` (the staging buffer holds one step), and
   before a read that needs the pending rows: waits for the copy and scatters the rows into the
   store by slot; ``-1`` slots (padding) are skipped. A no-op without a pending copy.
3. ``read(slots)`` / ``RoutedExpertsReader.read(slots)``: rows as committed (a pending copy's
   rows are not in the store before ``commit()``).

A second ``after_forward`` before ``commit()`` raises RuntimeError.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Self

import numpy as np
import numpy.typing as npt
import torch

from rollout.capture import shm
from rollout.capture.capturer import RoutedExpertsCapturer
from rollout.capture.reader import ReaderSpec, gather_rows, id_dtype_name

__all__ = ["RoutingStore"]


@dataclasses.dataclass(slots=True, frozen=True)
class _Pending:
    """The step whose rows are in (or on their way to) the staging buffer."""

    rows: np.ndarray  # staging rows to keep (their slot is not -1)
    slots: np.ndarray  # the KV slot of each kept row


class RoutingStore:
    """The engine's routing store for one DP rank (the owner of its shared-memory segment).

    Args:
        name: segment name (``rollout.capture.shm.segment_name(instance_id, dp_rank)``).
        num_kv_slots: KV slots of the engine (num_kv_blocks * block_size), >= 1.
        num_moe_layers, top_k: the capture buffer's L and K, >= 1.
        max_num_tokens: the capture buffer's rows (the most tokens a step feeds), >= 1.
        device: the capture buffer's device; CUDA uses pinned staging and a side stream.
        dtype: the capture buffer's id dtype (torch.uint8, int16 or int32; None means int16,
            as for ``RoutedExpertsCapturer``).
        lock_path: the lock file of ``rollout.capture.shm.create``; None means
            ``rollout.capture.shm.default_lock_path()``.

    The segment is created zero-filled (rows of slots this store never wrote are zeros), after
    the segments of dead owners are reclaimed, and unlinked by ``close()``, a ``with`` block,
    garbage collection or interpreter exit in this process (not in a forked child), or by the
    SIGTERM clean-up (``rollout.capture.shm``).

    Raises:
        FileExistsError: a live store (in this process or another) owns the segment ``name``.
        OSError: ``/dev/shm`` cannot hold the segment (ENOSPC; nothing is left behind).
        TimeoutError: the lock file stayed locked by another process.
    """

    def __init__(
        self,
        *,
        name: str,
        num_kv_slots: int,
        num_moe_layers: int,
        top_k: int,
        max_num_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        lock_path: str | None = None,
    ) -> None:
        if dtype is None:
            dtype = torch.int16
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype or None, got {type(dtype).__name__}")
        self.spec = ReaderSpec(
            name=name,
            num_kv_slots=num_kv_slots,
            num_moe_layers=num_moe_layers,
            top_k=top_k,
            dtype=id_dtype_name(dtype),
        )
        if isinstance(max_num_tokens, bool) or not isinstance(max_num_tokens, numbers.Integral):
            raise TypeError(f"max_num_tokens: expected an int, got {type(max_num_tokens).__name__}")
        if max_num_tokens < 1:
            raise ValueError(f"max_num_tokens: expected >= 1, got {max_num_tokens}")
        self.max_num_tokens = int(max_num_tokens)
        self.dtype = dtype
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

        self._pending: _Pending | None = None
        self._rows_SLK: np.ndarray | None = None
        self._segment: shm.OwnedSegment | None = shm.create(
            name, self.spec.shape, self.spec.dtype, lock_path=lock_path
        )
        try:
            self._rows_SLK = self._segment.array
            # Pinned memory makes the device->host copy asynchronous to the host.
            self._staging_TLK = torch.empty(
                (self.max_num_tokens, num_moe_layers, top_k),
                dtype=dtype,
                pin_memory=on_cuda,
            )
            self._staging_np = self._staging_TLK.numpy()
            if on_cuda:
                self._copy_stream = torch.cuda.Stream(self.device)
                self._ready = torch.cuda.Event()
                self._copied = torch.cuda.Event()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_capturer(
        cls,
        capturer: RoutedExpertsCapturer,
        *,
        name: str,
        num_kv_slots: int,
        lock_path: str | None = None,
    ) -> RoutingStore:
        """The store matching ``capturer``'s buffer (its L, K, rows, device and dtype)."""
        if not isinstance(capturer, RoutedExpertsCapturer):
            raise TypeError(
                f"capturer: expected a RoutedExpertsCapturer, got {type(capturer).__name__}"
            )
        return cls(
            name=name,
            num_kv_slots=num_kv_slots,
            num_moe_layers=capturer.num_moe_layers,
            top_k=capturer.top_k,
            max_num_tokens=capturer.max_num_tokens,
            device=capturer.device,
            dtype=capturer.dtype,
            lock_path=lock_path,
        )

    @property
    def name(self) -> str:
        """The segment's name."""
        return self.spec.name

    def reader_spec(self) -> ReaderSpec:
        """Plain data for ``RoutedExpertsReader.from_spec`` in any process on this node."""
        return self.spec

    def after_forward(
        self,
        capture_buffer: torch.Tensor,
        num_tokens: int,
        slot_mapping: npt.ArrayLike | torch.Tensor,
    ) -> None:
        """Start copying the step's rows ``capture_buffer[:num_tokens]`` to the host.

        Call it after the step's forward has been launched on the current stream (the copy is
        ordered after everything enqueued there so far). No host synchronization.

        Args:
            capture_buffer: the capturer's buffer [>= num_tokens, L, K] (dtype and device of
                this store). It must stay alive until ``commit()``.
            num_tokens: T, the step's tokens (rows 0 .. T-1 of the buffer), 0 <= T <=
                max_num_tokens.
            slot_mapping: T host KV slots (list, numpy array or CPU tensor; copied), ``-1`` for
                padding tokens, whose rows are dropped.

        Raises:
            RuntimeError: the previous step was not committed.
            TypeError / ValueError: a bad argument (a device tensor as ``slot_mapping``
                included: reading it would synchronize).
        """
        self._check_open("after_forward")
        if self._pending is not None:
            raise RuntimeError(
                "after_forward: the previous step's rows are not committed; call commit() first"
            )
        n = self._check_buffer(capture_buffer, num_tokens)
        slots_T = self._host_slots(slot_mapping, n)
        keep_T = np.flatnonzero(slots_T >= 0)
        if keep_T.size == 0:
            return
        if self.device.type == "cuda":
            compute = torch.cuda.current_stream(self.device)
            self._ready.record(compute)
            self._copy_stream.wait_event(self._ready)
            with torch.cuda.stream(self._copy_stream):
                self._staging_TLK[:n].copy_(capture_buffer[:n], non_blocking=True)
                self._copied.record(self._copy_stream)
            # The next step's routing kernels rewrite the buffer: they wait for this read.
            compute.wait_event(self._copied)
        else:
            self._staging_TLK[:n].copy_(capture_buffer[:n])
        self._pending = _Pending(rows=keep_T, slots=slots_T[keep_T])

    @property
    def has_pending(self) -> bool:
        """Whether a step's rows are on their way (``after_forward`` without ``commit``)."""
        return self._pending is not None

    def commit(self) -> int:
        """Wait for the pending copy and scatter its rows by slot; return the rows written.

        A no-op (returns 0) when nothing is pending.
        """
        self._check_open("commit")
        pending = self._pending
        if pending is None:
            return 0
        if self.device.type == "cuda":
            self._copied.synchronize()
        self._rows_SLK[pending.slots] = self._staging_np[pending.rows]
        self._pending = None
        return int(pending.slots.size)

    def read(self, slots: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
        """The rows [len(slots), L, K] stored at ``slots`` (a copy, in the given order, into
        ``out`` when given: ``gather_rows``), as committed: the rows of a pending copy are not
        in the store before ``commit()``.

        Raises:
            RuntimeError: the store is closed.
            ValueError: ``slots`` not 1-D integers in [0, num_kv_slots) (``-1`` included), or
                a bad ``out``.
        """
        self._check_open("read")
        return gather_rows(self._rows_SLK, slots, out)

    def close(self) -> None:
        """Drop any pending copy, unmap and unlink the segment (idempotent)."""
        if self._pending is not None and self.device.type == "cuda":
            self._copied.synchronize()  # the copy still writes into the staging memory
        self._pending = None
        self._rows_SLK = None
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # The array must go before the mapping; skipped when __init__ failed early.
        if getattr(self, "_segment", None) is not None:
            self.close()

    def _check_open(self, method: str) -> None:
        if self._segment is None:
            raise RuntimeError(f"{method}: the routing store {self.spec.name!r} is closed")

    def _check_buffer(self, capture_buffer: torch.Tensor, num_tokens: int) -> int:
        if not isinstance(capture_buffer, torch.Tensor):
            raise TypeError(
                f"capture_buffer: expected a torch.Tensor, got {type(capture_buffer).__name__}"
            )
        _, layers, top_k = self.spec.shape
        if capture_buffer.dim() != 3 or tuple(capture_buffer.shape[1:]) != (
            layers,
            top_k,
        ):
            raise ValueError(
                f"capture_buffer: expected shape [rows, {layers}, {top_k}] (L, K), "
                f"got {tuple(capture_buffer.shape)}"
            )
        if capture_buffer.dtype != self.dtype or capture_buffer.device != self.device:
            raise ValueError(
                f"capture_buffer: expected dtype {self.dtype} on {self.device}, "
                f"got {capture_buffer.dtype} on {capture_buffer.device}"
            )
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral):
            raise TypeError(f"num_tokens: expected an int, got {type(num_tokens).__name__}")
        limit = min(self.max_num_tokens, capture_buffer.shape[0])
        if not 0 <= num_tokens <= limit:
            raise ValueError(
                f"num_tokens: expected in [0, {limit}] (max_num_tokens and buffer rows), "
                f"got {num_tokens}"
            )
        return int(num_tokens)

    def _host_slots(self, slot_mapping: npt.ArrayLike | torch.Tensor, n: int) -> np.ndarray:
        """``slot_mapping`` as a new int64 array [n], checked to be in [-1, num_kv_slots)."""
        if isinstance(slot_mapping, torch.Tensor):
            if slot_mapping.device.type != "cpu":
                raise ValueError(
                    "slot_mapping: expected host data (list, numpy array or CPU tensor: reading "
                    f"a device tensor would synchronize the step), got a tensor on "
                    f"{slot_mapping.device}"
                )
            slot_mapping = slot_mapping.numpy()
        slots = np.asarray(slot_mapping)
        if slots.shape != (n,):
            raise ValueError(
                f"slot_mapping: expected shape ({n},) (one slot per token), got {slots.shape}"
            )
        if n == 0:
            return np.empty(0, dtype=np.int64)
        if slots.dtype.kind not in "iu":
            raise ValueError(f"slot_mapping: expected integers, got dtype {slots.dtype}")
        low, high = int(slots.min()), int(slots.max())
        if low < -1 or high >= self.spec.num_kv_slots:
            raise ValueError(
                f"slot_mapping: expected values in [-1, {self.spec.num_kv_slots}) (-1 = padding), "
                f"got min {low} max {high}"
            )
        return slots.astype(np.int64)
