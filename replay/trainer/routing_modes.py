"""The learner's routing modes (``TrainConfig.routing``), one strategy each: how the forwards of
an update route, and which passes the mode needs (``replay.trainer.learner`` runs them).

- ``none`` (``NativeRouting``): the policy routes natively.
- ``r3`` (``RolloutReplay``): every training forward replays the rollout's traces
  (``ctl.replay``); a batch without traces raises.
- ``r2`` (``RecordedReplay``): a no-grad forward of the policy as it is before the update
  records its own routing (``ctl.record``); the update's forwards replay that recording.

``routing_mode(name)`` gives the strategy of a mode's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from replay.controller import ReplayController
from replay.routed_experts import RoutedExperts
from replay.trainer.batch import Batch
from replay.trainer.config import RoutingMode
from replay.trainer.step_stats import Chunk

__all__ = ["NativeRouting", "RecordedReplay", "RolloutReplay", "RoutingStrategy", "routing_mode"]

# Runs the policy on a chunk (no grad) and returns its logprobs ``[B, S]``.
Forward = Callable[[], torch.Tensor]


class RoutingStrategy:
    """What a routing mode decides; the base routes natively everywhere.

    Attributes:
        name: the mode's name in the config.
        needs_old_pass: the update needs the pre-update policy's forward apart from its own
            (R2's recording), even with one minibatch.
        native_pass: the native routing for ``router_agreement_native`` needs a pass of its
            own (every other pass replays).
        update_is_native: the update's forward routes natively, so without an old pass the
            ids its experts receive are the pre-update policy's native routing.
    """

    name: ClassVar[RoutingMode]
    needs_old_pass: ClassVar[bool] = False
    native_pass: ClassVar[bool] = False
    update_is_native: ClassVar[bool] = False

    def rollout_traces(self, batch: Batch) -> tuple[RoutedExperts, ...] | None:
        """The rollout's traces of ``batch``, or None when it has none."""
        return batch.traces

    def old_pass(self, ctl: ReplayController, part: Chunk, forward: Forward) -> None:
        """The pre-update policy's forward of ``part``: sets ``part.logp_old`` and what the
        mode records. Here: native routing, recorded as ``part.native_traces``."""
        with ctl.record(attention_mask=part.tensors.attention_mask_BS) as rec:
            part.logp_old = forward()
        part.native_traces = rec.traces

    def update_routing(
        self, ctl: ReplayController, part: Chunk
    ) -> contextlib.AbstractContextManager[Any]:
        """The context the update's forward of ``part`` runs in."""
        return contextlib.nullcontext()


class NativeRouting(RoutingStrategy):
    """``none``: native routing in every pass."""

    name = "none"
    update_is_native = True


class RolloutReplay(RoutingStrategy):
    """``r3``: every forward of the policy replays the rollout's traces."""

    name = "r3"
    native_pass = True

    def rollout_traces(self, batch: Batch) -> tuple[RoutedExperts, ...]:
        return batch.require_traces("routing r3")

    def old_pass(self, ctl: ReplayController, part: Chunk, forward: Forward) -> None:
        with self.update_routing(ctl, part):
            part.logp_old = forward()

    def update_routing(
        self, ctl: ReplayController, part: Chunk
    ) -> contextlib.AbstractContextManager[Any]:
        assert part.rollout_traces is not None, "required by rollout_traces"
        return ctl.replay(part.rollout_traces, attention_mask=part.tensors.attention_mask_BS)


class RecordedReplay(RoutingStrategy):
    """``r2``: the old pass records the policy's native routing, the update replays it."""

    name = "r2"
    needs_old_pass = True

    def old_pass(self, ctl: ReplayController, part: Chunk, forward: Forward) -> None:
        super().old_pass(ctl, part, forward)
        part.replay_traces = part.native_traces

    def update_routing(
        self, ctl: ReplayController, part: Chunk
    ) -> contextlib.AbstractContextManager[Any]:
        assert part.replay_traces is not None, "set by the old pass"
        return ctl.replay(part.replay_traces, attention_mask=part.tensors.attention_mask_BS)


_STRATEGIES: dict[str, type[RoutingStrategy]] = {
    cls.name: cls for cls in (NativeRouting, RolloutReplay, RecordedReplay)
}


def routing_mode(name: str) -> RoutingStrategy:
    """The strategy of the routing mode ``name`` (``none``, ``r3`` or ``r2``).

    Raises:
        ValueError: another name.
    """
    if not isinstance(name, str) or name not in _STRATEGIES:
        raise ValueError(f"routing: expected one of {list(_STRATEGIES)}, got {name!r}")
    return _STRATEGIES[name]()
