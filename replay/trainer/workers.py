"""Ray actors of the trainer: rollout workers (one ``rollout.LLM`` per data-parallel rank) and
the trainer worker (a ``Learner``), plus ``RolloutWorkers``, the driver-side handle of a group
of rollout workers that the training-loop API is built on.

Ray stays here and in ``loop``: ``RolloutWorker`` and ``Learner`` are plain classes, made into
actors by ``ray.remote(...).options(...)`` when started, so they run and test without Ray.

Weight sync goes through Ray's object store: the trainer's (or the user's) named tensors are
put there once, as CPU tensors, and every rollout worker reads them from it and copies them
into its engine with ``LLM.update_weights`` (HF parameter names). A worker checks that the
tensors wrote every parameter of its engine, so a partial sync never goes unnoticed.

One GPU shared by the trainer and a rollout worker: give each a fraction of it
(``num_gpus_per_worker: 0.5``, ``trainer.num_gpus: 0.5``). ``rollout.LLM`` has no call that
releases its KV cache while the trainer runs and reallocates it afterwards, so both keep
their memory for the whole run: size the engine with ``kv_cache_blocks`` (or a lower
``gpu_memory_utilization``) so that the trainer's weights, optimizer state and activations
fit beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import ray
import torch

import rollout
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, RolloutConfig, RoutingMode, TrainerConfig
from replay.trainer.learner import Learner

__all__ = ["RolloutWorker", "RolloutWorkers", "TrainerWorker", "start_trainer"]

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
        self._parameters = {name for name, _ in self.llm.engine.runner.model.named_parameters()}

    def routing_spec(self) -> rollout.RoutingSpec:
        """The engine's MoE layers, experts, top-k and routing method."""
        return self.llm.routing_spec

    def generate(
        self, prompts: list[Prompt], sampling: list[rollout.SamplingParams]
    ) -> list[rollout.RequestOutput]:
        """``LLM.generate`` without a progress bar."""
        return self.llm.generate(prompts, sampling, use_tqdm=False)

    def update_weights(self, weights: dict[str, torch.Tensor], require_all: bool = True) -> int:
        """Copy HF-named tensors into the engine; returns the number of engine parameters
        written. With ``require_all``, ValueError unless every parameter was written."""
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
    ``Batch`` in prompt order; ``update_weights`` pushes new weights to every worker.

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
        self, weights: WeightsLike | ray.ObjectRef, *, require_all: bool = True
    ) -> None:
        """Push HF-named tensors (a ``state_dict``, ``named_parameters()``, or an ObjectRef to
        a dict of them, e.g. ``TrainerWorker.named_weights.remote()``) to every worker.

        With ``require_all``, each worker raises unless every engine parameter was written.
        """
        if not isinstance(weights, ray.ObjectRef):
            items = weights.items() if isinstance(weights, Mapping) else weights
            weights = ray.put({name: tensor.detach().to("cpu") for name, tensor in items})
        ray.get([actor.update_weights.remote(weights, require_all) for actor in self._actors])

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
    """The trainer actor's body: a ``Learner`` (see its arguments)."""

    def __init__(self, model_path: str, **learner_kwargs: Any) -> None:
        self.learner = Learner(model_path, **learner_kwargs)

    def step(self, batch: Batch, advantages: np.ndarray) -> dict[str, Any]:
        """One GRPO update; its metrics."""
        return self.learner.step(batch, advantages)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's parameters (CPU copies by HF name)."""
        return self.learner.named_weights()

    def save(self, folder: str) -> None:
        """Checkpoint into ``folder`` (``Learner.save``)."""
        self.learner.save(folder)

    def load_state(self, folder: str) -> None:
        """Restore optimizer, step and RNG (``Learner.load_state``)."""
        self.learner.load_state(folder)

    def moe_layers(self) -> tuple[int, ...]:
        """The policy's MoE layers (to check against the engine's)."""
        return self.learner.ctl.moe_layers


def start_trainer(
    model_path: str | Path,
    *,
    trainer: TrainerConfig,
    grpo: GRPOConfig,
    routing: RoutingMode,
    seed: int,
    reference_path: str | Path | None = None,
    native_router_agreement: bool = True,
) -> ray.actor.ActorHandle:
    """Start a ``TrainerWorker`` actor with ``trainer.num_gpus`` / ``trainer.num_cpus``."""
    actor = ray.remote(TrainerWorker).options(num_gpus=trainer.num_gpus, num_cpus=trainer.num_cpus)
    return actor.remote(
        str(model_path),
        trainer=trainer,
        grpo=grpo,
        routing=routing,
        seed=seed,
        reference_path=None if reference_path is None else str(reference_path),
        native_router_agreement=native_router_agreement,
    )
