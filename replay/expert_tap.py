"""``ExpertsTap``: the expert ids each MoE layer's experts module actually received in a forward.

The trainer's router-agreement metric compares the rollout's routing with the routing the
training forward *used*: native under ``none``, the replayed trace under ``r3``, the recorded
routing under ``r2``. Reading the ids at the experts modules' input measures that directly,
whatever the routing mode, so an alignment bug in replay shows up as agreement below 1.

Legend: T flat tokens of the batch, K top_k, L MoE layers.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import torch

from replay.controller import ReplayController
from replay.layout import BatchLayout, traces_from_aligned
from replay.routed_experts import RoutedExperts

__all__ = ["ExpertsTap"]

# Names HF transformers experts modules give their ids argument when it is passed by keyword.
_IDS_KWARGS = ("top_k_index", "topk_indices", "top_k_indices", "selected_experts")


class ExpertsTap:
    """Context manager: forward pre-hooks on the experts modules of ``controller``'s layers
    keep the ids of the one forward run inside (recomputes in a later backward are not seen:
    the hooks are gone by then).

    ``traces(layout)`` cuts them into one ``RoutedExperts`` per sequence (start 0).
    """

    def __init__(self, controller: ReplayController) -> None:
        self._controller = controller
        self._ids_LTK: list[torch.Tensor | None] = [None] * len(controller.layers)
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for position, layer in enumerate(self._controller.layers):
            hook = _Hook(self, position)
            self._handles.append(layer.experts.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keep(self, position: int, ids_TK: torch.Tensor) -> None:
        if self._ids_LTK[position] is not None:
            layer = self._controller.layers[position]
            raise RuntimeError(
                f"ExpertsTap: expected one forward inside the context, got a second call of "
                f"{layer.name}.experts"
            )
        self._ids_LTK[position] = ids_TK.detach()

    def traces(self, layout: BatchLayout) -> list[RoutedExperts]:
        """One trace per sequence of ``layout`` of the ids the experts received."""
        missing = [
            self._controller.layers[i].name for i, ids in enumerate(self._ids_LTK) if ids is None
        ]
        if missing:
            raise RuntimeError(
                f"ExpertsTap: expected every MoE layer's experts called, not {missing}"
            )
        return traces_from_aligned(
            torch.stack(self._ids_LTK),  # type: ignore[arg-type]
            layout,
            moe_layers=self._controller.moe_layers,
            num_experts=self._controller.num_experts,
        )


class _Hook:
    """Forward pre-hook of one experts module: hands its ids argument to the tap."""

    __slots__ = ("position", "tap")

    def __init__(self, tap: ExpertsTap, position: int) -> None:
        self.tap = tap
        self.position = position

    def __call__(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if len(args) > 1:
            ids = args[1]
        else:
            found = [kwargs[name] for name in _IDS_KWARGS if name in kwargs]
            if not found:
                layer = self.tap._controller.layers[self.position]
                raise RuntimeError(
                    f"{layer.name}.experts: expected the expert ids as the second positional "
                    f"argument or one of {list(_IDS_KWARGS)}, got keywords {sorted(kwargs)}"
                )
            ids = found[0]
        self.tap._keep(self.position, ids)
