"""Where each sequence's tokens sit in a training batch, and traces aligned onto those tokens.

A training batch is ``[batch, seq_len]`` tokens, flattened row-major into ``T = batch * seq_len``
router rows (the order HF MoE blocks see them). One batch row holds one sequence (right- or
left-padded, ``attention_mask``) or several (packed: ``position_ids`` restarting, or
``cu_seqlens``). ``BatchLayout`` records, for every sequence, the flat positions of its real
tokens in order; traces map onto those positions exactly as the input ids do (DESIGN.md rows:
row ``r`` of a trace with start ``s`` is token ``s + r`` of its sequence; the last token has no
row).

``align_traces`` scatters one trace per sequence onto the batch's tokens for replay (one
``[T, L, K]`` id tensor, a view per layer); ``traces_from_aligned`` is the inverse for
recording.

Legend: B batch rows, S tokens per row, T = B * S flat tokens, N tokens of all sequences,
L MoE layers, K top_k, R trace rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from replay.routed_experts import RoutedExperts
from routing_kernels.expert_ids import compact_id_dtype

__all__ = ["AlignedTraces", "BatchLayout", "align_traces", "traces_from_aligned"]


@dataclass(kw_only=True, frozen=True, slots=True, eq=False)
class BatchLayout:
    """The sequences of a ``[batch_size, seq_len]`` batch and the flat positions of their tokens.

    Build it with one of the constructors (``dense``, ``from_attention_mask``,
    ``from_position_ids``, ``from_cu_seqlens``) or ``from_inputs``.

    Attributes:
        batch_size: rows of the batch (B).
        seq_len: tokens per row (S).
        token_index: int64 ``[N]``: the flat position ``b * seq_len + s`` of every real token,
            sequence after sequence, each sequence's tokens in order.
        seq_offsets: int64 ``[num_sequences + 1]``: sequence ``i`` owns
            ``token_index[seq_offsets[i]:seq_offsets[i + 1]]``.
    """

    batch_size: int
    seq_len: int
    token_index: np.ndarray
    seq_offsets: np.ndarray

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        for name in ("token_index", "seq_offsets"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != np.int64:
                raise TypeError(f"{name}: expected a numpy int64 array, got {array!r:.80}")
        offsets = self.seq_offsets
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
            raise ValueError(f"seq_offsets: expected [0, ...] (1-D), got {offsets.tolist()}")
        if np.any(np.diff(offsets) < 0) or offsets[-1] != self.token_index.size:
            raise ValueError(
                f"seq_offsets: expected non-decreasing offsets ending at {self.token_index.size} "
                f"(len(token_index)), got {offsets.tolist()}"
            )
        num_tokens = self.batch_size * self.seq_len
        if self.token_index.size and (
            self.token_index.min() < 0 or self.token_index.max() >= num_tokens
        ):
            raise ValueError(
                f"token_index: expected flat positions in [0, {num_tokens}), got "
                f"[{self.token_index.min()}, {self.token_index.max()}]"
            )
        # O(N) instead of np.unique's sort: a layout is built for every training batch.
        seen = np.zeros(num_tokens, dtype=bool)
        seen[self.token_index] = True
        if np.count_nonzero(seen) != self.token_index.size:
            raise ValueError("token_index: expected each flat position at most once, got repeats")
        self.token_index.setflags(write=False)
        self.seq_offsets.setflags(write=False)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def dense(cls, batch_size: int, seq_len: int) -> BatchLayout:
        """Every row is one sequence of ``seq_len`` tokens (no padding, no packing)."""
        token_index = np.arange(batch_size * seq_len, dtype=np.int64)
        seq_offsets = np.arange(batch_size + 1, dtype=np.int64) * seq_len
        return cls(
            batch_size=batch_size,
            seq_len=seq_len,
            token_index=token_index,
            seq_offsets=seq_offsets,
        )

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor | np.ndarray) -> BatchLayout:
        """One sequence per row made of the row's unmasked tokens, in order.

        Right and left padding (and any other placement of the padding) are handled alike:
        token ``t`` of a sequence is the ``t``-th unmasked position of its row.
        """
        mask_BS = _as_mask("attention_mask", attention_mask)
        batch_size, seq_len = mask_BS.shape
        token_index = np.flatnonzero(mask_BS.reshape(-1)).astype(np.int64)
        seq_offsets = np.concatenate([[0], np.cumsum(mask_BS.sum(axis=1))]).astype(np.int64)
        return cls(
            batch_size=batch_size,
            seq_len=seq_len,
            token_index=token_index,
            seq_offsets=seq_offsets,
        )

    @classmethod
    def from_position_ids(
        cls,
        position_ids: torch.Tensor | np.ndarray,
        attention_mask: torch.Tensor | np.ndarray | None = None,
    ) -> BatchLayout:
        """Packed rows: a sequence starts at each row start and wherever the position id is not
        the previous (unmasked) token's plus one, e.g. where it restarts at 0.

        This is the rule HF transformers uses to find packed sequences in ``position_ids``, so
        the replayed rows split exactly where attention does. ``attention_mask`` (optional,
        same shape) drops padding tokens before splitting.
        """
        pos_BS = _as_int_array("position_ids", position_ids)
        if pos_BS.ndim == 1:
            pos_BS = pos_BS[None, :]
        if pos_BS.ndim != 2:
            raise ValueError(
                f"position_ids: expected shape [batch, seq_len] or [seq_len], got {pos_BS.shape}"
            )
        batch_size, seq_len = pos_BS.shape
        if attention_mask is None:
            mask_BS = np.ones_like(pos_BS, dtype=bool)
        else:
            mask_BS = _as_mask("attention_mask", attention_mask)
            if mask_BS.shape != pos_BS.shape:
                raise ValueError(
                    f"attention_mask: expected the shape of position_ids {pos_BS.shape}, "
                    f"got {mask_BS.shape}"
                )
        token_index = np.flatnonzero(mask_BS.reshape(-1)).astype(np.int64)
        pos_N = pos_BS.reshape(-1)[token_index]
        row_N = token_index // max(seq_len, 1)
        starts_N = np.ones(token_index.size, dtype=bool)
        starts_N[1:] = (row_N[1:] != row_N[:-1]) | (pos_N[1:] != pos_N[:-1] + 1)
        seq_offsets = np.concatenate([np.flatnonzero(starts_N), [token_index.size]])
        return cls(
            batch_size=batch_size,
            seq_len=seq_len,
            token_index=token_index,
            seq_offsets=seq_offsets.astype(np.int64),
        )

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor | np.ndarray | Sequence[int],
        *,
        batch_size: int = 1,
        seq_len: int | None = None,
    ) -> BatchLayout:
        """Packed sequences given by cumulative lengths over the flattened batch (flash-attn's
        varlen ``cu_seqlens``): sequence ``i`` is flat tokens ``[cu[i], cu[i + 1])``.

        ``seq_len`` defaults to ``cu_seqlens[-1]`` for a single row; flat tokens past
        ``cu_seqlens[-1]`` are padding. A sequence may not cross a row boundary.
        """
        cu_N1 = _as_int_array("cu_seqlens", cu_seqlens)
        if cu_N1.ndim != 1 or cu_N1.size < 1 or cu_N1[0] != 0 or np.any(np.diff(cu_N1) < 0):
            raise ValueError(
                f"cu_seqlens: expected a 1-D non-decreasing sequence starting at 0, "
                f"got {cu_N1.tolist()}"
            )
        total = int(cu_N1[-1])
        if seq_len is None:
            if batch_size != 1:
                raise ValueError(
                    f"seq_len: expected a value when batch_size != 1, got None (batch_size "
                    f"{batch_size})"
                )
            seq_len = total
        if total > batch_size * seq_len:
            raise ValueError(
                f"cu_seqlens: expected a last value <= batch_size * seq_len = "
                f"{batch_size * seq_len}, got {total}"
            )
        starts, ends = cu_N1[:-1], cu_N1[1:]
        crossing = (ends > starts) & (starts // max(seq_len, 1) != (ends - 1) // max(seq_len, 1))
        if crossing.any():
            i = int(np.flatnonzero(crossing)[0])
            raise ValueError(
                f"cu_seqlens: sequence {i} spans flat tokens [{starts[i]}, {ends[i]}), which "
                f"crosses a row boundary (seq_len {seq_len})"
            )
        return cls(
            batch_size=batch_size,
            seq_len=seq_len,
            token_index=np.arange(total, dtype=np.int64),
            seq_offsets=cu_N1.astype(np.int64),
        )

    @classmethod
    def from_inputs(
        cls,
        *,
        attention_mask: torch.Tensor | np.ndarray | None = None,
        position_ids: torch.Tensor | np.ndarray | None = None,
        cu_seqlens: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> BatchLayout | None:
        """The layout described by the model inputs, or None when none is given.

        ``position_ids`` (optionally with ``attention_mask``) means packed rows;
        ``cu_seqlens`` (alone) means one packed row; ``attention_mask`` alone means one padded
        sequence per row.
        """
        if cu_seqlens is not None:
            if position_ids is not None or attention_mask is not None:
                raise ValueError(
                    "cu_seqlens: expected alone (it describes the whole packed row), got it "
                    "together with position_ids or attention_mask"
                )
            return cls.from_cu_seqlens(cu_seqlens)
        if position_ids is not None:
            return cls.from_position_ids(position_ids, attention_mask)
        if attention_mask is not None:
            return cls.from_attention_mask(attention_mask)
        return None

    # ------------------------------------------------------------------ queries

    @property
    def num_tokens(self) -> int:
        """Flat tokens of the batch, padding included (T = batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch."""
        return int(self.seq_offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per sequence, int64 ``[num_sequences]``."""
        return np.diff(self.seq_offsets)

    def positions(self, sequence: int) -> np.ndarray:
        """Flat positions of sequence ``sequence``'s tokens, in order."""
        return self.token_index[self.seq_offsets[sequence] : self.seq_offsets[sequence + 1]]


@dataclass(kw_only=True, frozen=True, slots=True, eq=False)
class AlignedTraces:
    """Traces scattered onto the flat tokens of a batch, ready for the MoE layers.

    Attributes:
        ids_TLK: ``[T, num_moe_layers, top_k]`` in the traces' compact id dtype
            (``routing_kernels.expert_ids.compact_id_dtype``), the traces' own layout (so aligning
            is a contiguous copy per sequence); MoE layer ``l`` reads the view ``ids_TLK[:, l]``.
            Rows where ``replay_T`` is False hold 0 and are never read.
        replay_T: bool ``[T]``: True where a trace row exists and is valid (the token replays);
            padding, the last token of each sequence, tokens before a trace's ``start`` and
            invalid rows are False (they route natively).
        num_replayed: how many entries of ``replay_T`` are True, known on the host (deciding
            on it never reads device memory).
    """

    ids_TLK: torch.Tensor
    replay_T: torch.Tensor
    num_replayed: int

    @property
    def ids_LTK(self) -> torch.Tensor:
        """int32 ``[num_moe_layers, T, top_k]``, contiguous: a copy made on each access."""
        return self.ids_TLK.transpose(0, 1).to(torch.int32, memory_format=torch.contiguous_format)


def align_traces(
    traces: Sequence[RoutedExperts],
    layout: BatchLayout,
    *,
    moe_layers: Sequence[int],
    num_experts: int,
    top_k: int,
    device: torch.device | str | None = None,
) -> AlignedTraces:
    """Scatter one trace per sequence of ``layout`` onto the batch's flat tokens.

    Every trace must match the model (``moe_layers``, ``num_experts``, ``top_k``) and have
    ``N - 1 - start`` rows for its sequence of ``N`` tokens; otherwise ValueError naming the
    sequence, the expected and the actual value.

    The ids and the mask are built in one host buffer (pinned for a CUDA ``device``) and reach
    the device in one asynchronous copy: no host synchronization, so aligning the next batch
    overlaps the device's work on the current one.
    """
    if isinstance(traces, RoutedExperts) or not isinstance(traces, Sequence):
        raise TypeError(
            f"traces: expected a list of RoutedExperts (one per sequence), got "
            f"{type(traces).__name__}"
        )
    moe_layers = tuple(moe_layers)
    if len(traces) != layout.num_sequences:
        raise ValueError(
            f"traces: expected {layout.num_sequences} (one per sequence of the batch), "
            f"got {len(traces)}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    id_dtype = compact_id_dtype(num_experts)
    shape_TLK = (layout.num_tokens, len(moe_layers), top_k)
    ids_bytes = math.prod(shape_TLK) * id_dtype.itemsize
    # One buffer: the ids, then the bool mask (the ids at offset 0 are aligned for any dtype).
    host_B = torch.zeros(
        ids_bytes + layout.num_tokens,
        dtype=torch.uint8,
        pin_memory=device.type == "cuda",
    )
    ids_TLK = host_B[:ids_bytes].view(id_dtype).view(shape_TLK).numpy()
    replay_T = host_B[ids_bytes:].view(torch.bool).numpy()
    for i, (trace, length) in enumerate(zip(traces, layout.lengths.tolist(), strict=True)):
        _check_trace(i, trace, length, moe_layers, num_experts, top_k)
        positions_R = layout.positions(i)[trace.start : trace.start + trace.num_rows]
        ids_RLK = trace.ids
        if trace.valid is not None:
            positions_R, ids_RLK = positions_R[trace.valid], ids_RLK[trace.valid]
        if positions_R.size and positions_R[-1] - positions_R[0] + 1 == positions_R.size:
            # The common case (a padded or packed sequence's rows are one run of tokens): one
            # contiguous copy instead of a fancy-index scatter.
            positions_R = slice(int(positions_R[0]), int(positions_R[-1]) + 1)
        ids_TLK[positions_R] = ids_RLK
        replay_T[positions_R] = True
    num_replayed = int(np.count_nonzero(replay_T))
    device_B = host_B if device.type == "cpu" else host_B.to(device, non_blocking=True)
    return AlignedTraces(
        ids_TLK=device_B[:ids_bytes].view(id_dtype).view(shape_TLK),
        replay_T=device_B[ids_bytes:].view(torch.bool),
        num_replayed=num_replayed,
    )


def traces_from_aligned(
    ids_LTK: torch.Tensor | np.ndarray,
    layout: BatchLayout,
    *,
    moe_layers: Sequence[int],
    num_experts: int,
) -> list[RoutedExperts]:
    """Cut per-layer ids of a whole batch into one trace per sequence (the inverse of
    ``align_traces`` for complete routing): sequence ``i`` of ``N`` tokens gets rows for its
    tokens ``0 .. N-2`` (start 0, all valid).
    """
    if isinstance(ids_LTK, torch.Tensor):
        ids_LTK = ids_LTK.detach().cpu().numpy()
    expected = (len(tuple(moe_layers)), layout.num_tokens)
    if ids_LTK.ndim != 3 or ids_LTK.shape[:2] != expected:
        raise ValueError(
            f"ids_LTK: expected shape ({expected[0]}, {expected[1]}, top_k) (MoE layers, "
            f"batch tokens), got {ids_LTK.shape}"
        )
    traces = []
    for i, length in enumerate(layout.lengths.tolist()):
        positions_R = layout.positions(i)[: max(length - 1, 0)]
        ids_RLK = ids_LTK[:, positions_R, :].transpose(1, 0, 2)
        traces.append(RoutedExperts(ids_RLK, moe_layers, num_experts))
    return traces


# ---------------------------------------------------------------------- validation


def _check_trace(
    index: int,
    trace: RoutedExperts,
    length: int,
    moe_layers: tuple[int, ...],
    num_experts: int,
    top_k: int,
) -> None:
    if not isinstance(trace, RoutedExperts):
        raise TypeError(f"traces[{index}]: expected RoutedExperts, got {type(trace).__name__}")
    if trace.moe_layers != moe_layers:
        raise ValueError(
            f"traces[{index}].moe_layers: expected the model's {len(moe_layers)} MoE layers "
            f"{list(moe_layers)}, got {len(trace.moe_layers)} layers {list(trace.moe_layers)}"
        )
    if trace.top_k != top_k:
        raise ValueError(
            f"traces[{index}].top_k: expected {top_k} (the model's), got {trace.top_k}"
        )
    if trace.num_experts != num_experts:
        raise ValueError(
            f"traces[{index}].num_experts: expected {num_experts} (the model's), "
            f"got {trace.num_experts}"
        )
    last_row_token = max(length - 1, 0)
    if trace.start > last_row_token:
        raise ValueError(
            f"traces[{index}].start: expected <= {last_row_token} (sequence {index} has "
            f"{length} tokens), got {trace.start}"
        )
    expected_rows = last_row_token - trace.start
    if trace.num_rows != expected_rows:
        raise ValueError(
            f"traces[{index}]: expected {expected_rows} rows (sequence {index} has {length} "
            f"tokens: tokens - 1 - start {trace.start}), got {trace.num_rows}"
        )


def _as_array(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, Sequence)):
        return np.asarray(value)
    raise TypeError(f"{name}: expected a tensor or array, got {type(value).__name__}")


def _as_int_array(name: str, value: object) -> np.ndarray:
    array = _as_array(name, value)
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {array.dtype}")
    return array.astype(np.int64)


def _as_mask(name: str, value: object) -> np.ndarray:
    """A 0/1 mask of any dtype (collators produce int, bool and float masks) as bool."""
    array = _as_array(name, value)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, seq_len], got {array.shape}")
    if not ((array == 0) | (array == 1)).all():
        raise ValueError(
            f"{name}: expected values in {{0, 1}}, got {np.unique(array)[:8].tolist()}"
        )
    return array.astype(bool)
