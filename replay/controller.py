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

The modes' contexts and the per-forward bindings live in ``replay.contexts``, what is installed
on the routers in ``replay.router_seam``.

Legend: T tokens of the batch (flat, batch * seq_len), E experts, K top_k, L MoE layers.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from replay.contexts import (
    Binding,
    Mode,
    NativeBinding,
    RecordContext,
    ReplayContext,
    ReplayForward,
)
from replay.discovery import MoELayer, MoEStructure, RoutingSpec
from replay.forward_layout import LayoutInputs, read_forward_inputs
from replay.layout import BatchLayout, align_traces
from replay.routed_experts import RoutedExperts
from replay.router_seam import OutputMarker, RouterSeam

__all__ = ["Mode", "RecordContext", "ReplayContext", "ReplayController"]

logger = logging.getLogger(__name__)


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
        self._forward: Binding | None = None
        # True when routers must consult the controller (their seams are installed): a mode
        # other than OFF, or replayed forwards whose outputs (so possible recomputes) are alive.
        self._engaged = False
        self._pending_replays = 0
        # Autograd graph task id -> bindings of the forwards whose outputs it differentiates.
        self._task_bindings: dict[int, list[Binding]] = {}
        self._native = NativeBinding()
        # Per instance: the class (and every other model) keeps its own forward.
        self._seams = tuple(
            RouterSeam(self, position, layer.router)
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

    def _recompute_binding(self, task: int, position: int) -> Binding:
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
        marker = OutputMarker(self, binding)
        for tensor in tensors:
            tensor.register_hook(marker)
        if isinstance(binding, ReplayForward):
            self._pending_replays += 1
            weakref.finalize(marker, self._release_replay)
            self._refresh_engaged()

    def _note_backward(self, binding: Binding) -> None:
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


# ---------------------------------------------------------------------- helpers

_NO_GRAPH_TASK = -1

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
