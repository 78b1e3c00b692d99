"""The rollout workers: a ``RolloutWorker`` Ray actor (one ``rollout.LLM``) per data-parallel
rank, and their driver-side handle ``RolloutWorkers``, which the training-loop API is built on
(the trainer's actors: ``replay.trainer.trainer_group``).

Ray stays in ``replay.trainer``: ``RolloutWorker`` and ``Learner`` are plain classes, made into
actors by ``ray.remote(...).options(...)`` when started, so they run and test without Ray.

Placement: every actor is pinned to a bundle of a Ray placement group reserved before any of
them starts (``replay.trainer.placement``), so a request the cluster cannot hold fails at once
with what is missing instead of waiting forever. ``RolloutWorkers`` and ``TrainerGroup``
reserve their own unless the caller passes one (``GRPOTrainer`` reserves one for both).
A worker may itself hold several engine ranks (``data_parallel_size``).

Several workers: ``generate`` splits the prompts into contiguous shares, one per worker, and
reassembles the answers in prompt order; a request's tokens and routing rows are those one
engine gives it (its sampling seed travels with it). A worker's routing comes back as one
object of its own, which the driver passes on to the trainer unread
(``replay.trainer.routing_transfer``). A worker that dies fails the call with
``WorkerDiedError`` naming it, and the group refuses further work.

Weight sync goes through Ray's object store: the trainer's (or the user's) named tensors are put
there once, as CPU tensors, and every rollout worker copies them into its engine with
``LLM.update_weights`` (HF parameter names), checking that they wrote every parameter of its
engine. With ``trainer.weight_sync: cuda_ipc`` (workers on the trainer's GPU) the trainer sends
CUDA IPC handles of its GPU tensors instead (``replay.trainer.weight_sync``). A sync is
two-phase, so that a worker lost on the way leaves nothing half-applied: every worker first
receives the weights (``stage_weights``: the transfer, where a lost worker or object shows);
only once every worker has acknowledged do they copy them into their engines
(``commit_weights``) and the group's ``weights_version`` advances. A failure while receiving
leaves every engine on the previous version (the others drop what they received); a failure
while applying (a worker dying mid-copy, or tensors that do not cover the engine) leaves engines
that may differ, so the group refuses any further call: restart from the last checkpoint.

One GPU shared by the trainer and a rollout worker: give each a fraction of it (``0.5``
each). With ``rollout.release_kv_while_training`` the loop puts the workers to sleep after each
rollout (``rollout.LLM.sleep``: KV cache, CUDA graphs and attention workspaces go back to the
device), pushes the new weights into the sleeping engines and wakes them before the next
rollout. The weights stay resident and the KV cache is sized once, at start: fix it with
``kv_cache_blocks`` (or a lower ``gpu_memory_utilization``) to fit beside the trainer's memory
at rest (weights, optimizer state); the trainer's activations use what the cache gives back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import ray
import torch

import rollout
from replay.trainer.actors import WorkerDiedError, WorkerInfo, actor_name, gather
from replay.trainer.batch import Batch
from replay.trainer.config import RolloutConfig
from replay.trainer.placement import ActorGroup, Placement
from replay.trainer.routing_transfer import (
    NodeReaderSpecs,
    WorkerRouting,
    attach_routing,
    split_routing,
)
from replay.trainer.weight_sync import SharedCudaTensors, open_cuda_tensors

__all__ = ["Rollout", "RolloutWorker", "RolloutWorkers"]

Prompt = str | Sequence[int]
WeightsLike = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class RolloutWorker:
    """One data-parallel rollout rank: a ``rollout.LLM`` (the body of a Ray actor).

    Args:
        model_path: the checkpoint folder.
        rank: this worker's data-parallel rank (offsets the engine seed).
        seed: base seed of the engines.
        llm_kwargs: further ``rollout.LLM`` keyword arguments.
    """

    def __init__(
        self, model_path: str, *, rank: int, seed: int, llm_kwargs: dict[str, Any]
    ) -> None:
        self.rank = rank
        self.llm = rollout.LLM(model_path, seed=seed + rank, **llm_kwargs)
        # The engine's own parameter names: what a full weight sync must write.
        self._parameters = set(self.llm.parameter_names)
        # The version of the weights in the engine, and received ones not yet applied.
        self._version = 0
        self._staged: tuple[int, dict[str, torch.Tensor] | SharedCudaTensors] | None = None

    def info(self) -> WorkerInfo:
        """Where this worker runs."""
        return WorkerInfo.here()

    def weights_version(self) -> int:
        """The version of the weights in the engine (0: as loaded; each commit sets it)."""
        return self._version

    def routing_spec(self) -> rollout.RoutingSpec:
        """The engine's MoE layers, experts, top-k and routing method."""
        return self.llm.routing_spec

    def routing_readers(self) -> NodeReaderSpecs:
        """The engine's routing stores (empty without ``capture_routing``) and their node, for
        ``open_routing_readers``."""
        node = ray.get_runtime_context().get_node_id()
        return NodeReaderSpecs(node_id=node, specs=self.llm.routing_reader_specs)

    def generate(
        self, prompts: list[Prompt], sampling: list[rollout.SamplingParams]
    ) -> list[rollout.RequestOutput]:
        """``LLM.generate`` without a progress bar."""
        return self.llm.generate(prompts, sampling, use_tqdm=False)

    def generate_split(
        self, prompts: list[Prompt], sampling: list[rollout.SamplingParams]
    ) -> tuple[list[rollout.RequestOutput], WorkerRouting | None]:
        """``generate``, its routing split off (``split_routing``): call it with
        ``num_returns=2`` so that the routing becomes an object of its own."""
        return split_routing(self.generate(prompts, sampling), self.llm.routing_spec)

    def sleep(self) -> None:
        """Release the engine's KV cache, CUDA graphs and attention workspaces
        (``LLM.sleep``); a no-op when asleep."""
        self.llm.sleep()

    def wake_up(self) -> None:
        """Rebuild what ``sleep`` released (``LLM.wake_up``); a no-op when awake."""
        self.llm.wake_up()

    def is_sleeping(self) -> bool:
        """Whether the engine is asleep."""
        return self.llm.is_sleeping

    def stage_weights(
        self, weights: dict[str, torch.Tensor] | SharedCudaTensors, version: int
    ) -> int:
        """Receive weights (HF-named tensors, or the trainer's tensors shared by CUDA IPC) as
        ``version`` without touching the engine (phase one of a sync); returns how many."""
        if not isinstance(weights, (dict, SharedCudaTensors)):
            raise TypeError(
                f"weights: expected a dict of tensors or SharedCudaTensors, got "
                f"{type(weights).__name__}"
            )
        self._staged = (version, weights)
        return len(weights)

    def discard_weights(self) -> None:
        """Drop received weights that will not be applied (another worker failed)."""
        self._staged = None

    def commit_weights(self, version: int, require_all: bool = True) -> int:
        """Copy the weights received as ``version`` into the engine (asleep or awake; phase two
        of a sync); returns the number of engine parameters written. With ``require_all``,
        ValueError unless every parameter was written."""
        if self._staged is None or self._staged[0] != version:
            raise RuntimeError(
                f"commit_weights: expected staged weights of version {version}, got "
                f"{None if self._staged is None else self._staged[0]}"
            )
        weights = self._staged[1]
        self._staged = None
        if isinstance(weights, SharedCudaTensors):
            with open_cuda_tensors(weights) as tensors:
                written = self.llm.update_weights(tensors.items())
        else:
            written = self.llm.update_weights(weights.items())
        missing = self._parameters - written
        if require_all and missing:
            raise ValueError(
                f"weights: expected tensors for every engine parameter, got none (or only part) "
                f"for {len(missing)} of {len(self._parameters)}: {sorted(missing)[:5]}"
            )
        self._version = version
        return len(written)

    def update_weights(
        self,
        weights: dict[str, torch.Tensor] | SharedCudaTensors,
        require_all: bool = True,
    ) -> int:
        """Both phases at once (one worker in this process): ``commit_weights`` of
        ``weights`` as the next version."""
        self.stage_weights(weights, self._version + 1)
        return self.commit_weights(self._version + 1, require_all)

    def shutdown(self) -> None:
        """Release the engine."""
        self.llm.shutdown()


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class Rollout:
    """A rollout's answers (``batch``, without traces) and its routing as ObjectRefs to one
    ``WorkerRouting`` per worker that served answers, in answer order (None without routing):
    hand both to ``TrainerGroup.step``, or ``attach_routing(batch, ray.get(routing))``."""

    batch: Batch
    routing: tuple[ray.ObjectRef, ...] | None


class RolloutWorkers:
    """A group of ``RolloutWorker`` Ray actors, one per data-parallel rank (``ray.init`` first).

    ``generate`` splits the prompts into contiguous shares, one per worker, and returns one
    ``Batch`` in prompt order (``rollout``: the same with the routing left in the object
    store); ``update_weights`` pushes new weights to every worker (two-phase, see the module
    docstring); ``sleep`` / ``wake_up`` release and rebuild every engine's KV cache (a trainer
    sharing the GPU). After a worker died or a sync failed half-way every call raises.

    Args:
        model_path: the checkpoint folder every engine loads.
        num_workers: data-parallel ranks.
        num_gpus_per_worker: Ray GPUs of each worker (0 on CPU).
        num_cpus_per_worker: Ray CPUs of each worker.
        node_resource: a custom resource pinning the workers to the nodes started with it.
        seed: base seed of the engines (rank ``r`` gets ``seed + r``).
        placement: a reserved ``Placement`` holding the workers' bundles (its rollout group
            must match the arguments); None: reserve one for the workers alone, waiting up to
            ``placement_timeout_s`` for resources in use.
        llm_kwargs: ``rollout.LLM`` keyword arguments (``device``, ``dtype``,
            ``capture_routing``, ``kv_cache_blocks``, ``data_parallel_size``, ...).

    Raises:
        PlacementError: the cluster cannot hold the workers.
        WorkerDiedError: a worker failed to start, naming it.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        num_workers: int = 1,
        num_gpus_per_worker: float = 0.0,
        num_cpus_per_worker: float = 1.0,
        node_resource: str | None = None,
        seed: int = 0,
        placement: Placement | None = None,
        placement_timeout_s: float = 120.0,
        **llm_kwargs: Any,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
        group = ActorGroup(
            role="rollout",
            count=num_workers,
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
            node_resource=node_resource,
        )
        self._own_placement = placement is None
        self._placement = Placement.for_group(group, placement, timeout_s=placement_timeout_s)
        self._actors: list[Any] = []
        self._failure: str | None = None
        self.infos: list[WorkerInfo] = []
        self.weights_version = 0
        try:
            for rank in range(num_workers):
                actor = ray.remote(RolloutWorker).options(
                    **self._placement.actor_options("rollout", rank)
                )
                self._actors.append(
                    actor.remote(str(model_path), rank=rank, seed=seed, llm_kwargs=llm_kwargs)
                )
            self.infos = self._gather([actor.info.remote() for actor in self._actors], "start")
            self.routing_spec: rollout.RoutingSpec = ray.get(self._actors[0].routing_spec.remote())
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_config(
        cls,
        model_path: str | Path,
        config: RolloutConfig,
        *,
        seed: int = 0,
        placement: Placement | None = None,
    ) -> RolloutWorkers:
        """Workers as ``config`` (a ``TrainConfig.rollout`` section) describes."""
        return cls(
            model_path,
            num_workers=config.num_workers,
            num_gpus_per_worker=config.num_gpus_per_worker,
            num_cpus_per_worker=config.num_cpus_per_worker,
            node_resource=config.node_resource,
            seed=seed,
            placement=placement,
            **config.llm_kwargs(),
        )

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    def _gather(
        self, refs: Sequence[ray.ObjectRef], what: str, ranks: Sequence[int] | None = None
    ) -> list[Any]:
        """``ray.get`` of one call per worker of ``ranks`` (default: all, in rank order),
        failing at the first dead worker (and refusing every later call)."""
        if self._failure is not None:
            raise RuntimeError(f"rollout workers: unusable since {self._failure}")
        ranks = range(len(refs)) if ranks is None else ranks
        try:
            names = [actor_name("rollout worker", r, self.infos) for r in ranks]
            return gather(refs, names, what)
        except WorkerDiedError as err:
            self._failure = str(err)
            raise

    def rollout(
        self,
        prompts: Sequence[Prompt],
        sampling: rollout.SamplingParams | Sequence[rollout.SamplingParams],
    ) -> Rollout:
        """Generate for every prompt (strings or token-id lists) across the workers.

        ``sampling`` is one ``SamplingParams`` for all or one per prompt. The answers come back
        in prompt order; their routing (``return_routed_experts``, on all requests or none)
        stays in the object store, one ``WorkerRouting`` per worker.
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got none")
        if isinstance(sampling, rollout.SamplingParams):
            params = [sampling] * len(prompts)
        else:
            params = list(sampling)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling: expected one SamplingParams per prompt ({len(prompts)}), "
                    f"got {len(params)}"
                )
        asks = [p.return_routed_experts for p in params]
        if any(asks) and not all(asks):
            first = asks.index(not asks[0])
            raise ValueError(
                f"sampling[{first}].return_routed_experts: expected {asks[0]} like "
                f"sampling[0] (routing for every answer or none), got {asks[first]}"
            )
        shares = [s for s in np.array_split(np.arange(len(prompts)), self.num_workers)]
        ranks = [rank for rank, share in enumerate(shares) if len(share)]
        calls = [
            self._actors[rank]
            .generate_split.options(num_returns=2)
            .remote([prompts[i] for i in shares[rank]], [params[i] for i in shares[rank]])
            for rank in ranks
        ]
        answers = self._gather([outputs for outputs, _ in calls], "generate", ranks)
        batch = Batch.from_outputs([out for outs in answers for out in outs])
        return Rollout(batch=batch, routing=tuple(r for _, r in calls) if asks[0] else None)

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: rollout.SamplingParams | Sequence[rollout.SamplingParams],
    ) -> Batch:
        """``rollout`` with the routing fetched to this process: one ``Batch`` in prompt order,
        with traces when the engines capture routing and the params ask for it."""
        result = self.rollout(prompts, sampling)
        if result.routing is None:
            return result.batch
        return attach_routing(result.batch, ray.get(list(result.routing)))

    def update_weights(
        self,
        weights: WeightsLike | SharedCudaTensors | ray.ObjectRef,
        *,
        require_all: bool = True,
    ) -> None:
        """Push HF-named tensors (a ``state_dict``, ``named_parameters()``, CUDA IPC handles
        of them, or an ObjectRef to a dict of them or to handles, e.g.
        ``TrainerGroup.named_weights()``) to every worker, two-phase (module docstring);
        returns once every worker has applied them.

        With ``require_all``, each worker raises unless every engine parameter was written.
        """
        if not isinstance(weights, (ray.ObjectRef, SharedCudaTensors)):
            items = weights.items() if isinstance(weights, Mapping) else weights
            weights = ray.put({name: tensor.detach().to("cpu") for name, tensor in items})
        version = self.weights_version + 1
        try:
            self._gather(
                [actor.stage_weights.remote(weights, version) for actor in self._actors],
                f"weight sync {version} (receiving; no engine changed)",
            )
        except BaseException:
            for actor in self._actors:  # the living drop what they received; the dead ignore it
                actor.discard_weights.remote()
            raise
        try:
            self._gather(
                [actor.commit_weights.remote(version, require_all) for actor in self._actors],
                f"weight sync {version} (applying)",
            )
        except BaseException as err:
            self._failure = self._failure or (
                f"weight sync {version} failed while applying (the engines may hold different "
                f"weights): {err}"
            )
            raise
        self.weights_version = version

    def weights_versions(self) -> list[int]:
        """The version of the weights in each worker's engine, in rank order (0: as loaded;
        ``weights_version`` after a complete sync)."""
        return self._gather([a.weights_version.remote() for a in self._actors], "weights_versions")

    def routing_readers(self) -> list[NodeReaderSpecs]:
        """Each worker's routing stores and their node, in rank order (``open_routing_readers``
        attaches to them from a process on that node)."""
        return self._gather([a.routing_readers.remote() for a in self._actors], "routing_readers")

    def sleep(self) -> None:
        """Put every worker's engine to sleep (``LLM.sleep``); weights can still be pushed."""
        self._gather([actor.sleep.remote() for actor in self._actors], "sleep")

    def wake_up(self) -> None:
        """Wake every worker's engine (``LLM.wake_up``) before the next ``generate``."""
        self._gather([actor.wake_up.remote() for actor in self._actors], "wake_up")

    def is_sleeping(self) -> list[bool]:
        """Whether each worker's engine is asleep, in rank order."""
        return self._gather([actor.is_sleeping.remote() for actor in self._actors], "is_sleeping")

    def shutdown(self) -> None:
        """Release every engine, end the actors and release an own placement (idempotent; a
        dead worker is skipped)."""
        if self._actors:
            for ref in [actor.shutdown.remote() for actor in self._actors]:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    pass  # already gone: nothing of its engine is left to release
            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
        if self._own_placement:
            self._placement.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
