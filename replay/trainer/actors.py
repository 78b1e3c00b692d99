"""Calls on a group of Ray actors: where each actor runs, and ``gather``, which waits for one
call per actor and names the actor that died (``WorkerDiedError``) or raised.

A dead actor shows at once, not after the others finish: a step fails with the worker's name,
node and process id instead of a bare ``RayActorError`` (or a hang).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

__all__ = ["WorkerDiedError", "WorkerInfo", "actor_name", "gather"]


class WorkerDiedError(RuntimeError):
    """An actor of the run died (its process exited or was killed) during a call; the message
    names the actor, its node and process, and the call."""


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """Where an actor runs: its Ray node id, that node's IP address and its process id."""

    node_id: str
    node_ip: str
    pid: int

    @classmethod
    def here(cls) -> WorkerInfo:
        """This process's (inside an actor)."""
        return cls(
            node_id=ray.get_runtime_context().get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
        )


def gather(refs: Sequence[ray.ObjectRef], names: Sequence[str], what: str) -> list[Any]:
    """``ray.get(refs)`` (one call per actor, ``names[i]`` the actor of ``refs[i]``), raising as
    soon as any actor is found dead rather than after the others finish.

    Raises:
        WorkerDiedError: an actor died, naming it and ``what``.
        the call's own exception: an actor's call raised, with a note naming the actor.
    """
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        (ready,), pending = ray.wait(pending, num_returns=1)
        i = index[ready]
        try:
            results[i] = ray.get(ready)
        except ray.exceptions.RayActorError as err:
            raise WorkerDiedError(f"{names[i]} died during {what}: {err}") from err
        except ray.exceptions.RayTaskError as err:
            err.add_note(f"raised by {names[i]} during {what}")
            raise
    return results


def actor_name(role: str, rank: int, infos: Sequence[WorkerInfo]) -> str:
    """``rollout worker 1 (node 3f2a... at 10.0.0.2, pid 4242)``; without its info, the role and
    rank only."""
    if rank >= len(infos):
        return f"{role} {rank}"
    info = infos[rank]
    return f"{role} {rank} (node {info.node_id[:12]} at {info.node_ip}, pid {info.pid})"
