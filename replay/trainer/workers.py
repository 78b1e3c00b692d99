"""Ray actors of the trainer: rollout workers (one ``rollout.LLM`` per data-parallel rank) and
trainer workers (a ``Learner`` per trainer rank), plus their driver-side handles:
``RolloutWorkers``, which the training-loop API is built on, and ``TrainerGroup``.

Ray stays here and in ``loop``: ``RolloutWorker`` and ``Learner`` are plain classes, made into
actors by ``ray.remote(...).options(...)`` when started, so they run and test without Ray.

Weight sync goes through Ray's object store: the trainer's (or the user's) named tensors are
put there once, as CPU tensors, and every rollout worker reads them from it and copies them
into its engine with ``LLM.update_weights`` (HF parameter names). A worker checks that the
tensors wrote every parameter of its engine, so a partial sync never goes unnoticed. With
``trainer.weight_sync: cuda_ipc`` (workers on the trainer's GPU) the trainer sends CUDA IPC
handles of its GPU tensors instead (``replay.trainer.weight_sync``).

A trainer of ``trainer.world_size`` N > 1 is N ``TrainerWorker`` actors, one GPU each, in
one process group (rank 0 publishes its address and a free port through Ray); the policy is
sharded with FSDP2 and ``TrainerGroup`` sends every call to all ranks.

One GPU shared by the trainer and a rollout worker: give each a fraction of it
(``num_gpus_per_worker: 0.5``, ``trainer.num_gpus: 0.5``). With
``rollout.release_kv_while_training`` the loop puts the workers to sleep after each rollout
(``RolloutWorkers.sleep`` -> ``rollout.LLM.sleep``: KV cache, CUDA graphs and attention
workspaces go back to the device), pushes the new weights into the sleeping engines and wakes
them (same KV cache size, graphs captured again) before the next rollout. The engine's weights
stay resident, and its KV cache is sized once, when the engine starts: fix it with
``kv_cache_blocks`` (or a lower ``gpu_memory_utilization``) so that it fits beside the
trainer's memory at rest (weights, optimizer state); the trainer's activations then use the
memory the cache gives back during the update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import ray
import torch

import rollout
from replay.trainer import distributed
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, RolloutConfig, RoutingMode, TrainerConfig
from replay.trainer.learner import Learner
from replay.trainer.weight_sync import (
    SharedCudaTensors,
    open_cuda_tensors,
    share_cuda_tensors,
)

__all__ = [
    "RolloutWorker",
    "RolloutWorkers",
    "TrainerGroup",
    "TrainerWorker",
    "start_trainer",
]

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

    def routing_spec(self) -> rollout.RoutingSpec:
        """The engine's MoE layers, experts, top-k and routing method."""
        return self.llm.routing_spec

    def generate(
        self, prompts: list[Prompt], sampling: list[rollout.SamplingParams]
    ) -> list[rollout.RequestOutput]:
        """``LLM.generate`` without a progress bar."""
        return self.llm.generate(prompts, sampling, use_tqdm=False)

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

    def update_weights(
        self,
        weights: dict[str, torch.Tensor] | SharedCudaTensors,
        require_all: bool = True,
    ) -> int:
        """Copy HF-named tensors, or the trainer's tensors shared by CUDA IPC, into the engine
        (asleep or awake); returns the number of engine parameters written. With
        ``require_all``, ValueError unless every parameter was written."""
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
        return len(written)

    def shutdown(self) -> None:
        """Release the engine."""
        self.llm.shutdown()


class RolloutWorkers:
    """A group of ``RolloutWorker`` Ray actors, one per data-parallel rank (``ray.init`` first).

    ``generate`` splits the prompts into contiguous shares, one per worker, and returns one
    ``Batch`` in prompt order; ``update_weights`` pushes new weights to every worker;
    ``sleep`` / ``wake_up`` release and rebuild every engine's KV cache (a trainer sharing
    the GPU).

    Args:
        model_path: the checkpoint folder every engine loads.
        num_workers: data-parallel ranks.
        num_gpus_per_worker: Ray GPUs of each worker (0 on CPU).
        num_cpus_per_worker: Ray CPUs of each worker.
        seed: base seed of the engines (rank ``r`` gets ``seed + r``).
        llm_kwargs: ``rollout.LLM`` keyword arguments (``device``, ``dtype``,
            ``capture_routing``, ``kv_cache_blocks``, ...).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        num_workers: int = 1,
        num_gpus_per_worker: float = 0.0,
        num_cpus_per_worker: float = 1.0,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
        actor = ray.remote(RolloutWorker).options(
            num_gpus=num_gpus_per_worker, num_cpus=num_cpus_per_worker
        )
        self._actors = [
            actor.remote(str(model_path), rank=rank, seed=seed, llm_kwargs=llm_kwargs)
            for rank in range(num_workers)
        ]
        self.routing_spec: rollout.RoutingSpec = ray.get(self._actors[0].routing_spec.remote())

    @classmethod
    def from_config(
        cls, model_path: str | Path, config: RolloutConfig, *, seed: int = 0
    ) -> RolloutWorkers:
        """Workers as ``config`` (a ``TrainConfig.rollout`` section) describes."""
        return cls(
            model_path,
            num_workers=config.num_workers,
            num_gpus_per_worker=config.num_gpus_per_worker,
            num_cpus_per_worker=config.num_cpus_per_worker,
            seed=seed,
            **config.llm_kwargs(),
        )

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: rollout.SamplingParams | Sequence[rollout.SamplingParams],
    ) -> Batch:
        """Generate for every prompt (strings or token-id lists) across the workers.

        ``sampling`` is one ``SamplingParams`` for all or one per prompt. Answers come back in
        prompt order, with traces when the engines capture routing and the params ask for it.
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
        shares = np.array_split(np.arange(len(prompts)), self.num_workers)
        futures = [
            actor.generate.remote([prompts[i] for i in share], [params[i] for i in share])
            for actor, share in zip(self._actors, shares, strict=True)
            if len(share)
        ]
        outputs = [out for outs in ray.get(futures) for out in outs]
        return Batch.from_outputs(outputs, self.routing_spec)

    def update_weights(
        self,
        weights: WeightsLike | SharedCudaTensors | ray.ObjectRef,
        *,
        require_all: bool = True,
    ) -> None:
        """Push HF-named tensors (a ``state_dict``, ``named_parameters()``, CUDA IPC handles
        of them, or an ObjectRef to a dict of them or to handles, e.g.
        ``TrainerGroup.named_weights()``) to every worker; returns once every worker is done.

        With ``require_all``, each worker raises unless every engine parameter was written.
        """
        if not isinstance(weights, (ray.ObjectRef, SharedCudaTensors)):
            items = weights.items() if isinstance(weights, Mapping) else weights
            weights = ray.put({name: tensor.detach().to("cpu") for name, tensor in items})
        ray.get([actor.update_weights.remote(weights, require_all) for actor in self._actors])

    def sleep(self) -> None:
        """Put every worker's engine to sleep (``LLM.sleep``); weights can still be pushed."""
        ray.get([actor.sleep.remote() for actor in self._actors])

    def wake_up(self) -> None:
        """Wake every worker's engine (``LLM.wake_up``) before the next ``generate``."""
        ray.get([actor.wake_up.remote() for actor in self._actors])

    def is_sleeping(self) -> list[bool]:
        """Whether each worker's engine is asleep, in rank order."""
        return ray.get([actor.is_sleeping.remote() for actor in self._actors])

    def shutdown(self) -> None:
        """Release every engine and end the actors (idempotent)."""
        if not self._actors:
            return
        ray.get([actor.shutdown.remote() for actor in self._actors])
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


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

    def step(self, batch: Batch, advantages: np.ndarray) -> dict[str, Any]:
        """One GRPO update; its metrics."""
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
    them, and returns rank 0's result.

    Args:
        model_path: the policy checkpoint folder.
        trainer: the trainer section (ranks, resources, weight sync).
        learner_kwargs: further ``Learner`` keyword arguments.
    """

    def __init__(self, model_path: str | Path, *, trainer: TrainerConfig, **learner_kwargs: Any):
        self.config = trainer
        actor = ray.remote(TrainerWorker).options(
            num_gpus=trainer.num_gpus, num_cpus=trainer.num_cpus
        )
        self._actors = [
            actor.remote(str(model_path), rank=rank, trainer=trainer, **learner_kwargs)
            for rank in range(trainer.world_size)
        ]
        try:
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
        return ray.get([getattr(actor, method).remote(*args) for actor in self._actors])

    def step(self, batch: Batch, advantages: np.ndarray) -> dict[str, Any]:
        """One GRPO update on every rank (each takes its share of ``batch``); the metrics."""
        batch_ref = ray.put(batch)
        return self._on_all("step", batch_ref, advantages)[0]

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
        """End the actors (idempotent)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


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
) -> TrainerGroup:
    """Start the trainer's ``trainer.world_size`` ranks, each a ``TrainerWorker`` actor with
    ``trainer.num_gpus`` / ``trainer.num_cpus``, and build their ``Learner`` (``policy_dtype``
    and ``deterministic``: the rollout's, for ``trainer.policy: engine``)."""
    return TrainerGroup(
        model_path,
        trainer=trainer,
        grpo=grpo,
        routing=routing,
        seed=seed,
        reference_path=None if reference_path is None else str(reference_path),
        native_router_agreement=native_router_agreement,
        policy_dtype=policy_dtype,
        deterministic=deterministic,
    )
