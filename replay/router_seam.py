"""What ``replay.patch`` installs on each router instance of a patched model (``RouterSeam``),
and the hook that tells its controller which forward a running backward differentiates
(``OutputMarker``); see ``replay.controller``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from replay.contexts import Binding
    from replay.controller import ReplayController

__all__ = ["SEAM_ATTR", "OutputMarker", "RouterSeam"]

# The router attribute holding its seam (whether installed or not).
SEAM_ATTR = "_routing_replay_seam"


class RouterSeam:
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
        router.__dict__[SEAM_ATTR] = self

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


class OutputMarker:
    """Tensor hook on a forward's outputs: tells the controller which forward the running
    backward differentiates."""

    __slots__ = ("__weakref__", "binding", "controller")

    def __init__(self, controller: ReplayController, binding: Binding) -> None:
        self.controller = controller
        self.binding = binding

    def __call__(self, grad: torch.Tensor) -> None:
        self.controller._note_backward(self.binding)
