"""The batch layout a model forward's own inputs describe, checked against a context's.

A replay context aligns its traces onto the layout it was given (``attention_mask``,
``position_ids``, ``cu_seqlens``); the model lays the batch out by the inputs its forward
receives. When the two differ (a right-padded mask for the context, a left-padded batch for the
model) trace rows land on other tokens than they were recorded for and replay routes nonsense
without a word. So each forward served by a context has its layout inputs compared with the
context's, once per forward (never per layer):

- the very tensors the context was given, not written in place since (the trainer's case):
  nothing to compute;
- otherwise the layout the model computes is derived from the forward's inputs as HF
  transformers reads them (``LayoutInputs.model_layout``; one read of the small integer
  inputs to the host) and compared with the context's.

HF ignores packing in ``position_ids`` when a 2-D ``attention_mask`` is given (it attends by
the mask), so a context given both for packed rows is caught too: the model would attend
across the packed sequences.

A forward's inputs are read by name from its keyword arguments, or by position through the
signature of the model's ``forward`` (``model(ids, mask)``). Packed input given as
``cu_seq_lens_q`` (HF's flash-attention varlen keyword) or ``cu_seqlens`` is read as
``cu_seqlens``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from replay.layout import BatchLayout

__all__ = ["ForwardInputs", "LayoutInputs", "check_forward_layout", "read_forward_inputs"]

_LayoutArg = torch.Tensor | np.ndarray | Sequence[int] | None
_CU_SEQLENS_KEYS = ("cu_seq_lens_q", "cu_seqlens")


@dataclass(frozen=True, slots=True, eq=False)
class LayoutInputs:
    """The inputs that describe a batch's layout, as given to a context or to one forward.

    ``versions`` are the tensors' in-place write counters when they were taken, so that "the
    same tensor" also means "with the same contents".
    """

    attention_mask: _LayoutArg = None
    position_ids: _LayoutArg = None
    cu_seqlens: _LayoutArg = None
    versions: tuple[int | None, ...] = (None, None, None)

    @classmethod
    def of(
        cls,
        *,
        attention_mask: _LayoutArg = None,
        position_ids: _LayoutArg = None,
        cu_seqlens: _LayoutArg = None,
    ) -> LayoutInputs:
        values = (attention_mask, position_ids, cu_seqlens)
        return cls(*values, versions=tuple(_version(value) for value in values))

    @property
    def source(self) -> str:
        """Which inputs are given, for messages."""
        names = [
            name
            for name in ("cu_seqlens", "position_ids", "attention_mask")
            if getattr(self, name) is not None
        ]
        return " + ".join(names) or "shape alone (dense rows)"

    def is_given(self, other: LayoutInputs) -> bool:
        """True when ``other`` holds exactly these tensors, unwritten since (the cheap case)."""
        pairs = zip(self._values(), other._values(), self.versions, other.versions, strict=True)
        for mine, theirs, version, their_version in pairs:
            if mine is None and theirs is None:
                continue
            if mine is not theirs or version is None or version != their_version:
                return False
        return True

    def model_layout(self, batch_shape: tuple[int, int] | None) -> BatchLayout | None:
        """The layout an HF transformers model computes from these forward inputs, or None
        when it cannot be read from them.

        ``cu_seqlens`` (flash-attention varlen) first; else a 2-D ``attention_mask``, one
        sequence per row (HF then ignores restarts in ``position_ids``, which only place the
        rotary positions); else ``position_ids``, packed where they restart; else dense rows of
        ``batch_shape``. A mask of other rank (a custom 4-D attention mask) or position ids of
        other rank (multimodal rotary sections) say nothing readable about the sequences.
        """
        if self.cu_seqlens is not None:
            rows, seq_len = batch_shape if batch_shape is not None else (1, None)
            return BatchLayout.from_cu_seqlens(self.cu_seqlens, batch_size=rows, seq_len=seq_len)
        if self.attention_mask is not None:
            if np.ndim(self.attention_mask) != 2:
                return None
            return BatchLayout.from_attention_mask(self.attention_mask)
        if self.position_ids is not None:
            if np.ndim(self.position_ids) not in (1, 2):
                return None
            return BatchLayout.from_position_ids(self.position_ids)
        return None if batch_shape is None else BatchLayout.dense(*batch_shape)

    def _values(self) -> tuple[_LayoutArg, _LayoutArg, _LayoutArg]:
        return self.attention_mask, self.position_ids, self.cu_seqlens


@dataclass(frozen=True, slots=True)
class ForwardInputs:
    """What a forward's arguments say about its batch: ``(batch, seq_len)`` of ``input_ids``
    or ``inputs_embeds`` (None without them) and its layout inputs."""

    batch_shape: tuple[int, int] | None
    layout_inputs: LayoutInputs


def read_forward_inputs(
    forward: Callable[..., Any],
) -> Callable[[tuple[Any, ...], dict[str, Any]], ForwardInputs]:
    """A reader of ``ForwardInputs`` from the ``(args, kwargs)`` of calls to ``forward`` (a
    model's bound ``forward``): positional arguments are named by its signature, once."""
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: keyword arguments only
        parameters = ()
    positional: list[str] = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        positional.append(parameter.name)

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
        named = dict(zip(positional, args)) | kwargs if args else kwargs
        batch_shape = None
        for value in (named.get("input_ids"), named.get("inputs_embeds"), *args[:1]):
            if isinstance(value, torch.Tensor) and value.ndim >= 2:
                batch_shape = (int(value.shape[0]), int(value.shape[1]))
                break
        cu_seqlens = next((named[k] for k in _CU_SEQLENS_KEYS if named.get(k) is not None), None)
        return ForwardInputs(
            batch_shape,
            LayoutInputs.of(
                attention_mask=named.get("attention_mask"),
                position_ids=named.get("position_ids"),
                cu_seqlens=cu_seqlens,
            ),
        )

    return read


def check_forward_layout(
    what: str,
    given: LayoutInputs,
    layout: BatchLayout,
    forward: ForwardInputs,
) -> None:
    """Raise ValueError if the layout the model computes from ``forward``'s inputs would not
    keep the sequences of ``layout`` (the one a context built from ``given``), naming both
    sources and the first sequence it breaks."""
    if given.is_given(forward.layout_inputs):
        return
    observed = forward.layout_inputs.model_layout(forward.batch_shape)
    if observed is None:  # nothing readable to compare with (see LayoutInputs.model_layout)
        return
    difference = _difference(layout, observed)
    if difference:
        raise ValueError(
            f"{what}: expected the forward to keep the sequences of the context's layout (by "
            f"its {given.source}), got a forward laid out by its {forward.layout_inputs.source}: "
            f"{difference}; pass the model the layout the context was given"
        )


def _difference(context: BatchLayout, forward: BatchLayout) -> str:
    """How the model's layout breaks the context's, for messages ("" if it does not).

    Each sequence of the context must be, in the forward, the start of one sequence: the same
    tokens in the same order, from its first token. Later tokens of that sequence (padding the
    context leaves out, e.g. a right-padded row given no mask) cannot change it under causal
    attention, and they route natively.
    """
    shapes = (context.batch_size, context.seq_len), (forward.batch_size, forward.seq_len)
    if shapes[0] != shapes[1]:
        return f"batch shape {shapes[0]} in the context, {shapes[1]} in the forward"
    if np.array_equal(context.seq_offsets, forward.seq_offsets) and np.array_equal(
        context.token_index, forward.token_index
    ):
        return ""
    # Per flat token: its sequence in the forward (-1: padding) and its index in it.
    seq_T, rank_T = _sequence_and_rank(forward)
    context_seq_N, context_rank_N = _sequence_and_rank(context, per_token=True)
    seq_N = seq_T[context.token_index]
    first_N = seq_N[np.repeat(context.seq_offsets[:-1], context.lengths)]
    bad_N = (seq_N < 0) | (seq_N != first_N) | (rank_T[context.token_index] != context_rank_N)
    if not bad_N.any():
        return ""
    i = int(context_seq_N[np.flatnonzero(bad_N)[0]])
    first = int(context.positions(i)[0])
    there = (
        "padding there"
        if seq_T[first] < 0
        else f"its sequence there is flat tokens {_span(forward.positions(int(seq_T[first])))}"
    )
    return f"sequence {i} is flat tokens {_span(context.positions(i))} in the context, {there}"


def _sequence_and_rank(
    layout: BatchLayout, *, per_token: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sequence index and index within it of each flat token (-1 for padding), or with
    ``per_token`` of each entry of ``layout.token_index``."""
    lengths = layout.lengths
    seq_N = np.repeat(np.arange(lengths.size), lengths)
    rank_N = np.arange(layout.token_index.size) - np.repeat(layout.seq_offsets[:-1], lengths)
    if per_token:
        return seq_N, rank_N
    seq_T = np.full(layout.num_tokens, -1, dtype=np.int64)
    rank_T = np.full(layout.num_tokens, -1, dtype=np.int64)
    seq_T[layout.token_index], rank_T[layout.token_index] = seq_N, rank_N
    return seq_T, rank_T


def _span(positions: np.ndarray) -> str:
    if positions.size and positions[-1] - positions[0] + 1 == positions.size:
        return f"{positions[0]}..{positions[-1]}"
    return str(positions[:8].tolist())[:-1] + (", ...]" if positions.size > 8 else "]")


def _version(value: object) -> int | None:
    """A tensor's in-place write counter (None for non-tensors and inference tensors)."""
    if not isinstance(value, torch.Tensor) or value.is_inference():
        return None
    return value._version
