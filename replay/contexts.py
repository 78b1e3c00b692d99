"""The states of a ``ReplayController`` (``Mode``), the contexts that enter them (``replay``,
``record``), and the binding each hands to a forward of the model run inside it: how that
forward, and any recompute of it in backward, routes (native, replayed, recorded). The state
machine itself and why routing binds to the forward: ``replay.controller``.

Legend: T tokens of the batch (flat, batch * seq_len), E experts, K top_k, L MoE layers.
"""

from __future__ import annotations

import enum
from types import TracebackType
from typing import TYPE_CHECKING, Self

import torch

from replay.discovery import MoELayer
from replay.forward_layout import ForwardInputs, LayoutInputs, check_forward_layout
from replay.layout import AlignedTraces, BatchLayout, traces_from_aligned
from replay.routed_experts import RoutedExperts
from routing_kernels.replay_weights import replay_topk

if TYPE_CHECKING:
    from replay.controller import ReplayController

__all__ = [
    "Binding",
    "Mode",
    "NativeBinding",
    "RecordContext",
    "RecordForward",
    "ReplayContext",
    "ReplayForward",
]


class Mode(enum.Enum):
    """What the patched routers do with their native top-k."""

    OFF = "off"  # native routing
    REPLAY = "replay"  # R3: the trace's ids, weights recomputed from the current logits
    RECORD = "record"  # R2: native routing, ids captured per forward


class _ModeContext:
    """What the replay and record contexts share: entered once, each entry switching the
    controller into the context's mode."""

    _MODE: Mode

    def __init__(self, controller: ReplayController) -> None:
        self._controller = controller
        self._entered = False

    def __enter__(self) -> Self:
        if self._entered:
            raise RuntimeError(
                f"{self._MODE.value} context: expected a fresh context, got one entered before"
            )
        self._controller._enter(self._MODE, self)
        self._entered = True
        return self


class ReplayContext(_ModeContext):
    """The context manager of ``ReplayController.replay``: the aligned traces of one batch.

    On a clean exit, every forward run inside must have routed every MoE layer exactly once
    with the trace (recomputes in backward do not count); otherwise RuntimeError naming the
    layers. The binding outlives the block: a backward after exit recomputes with these ids.
    """

    _MODE = Mode.REPLAY

    def __init__(
        self,
        controller: ReplayController,
        aligned: AlignedTraces,
        layout: BatchLayout,
        given: LayoutInputs,
    ) -> None:
        super().__init__(controller)
        self._aligned = aligned
        self._layout = layout
        self._given = given
        self._forwards: list[ReplayForward] = []

    @property
    def aligned(self) -> AlignedTraces:
        """The per-layer ids and replay mask of the batch's flat tokens."""
        return self._aligned

    @property
    def layout(self) -> BatchLayout:
        """The batch layout the traces were aligned with."""
        return self._layout

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        forwards, self._forwards = self._forwards, []
        self._controller._exit(self)
        if exc_type is None:
            consumed = [forward.consumed for forward in forwards]
            _check_each_layer_once(self._controller.layers, consumed, "replay")

    def _new_forward(self, inputs: ForwardInputs) -> ReplayForward:
        _check_batch_shape(inputs.batch_shape, self._layout, "replay")
        check_forward_layout("replay", self._given, self._layout, inputs)
        forward = ReplayForward(self, len(self._controller.layers))
        self._forwards.append(forward)
        return forward

    def _routed(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trace ids on replayed tokens, with weights recomputed from the current logits by the
        model's method (cast like the router's own weights); native routing elsewhere."""
        aligned = self._aligned
        replay_T = aligned.replay_T
        if logits_TE.shape[0] != replay_T.shape[0]:
            layer = self._controller.layers[position]
            raise ValueError(
                f"MoE layer {layer.layer_index} ({layer.name}): expected {replay_T.shape[0]} "
                f"tokens (batch {self._layout.batch_size} x seq_len {self._layout.seq_len} of "
                f"the replay context), got {logits_TE.shape[0]}"
            )
        if aligned.num_replayed == 0:
            # Decided on the host from the traces: no row replays, the router's output stands.
            return weights_TK, ids_TK
        trace_TK = aligned.ids_TLK[:, position]
        if replay_T.device != logits_TE.device:
            trace_TK = trace_TK.to(logits_TE.device, non_blocking=True)
            replay_T = replay_T.to(logits_TE.device, non_blocking=True)
        routing = self._controller.routing
        # One fused launch on CUDA; the trace ids were validated by RoutedExperts, so no id
        # check (a host synchronization) runs here.
        return replay_topk(
            logits_TE,
            weights_TK,
            ids_TK,
            trace_TK,
            replay_T,
            routing.method,
            routed_scaling_factor=routing.routed_scaling_factor,
        )


class RecordContext(_ModeContext):
    """The context manager of ``ReplayController.record``; ``traces`` after its forward.

    Captures exactly one forward (a second one raises); on a clean exit every MoE layer must
    have been recorded exactly once.
    """

    _MODE = Mode.RECORD

    def __init__(
        self, controller: ReplayController, layout: BatchLayout | None, given: LayoutInputs
    ) -> None:
        super().__init__(controller)
        self._layout = layout
        self._given = given
        self._forward: RecordForward | None = None
        self._traces: list[RoutedExperts] | None = None

    @property
    def traces(self) -> list[RoutedExperts]:
        """One trace per sequence (``tokens - 1`` rows, start 0, all valid), MoE layers in model
        order."""
        if self._traces is None:
            forward = self._forward
            if forward is None:
                raise RuntimeError("record: expected a forward of the model inside the context")
            _check_each_layer_once(self._controller.layers, [forward.consumed], "record")
            assert self._layout is not None, "set by the forward"
            self._traces = traces_from_aligned(
                torch.stack(forward.ids_LTK),
                self._layout,
                moe_layers=self._controller.moe_layers,
                num_experts=self._controller.num_experts,
            )
        return self._traces

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._controller._exit(self)
        if exc_type is None:
            consumed = [] if self._forward is None else [self._forward.consumed]
            _check_each_layer_once(self._controller.layers, consumed, "record")

    def _new_forward(self, inputs: ForwardInputs) -> RecordForward:
        if self._forward is not None:
            raise RuntimeError("record: expected one forward per record context, got a second one")
        if self._layout is None:
            self._layout = inputs.layout_inputs.model_layout(inputs.batch_shape)
            if self._layout is None:
                raise ValueError(
                    "record: expected input_ids or inputs_embeds [batch, seq_len, ...] to find "
                    "the sequences, got neither; pass attention_mask, position_ids or "
                    "cu_seqlens to record()"
                )
        else:
            check_forward_layout("record", self._given, self._layout, inputs)
        _check_batch_shape(inputs.batch_shape, self._layout, "record")
        self._forward = RecordForward(len(self._controller.layers))
        return self._forward


# ---------------------------------------------------------------------- bindings


class NativeBinding:
    """Routing as the model computes it."""

    __slots__ = ()

    def forward(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weights_TK, ids_TK

    recompute = forward


class ReplayForward:
    """One forward inside a replay context: counts consumption, recomputes replay the same."""

    __slots__ = ("consumed", "context")

    def __init__(self, context: ReplayContext, num_layers: int) -> None:
        self.context = context
        self.consumed = [0] * num_layers

    def forward(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.consumed[position] += 1
        return self.context._routed(position, logits_TE, weights_TK, ids_TK)

    def recompute(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context._routed(position, logits_TE, weights_TK, ids_TK)


class RecordForward:
    """The forward inside a record context: keeps each layer's native ids."""

    __slots__ = ("consumed", "ids_LTK")

    def __init__(self, num_layers: int) -> None:
        self.consumed = [0] * num_layers
        self.ids_LTK: list[torch.Tensor | None] = [None] * num_layers

    def forward(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.consumed[position] += 1
        self.ids_LTK[position] = ids_TK.detach()
        return weights_TK, ids_TK

    def recompute(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return weights_TK, ids_TK


Binding = NativeBinding | ReplayForward | RecordForward


# ---------------------------------------------------------------------- checks


def _check_batch_shape(shape: tuple[int, int] | None, layout: BatchLayout, what: str) -> None:
    expected = (layout.batch_size, layout.seq_len)
    if shape is not None and shape != expected:
        raise ValueError(
            f"{what}: expected a forward of batch shape {expected} (the context's layout), "
            f"got {shape}"
        )


def _check_each_layer_once(
    layers: tuple[MoELayer, ...], consumed: list[list[int]], what: str
) -> None:
    if not consumed:
        raise RuntimeError(
            f"{what}: expected a forward of the model inside the context, got none; MoE layers "
            f"{[layer.layer_index for layer in layers]} were not routed by it"
        )
    problems = [
        f"layer {layer.layer_index} ({layer.name}) {count} times in forward {n}"
        for n, counts in enumerate(consumed)
        for layer, count in zip(layers, counts, strict=True)
        if count != 1
    ]
    if problems:
        raise RuntimeError(
            f"{what}: expected every MoE layer routed by the context exactly once per forward, "
            f"got {'; '.join(problems)}"
        )
