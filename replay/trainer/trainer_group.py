"""The trainer's Ray actors: a ``TrainerWorker`` (a ``Learner``) per trainer rank, and their
driver-side handle ``TrainerGroup`` (``start_trainer`` builds one).

A trainer of ``trainer.world_size`` N > 1 is N ``TrainerWorker`` actors, one GPU each, in
one process group (rank 0 publishes its address and a free port through Ray); the policy is
sharded with FSDP2 and ``TrainerGroup`` sends every call to all ranks. The ranks sit in bundles
of a placement group (``replay.trainer.placement``): the caller's, or their own.

A step's batch reaches the ranks through the object store, without its routing; the routing
comes as the rollout workers' own objects (``Rollout.routing``), which each rank reads on its
node (``replay.trainer.routing_transfer``). Weights go back to the rollout workers by
``trainer.weight_sync`` (``RolloutWorkers.update_weights``, two-phase).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from replay.trainer import distributed
from replay.trainer.actors import WorkerInfo, actor_name, gather
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, RoutingMode, TrainerConfig
from replay.trainer.learner import Learner
from replay.trainer.placement import Placement, trainer_actor_group
from replay.trainer.routing_transfer import attach_routing
from replay.trainer.weight_sync import SharedCudaTensors, share_cuda_tensors

if TYPE_CHECKING:
    from replay.trainer.workers import RolloutWorkers

__all__ = ["TrainerGroup", "TrainerWorker", "start_trainer"]


class TrainerWorker:
    """One trainer rank's actor body: a ``Learner`` (see its arguments), built by ``start``.

    Two phases, because the ranks of a process group need rank 0's address before any of them
    can join: rank 0's ``address()`` picks it, then every rank's ``start`` joins the group
    (``trainer.world_size`` > 1) and builds its ``Learner``. ``TrainerGroup`` does this.

    Args:
        model_path: the policy checkpoint folder.
        rank: this worker's trainer rank.
        learner_kwargs: ``Learner`` keyword arguments (``trainer``, ``grpo``, ``routing``, ...).
    """

    def __init__(self, model_path: str, *, rank: int = 0, **learner_kwargs: Any) -> None:
        self.model_path = model_path
        self.rank = rank
        self.learner_kwargs = learner_kwargs
        self.learner: Learner | None = None
        # GPU tensors whose CUDA IPC handles are out (``share_weights``): kept alive until
        # ``release_weights``, after every rollout worker has closed them.
        self._shared: dict[str, torch.Tensor] | None = None

    def info(self) -> WorkerInfo:
        """Where this rank runs."""
        return WorkerInfo.here()

    def address(self) -> tuple[str, int]:
        """This node's IP address and a free port on it: the process group's rendezvous."""
        return ray.util.get_node_ip_address(), distributed.free_port()

    def start(self, master_addr: str | None = None, master_port: int | None = None) -> None:
        """Join the process group at rank 0's address (several ranks), build the ``Learner``."""
        trainer: TrainerConfig = self.learner_kwargs["trainer"]
        if trainer.world_size > 1:
            if master_addr is None or master_port is None:
                raise ValueError(
                    f"master_addr, master_port: expected rank 0's address with world_size "
                    f"{trainer.world_size}, got {master_addr!r}, {master_port!r}"
                )
            distributed.init_process_group(
                rank=self.rank,
                world_size=trainer.world_size,
                master_addr=master_addr,
                master_port=master_port,
                device=trainer.device,
            )
        self.learner = Learner(self.model_path, **self.learner_kwargs)

    def step(
        self,
        batch: Batch,
        advantages: np.ndarray,
        routing: Sequence[ray.ObjectRef] | None = None,
    ) -> dict[str, Any]:
        """One GRPO update; its metrics. ``routing``: the rollout's ``WorkerRouting`` objects
        (``Rollout.routing``), read here from the object store of this rank's node."""
        if routing is not None:
            batch = attach_routing(batch, ray.get(list(routing)))
        return self.learner.step(batch, advantages)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's parameters (CPU copies by HF name; empty on ranks other than 0)."""
        return self.learner.named_weights()

    def share_weights(self) -> SharedCudaTensors | None:
        """CUDA IPC handles of the policy's parameters on the GPU (rank 0; None elsewhere);
        they stay valid until ``release_weights``."""
        if self._shared is not None:
            raise RuntimeError(
                "share_weights: expected the previous shared weights released, got them still out"
            )
        weights = self.learner.device_weights()
        if not weights:
            return None
        self._shared = weights
        return share_cuda_tensors(weights)

    def release_weights(self) -> None:
        """Drop the tensors of ``share_weights`` (every rollout worker has closed them)."""
        self._shared = None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def save(self, folder: str) -> None:
        """Checkpoint into ``folder`` (``Learner.save``)."""
        self.learner.save(folder)

    def load_state(self, folder: str) -> None:
        """Restore optimizer, step and RNG (``Learner.load_state``)."""
        self.learner.load_state(folder)

    def moe_layers(self) -> tuple[int, ...]:
        """The policy's MoE layers (to check against the engine's)."""
        return self.learner.ctl.moe_layers


class TrainerGroup:
    """The trainer's ranks: ``trainer.world_size`` ``TrainerWorker`` actors of
    ``trainer.num_gpus`` / ``trainer.num_cpus`` each (``ray.init`` first; ``start_trainer``
    builds one). Every call goes to all ranks, since the ranks' collectives need each of
    them, and returns rank 0's result; a rank that dies fails the call with
    ``WorkerDiedError`` naming it.

    Args:
        model_path: the policy checkpoint folder.
        trainer: the trainer section (ranks, resources, weight sync).
        placement: a reserved ``Placement`` holding the ranks' bundles; None: reserve one for
            the ranks alone, waiting up to ``placement_timeout_s``.
        learner_kwargs: further ``Learner`` keyword arguments.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        trainer: TrainerConfig,
        placement: Placement | None = None,
        placement_timeout_s: float = 120.0,
        **learner_kwargs: Any,
    ):
        self.config = trainer
        self._own_placement = placement is None
        group = trainer_actor_group(trainer)
        self._placement = Placement.for_group(group, placement, timeout_s=placement_timeout_s)
        self._actors: list[Any] = []
        self.infos: list[WorkerInfo] = []
        try:
            for rank in range(trainer.world_size):
                actor = ray.remote(TrainerWorker).options(
                    **self._placement.actor_options("trainer", rank)
                )
                self._actors.append(
                    actor.remote(str(model_path), rank=rank, trainer=trainer, **learner_kwargs)
                )
            self.infos = self._on_all("info")
            master: tuple[str | None, int | None] = (None, None)
            if trainer.world_size > 1:
                master = ray.get(self._actors[0].address.remote())
            self._on_all("start", *master)
        except BaseException:
            self.shutdown()
            raise

    @property
    def world_size(self) -> int:
        return len(self._actors)

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        refs = [getattr(actor, method).remote(*args) for actor in self._actors]
        names = [actor_name("trainer rank", r, self.infos) for r in range(len(refs))]
        return gather(refs, names, method)

    def step(
        self,
        batch: Batch,
        advantages: np.ndarray,
        routing: Sequence[ray.ObjectRef] | None = None,
    ) -> dict[str, Any]:
        """One GRPO update on every rank (each takes its share of ``batch``); the metrics.
        ``routing``: the rollout's routing objects (``Rollout.routing``) when ``batch`` has no
        traces; every rank reads them from the object store on its own node."""
        batch_ref = ray.put(batch)
        return self._on_all("step", batch_ref, advantages, routing)[0]

    def named_weights(self) -> ray.ObjectRef:
        """An ObjectRef to rank 0's ``Learner.named_weights`` (HF-named CPU tensors), for
        ``RolloutWorkers.update_weights``; returns once every rank has gathered them."""
        refs = [actor.named_weights.remote() for actor in self._actors]
        ray.get(refs[1:])
        return refs[0]

    def push_weights(self, workers: RolloutWorkers) -> None:
        """Send the policy's weights into every rollout worker's engine, by
        ``trainer.weight_sync``; returns once every worker has them."""
        if self.config.weight_sync == "object_store":
            workers.update_weights(self.named_weights())
            return
        refs = [actor.share_weights.remote() for actor in self._actors]
        try:
            # Every worker has copied and closed the tensors when this returns.
            workers.update_weights(refs[0])
        finally:
            self._on_all("release_weights")

    def save(self, folder: str | Path) -> None:
        """Checkpoint into ``folder`` (``Learner.save``; rank 0 writes)."""
        self._on_all("save", str(folder))

    def load_state(self, folder: str | Path) -> None:
        """Restore optimizer, step and RNG on every rank (``Learner.load_state``)."""
        self._on_all("load_state", str(folder))

    def moe_layers(self) -> tuple[int, ...]:
        """The policy's MoE layers (to check against the engine's)."""
        return tuple(ray.get(self._actors[0].moe_layers.remote()))

    def shutdown(self) -> None:
        """End the actors and release an own placement (idempotent)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._own_placement:
            self._placement.remove()


def start_trainer(
    model_path: str | Path,
    *,
    trainer: TrainerConfig,
    grpo: GRPOConfig,
    routing: RoutingMode,
    seed: int,
    reference_path: str | Path | None = None,
    native_router_agreement: bool = True,
    policy_dtype: str = "auto",
    deterministic: bool = False,
    placement: Placement | None = None,
) -> TrainerGroup:
    """Start the trainer's ``trainer.world_size`` ranks, each a ``TrainerWorker`` actor with
    ``trainer.num_gpus`` / ``trainer.num_cpus`` (in ``placement``'s bundles, else in a
    placement of their own), and build their ``Learner`` (``policy_dtype`` and
    ``deterministic``: the rollout's, for ``trainer.policy: engine``)."""
    return TrainerGroup(
        model_path,
        trainer=trainer,
        placement=placement,
        grpo=grpo,
        routing=routing,
        seed=seed,
        reference_path=None if reference_path is None else str(reference_path),
        native_router_agreement=native_router_agreement,
        policy_dtype=policy_dtype,
        deterministic=deterministic,
    )
