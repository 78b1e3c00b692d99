"""Replay (R3) and record (R2) of MoE routing on one patched model: an explicit state machine.

States (``Mode``) and transitions, all through context managers of one ``ReplayController``:

    OFF --replay(traces)--> REPLAY --exit--> OFF
    OFF --record()--------> RECORD --exit--> OFF

Any other transition raises (contexts do not nest). The controller is attached to one model;
its state lives on it, never in a global, so two patched models never interfere.

The one seam is ``ReplayController.select_topk``: every patched router runs its own forward and
hands ``(logits, weights, ids)`` to it. The seam is installed on the router instances only while
the controller is engaged (a mode other than OFF, or a replayed forward whose outputs, and so a
possible recompute, are still alive); otherwise the routers are exactly as unpatched, so OFF
costs the routers nothing.

Binding routing to the forward, not to the context: each forward of the model gets a binding
chosen by the mode (native, replay, record). Activation checkpointing re-runs MoE layers inside
the backward, possibly after the ``with`` block has exited; such a recompute is recognised by
running inside an autograd graph task, and uses the binding of the forward whose outputs that
backward differentiates (hooks on every forward's outputs register it with the graph task).
One backward through several checkpointed forwards of the same model is ambiguous and raises
RuntimeError. A reentrant ``torch.utils.checkpoint`` around the *whole*
model is not supported (its forward runs without grad, so its outputs carry no hook): checkpoint
decoder layers (HF ``gradient_checkpointing_enable``) or use ``use_reentrant=False``.

Legend: T tokens of the batch (flat, batch * seq_len), E experts, K top_k, L MoE layers.
"""

from __future__ import annotations

import enum
import functools
import logging
import weakref
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from replay.discovery import MoELayer, MoEStructure, RoutingSpec
from replay.forward_layout import (
    ForwardInputs,
    LayoutInputs,
    check_forward_layout,
    read_forward_inputs,
)
from replay.layout import AlignedTraces, BatchLayout, align_traces, traces_from_aligned
from replay.routed_experts import RoutedExperts
from routing_kernels.replay_weights import replay_topk

__all__ = ["Mode", "RecordContext", "ReplayContext", "ReplayController"]

logger = logging.getLogger(__name__)


class Mode(enum.Enum):
    """What the patched routers do with their native top-k."""

    OFF = "off"  # native routing
    REPLAY = "replay"  # R3: the trace's ids, weights recomputed from the current logits
    RECORD = "record"  # R2: native routing, ids captured per forward


class ReplayController:
    """Replay and record state of one patched model; build it with ``replay.patch(model)``.

    Use ``with ctl.replay(traces, ...)`` to force the traces' experts in the forwards inside
    the block, ``with ctl.record(...) as rec`` to capture the routing of one forward.
    """

    def __init__(self, model: nn.Module, structure: MoEStructure) -> None:
        self._structure = structure
        self._mode = Mode.OFF
        self._context: ReplayContext | RecordContext | None = None
        # Binding of the model forward in progress; None between forwards.
        self._forward: _Binding | None = None
        # True when routers must consult the controller (their seams are installed): a mode
        # other than OFF, or replayed forwards whose outputs (so possible recomputes) are alive.
        self._engaged = False
        self._pending_replays = 0
        # Autograd graph task id -> bindings of the forwards whose outputs it differentiates.
        self._task_bindings: dict[int, list[_Binding]] = {}
        self._native = _NativeBinding()
        # Per instance: the class (and every other model) keeps its own forward.
        self._seams = tuple(
            _RouterSeam(self, position, layer.router)
            for position, layer in enumerate(structure.layers)
        )
        self._read_inputs = read_forward_inputs(model.forward)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, with_kwargs=True)

    # ------------------------------------------------------------------ description

    @property
    def mode(self) -> Mode:
        """The current state."""
        return self._mode

    @property
    def layers(self) -> tuple[MoELayer, ...]:
        """The patched MoE layers, in model order."""
        return self._structure.layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global decoder-layer indices of the MoE layers (what traces must carry)."""
        return self._structure.moe_layers

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        return self._structure.num_experts

    @property
    def top_k(self) -> int:
        """Experts chosen per token and MoE layer."""
        return self._structure.top_k

    @property
    def routing(self) -> RoutingSpec:
        """The routing method (and its parameters) replayed weights are computed with."""
        return self._structure.routing

    def __repr__(self) -> str:
        return (
            f"ReplayController(mode={self._mode.name}, moe_layers={list(self.moe_layers)}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"method={self.routing.method.name})"
        )

    # ------------------------------------------------------------------ contexts

    def replay(
        self,
        traces: Sequence[RoutedExperts],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> ReplayContext:
        """A context in which every forward replays ``traces`` (R3).

        Args:
            traces: one ``RoutedExperts`` per sequence of the batch: per batch row, or per
                packed sequence in order. Row ``r`` of a trace with start ``s`` is routed at
                token ``s + r`` of its sequence; other tokens (padding, the last token, tokens
                before ``s``, rows with ``valid`` False) route natively.
            attention_mask: ``[batch, seq_len]`` 0/1; one (right- or left-) padded sequence
                per row, or the padding of packed rows given with ``position_ids``.
            position_ids: ``[batch, seq_len]``: packed rows, a sequence starting wherever the
                position id is not the previous one plus one (e.g. restarts at 0).
            cu_seqlens: cumulative sequence lengths of one packed row (flash-attn varlen).

        Without a layout argument every row is one unpadded sequence, all of the length the
        traces imply. The traces are checked and aligned here, once (ValueError naming the
        sequence, the expected and the actual value). Each forward inside the block must have
        this batch shape and this layout by its own inputs (its ``attention_mask``,
        ``position_ids``, ``cu_seq_lens_q``; ``replay.forward_layout``), else ValueError naming
        what differs: traces aligned for one layout would route another's tokens.
        """
        layout = BatchLayout.from_inputs(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
        given = LayoutInputs.of(
            attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens
        )
        if layout is None:
            layout = _dense_layout_of(traces)
        aligned = align_traces(
            traces,
            layout,
            moe_layers=self.moe_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            device=self._device(),
        )
        return ReplayContext(self, aligned, layout, given)

    def record(
        self,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> RecordContext:
        """A context that captures the native routing of the one forward run inside it (R2).

        The layout arguments mean what they mean for ``replay``, and the forward must have that
        layout by its own inputs; without them the layout is the forward's own (its
        ``attention_mask``, ``position_ids``, ``cu_seq_lens_q``; else every row is one
        sequence of the forward's length). Recomputation in backward is ignored.
        """
        layout = BatchLayout.from_inputs(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
        given = LayoutInputs.of(
            attention_mask=attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens
        )
        return RecordContext(self, layout, given)

    # ------------------------------------------------------------------ the seam

    def select_topk(
        self,
        position: int,
        logits_TE: torch.Tensor,
        weights_TK: torch.Tensor,
        ids_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (weights, ids) MoE layer ``position`` hands to its experts, given its router's
        logits and native top-k: native, replayed or recorded, by the binding of the forward
        being run or recomputed."""
        task = _graph_task()
        if task == _NO_GRAPH_TASK:
            binding = self._forward
            if binding is None:
                if self._mode is not Mode.OFF:
                    layer = self._structure.layers[position]
                    raise RuntimeError(
                        f"MoE layer {layer.layer_index} ({layer.name}) ran outside a forward of "
                        f"the patched model in mode {self._mode.name}: call the model given to "
                        f"replay.patch, not one of its submodules"
                    )
                binding = self._native
            return binding.forward(position, logits_TE, weights_TK, ids_TK)
        return self._recompute_binding(task, position).recompute(
            position, logits_TE, weights_TK, ids_TK
        )

    def _recompute_binding(self, task: int, position: int) -> _Binding:
        bindings = self._task_bindings.get(task, ())
        if len(bindings) > 1:
            layer = self._structure.layers[position]
            raise RuntimeError(
                f"MoE layer {layer.layer_index} ({layer.name}) is recomputed (activation "
                f"checkpointing) in a backward through {len(bindings)} forwards of the model with "
                f"different routing bindings (replayed and/or native): the recompute cannot tell "
                f"which forward it belongs to; run backward once per forward"
            )
        # No binding: the recomputed forward's outputs carried no gradient when it ran, so no
        # forward of this model registered with this backward; it was not replayed.
        return bindings[0] if bindings else self._native

    # ------------------------------------------------------------------ model hooks

    def _before_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if _graph_task() != _NO_GRAPH_TASK:
            # A checkpoint recomputing the whole model: routing comes from the graph task.
            return
        if self._context is None:
            self._forward = self._native
        else:
            self._forward = self._context._new_forward(self._read_inputs(args, kwargs))

    def _after_forward(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if _graph_task() != _NO_GRAPH_TASK:
            return
        binding, self._forward = self._forward, None
        if binding is None or not torch.is_grad_enabled():
            return
        tensors = [t for t in _tensors_in(output) if t.grad_fn is not None]
        if not tensors:
            return
        marker = _OutputMarker(self, binding)
        for tensor in tensors:
            tensor.register_hook(marker)
        if isinstance(binding, _ReplayForward):
            self._pending_replays += 1
            weakref.finalize(marker, self._release_replay)
            self._refresh_engaged()

    def _note_backward(self, binding: _Binding) -> None:
        """A backward reached the outputs of ``binding``'s forward: recomputes in this graph
        task belong to it."""
        task = _graph_task()
        bindings = self._task_bindings.get(task)
        if bindings is None:
            bindings = self._task_bindings[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._task_bindings.pop, task, None)
            )
        if all(b is not binding for b in bindings):
            bindings.append(binding)

    def _release_replay(self) -> None:
        self._pending_replays -= 1
        self._refresh_engaged()

    # ------------------------------------------------------------------ transitions

    def _enter(self, mode: Mode, context: ReplayContext | RecordContext) -> None:
        if self._mode is not Mode.OFF:
            raise RuntimeError(
                f"mode: expected OFF to enter {mode.name}, got {self._mode.name} (replay and "
                f"record contexts do not nest)"
            )
        self._mode, self._context = mode, context
        self._refresh_engaged()
        logger.debug("enter %s", mode.name)

    def _exit(self, context: ReplayContext | RecordContext) -> None:
        assert self._context is context, "contexts exit in the order they entered"
        logger.debug("exit %s", self._mode.name)
        self._mode, self._context, self._forward = Mode.OFF, None, None
        self._refresh_engaged()

    def _refresh_engaged(self) -> None:
        engaged = self._mode is not Mode.OFF or self._pending_replays > 0
        if engaged is not self._engaged:
            self._engaged = engaged
            for seam in self._seams:
                seam.install() if engaged else seam.remove()

    def _device(self) -> torch.device:
        weight = self._structure.layers[0].router.weight
        return torch.device("cpu") if weight.is_meta else weight.device


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
        self._forwards: list[_ReplayForward] = []

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

    def _new_forward(self, inputs: ForwardInputs) -> _ReplayForward:
        _check_batch_shape(inputs.batch_shape, self._layout, "replay")
        check_forward_layout("replay", self._given, self._layout, inputs)
        forward = _ReplayForward(self, len(self._controller.layers))
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
        self._forward: _RecordForward | None = None
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

    def _new_forward(self, inputs: ForwardInputs) -> _RecordForward:
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
        self._forward = _RecordForward(len(self._controller.layers))
        return self._forward


# ---------------------------------------------------------------------- bindings


class _NativeBinding:
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


class _ReplayForward:
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


class _RecordForward:
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


_Binding = _NativeBinding | _ReplayForward | _RecordForward


# ---------------------------------------------------------------------- installed callables


class _RouterSeam:
    """The seam of one router instance: its own forward, then the controller's ``select_topk``.

    ``install`` sets it as the instance's ``forward`` (shadowing the class's, or a forward the
    instance already had), ``remove`` restores what was there. A callable object (not a
    closure) so that ``copy.deepcopy`` of a patched model yields an independently patched copy.
    """

    __slots__ = (
        "controller",
        "installed",
        "native_forward",
        "position",
        "previous",
        "router",
    )

    def __init__(self, controller: ReplayController, position: int, router: nn.Module) -> None:
        self.controller = controller
        self.position = position
        self.router = router
        self.installed = False
        self.native_forward: Any = None
        self.previous: Any = None
        # Marks the router as patched (replay.patch refuses to patch it a second time).
        router.__dict__[_SEAM_ATTR] = self

    def install(self) -> None:
        if self.installed:
            return
        router = self.router
        self.previous = router.__dict__.get("forward")
        self.native_forward = router.forward
        router.__dict__["forward"] = self
        self.installed = True

    def remove(self) -> None:
        router = self.router
        if not self.installed or router.__dict__.get("forward") is not self:
            # Not installed, or someone wrapped the seam since: it stays inside their wrapper
            # and passes the router output through while the controller is not engaged.
            return
        if self.previous is None:
            del router.__dict__["forward"]
        else:
            router.__dict__["forward"] = self.previous
        self.native_forward = self.previous = None
        self.installed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.native_forward(*args, **kwargs)
        controller = self.controller
        if not controller._engaged:
            return out
        logits_TE, weights_TK, ids_TK = out
        weights_TK, ids_TK = controller.select_topk(self.position, logits_TE, weights_TK, ids_TK)
        return logits_TE, weights_TK, ids_TK


class _OutputMarker:
    """Tensor hook on a forward's outputs: tells the controller which forward the running
    backward differentiates."""

    __slots__ = ("__weakref__", "binding", "controller")

    def __init__(self, controller: ReplayController, binding: _Binding) -> None:
        self.controller = controller
        self.binding = binding

    def __call__(self, grad: torch.Tensor) -> None:
        self.controller._note_backward(self.binding)


# ---------------------------------------------------------------------- helpers

_NO_GRAPH_TASK = -1
# The router attribute holding its seam (whether installed or not).
_SEAM_ATTR = "_routing_replay_seam"


# Id of the autograd graph task running on this thread, -1 outside backward. Activation
# checkpointing (reentrant or not) recomputes inside the backward, so this is how a recompute
# is told from a forward. Bound directly: it runs on every forward and routed layer.
_graph_task = torch._C._current_graph_task_id


def _tensors_in(output: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors requiring grad in a model output (ModelOutput, tuple, list, dict), two levels."""
    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            yield output
    elif depth < 2 and isinstance(output, dict):
        for value in output.values():
            yield from _tensors_in(value, depth + 1)
    elif depth < 2 and isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors_in(value, depth + 1)


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


def _dense_layout_of(traces: Sequence[RoutedExperts]) -> BatchLayout:
    """One unpadded sequence per row, of the length every trace implies (start + rows + 1)."""
    if isinstance(traces, RoutedExperts) or not isinstance(traces, Sequence):
        raise TypeError(
            f"traces: expected a list of RoutedExperts (one per sequence), got "
            f"{type(traces).__name__}"
        )
    for i, trace in enumerate(traces):
        if not isinstance(trace, RoutedExperts):
            raise TypeError(f"traces[{i}]: expected RoutedExperts, got {type(trace).__name__}")
    lengths = [trace.start + trace.num_rows + 1 for trace in traces]
    if not lengths or len(set(lengths)) != 1:
        raise ValueError(
            f"traces: without attention_mask, position_ids or cu_seqlens every row is one "
            f"sequence of the same length; expected traces implying one length (start + rows + "
            f"1), got lengths {lengths}"
        )
    return BatchLayout.dense(len(traces), lengths[0])
