"""The GRPO training loop on Ray: rollout workers, a trainer worker, and one step after another.

A step::

    prompts (prompts_per_step problems of the task x group_size) -> rollout workers generate
    (with routing) -> [workers sleep] -> rewards (the task) -> group-relative advantages ->
    trainer worker: update under the routing mode (none | r3 | r2) -> weight sync trainer ->
    rollout workers (object store or CUDA IPC) -> [workers wake up] -> one metrics record
    (JSONL, TensorBoard, progress bar) -> checkpoint every N steps

The task is the one ``task.name`` names (``replay.trainer.task_registry``; default: addition).

The bracketed stages run with ``rollout.release_kv_while_training`` (a trainer sharing the
rollout GPU): the engines release their KV cache and CUDA graphs while the trainer updates,
take the new weights asleep, and rebuild both before the next rollout.

Per-step record: ``step``; ``reward_mean``, ``reward_std``, ``accuracy`` (exact answers),
``finished_fraction`` (answers that ended with eos), ``answer_tokens_mean``; the trainer's
metrics (``kl_k3`` and ``extreme_token_fraction`` between rollout and trainer logprobs, router
agreement when the rollout captured routing, loss statistics, ``grad_norm``); throughput
``rollout_tokens_per_s`` (generated tokens / rollout time) and ``train_tokens_per_s``
(prompt + answer tokens / trainer time); and the time split ``time_rollout_s``,
``time_train_s``, ``time_sync_s``, ``time_release_s`` (putting the engines to sleep and waking
them; 0 without ``release_kv_while_training``), ``time_step_s`` (wall clock seen by the driver).

Sampling: temperature 1, no top-p/top-k, one seed per request derived from (seed, step,
index), so a run is reproducible and the ``none`` / ``r3`` / ``r2`` runs of one seed see the
same problems. Ray must be initialised by the caller (``examples/train_grpo.py`` does).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import rollout
from replay.trainer.checkpoint import (
    commit_checkpoint,
    latest_checkpoint,
    load_driver_state,
    prune_checkpoints,
    save_driver_state,
    staging_dir,
)
from replay.trainer.config import GRPOConfig, RolloutConfig, TrainConfig, config_to_dict
from replay.trainer.grpo import group_advantages
from replay.trainer.learner import Learner
from replay.trainer.metrics_log import MetricsLog
from replay.trainer.placement import Placement, plan_from_config
from replay.trainer.task_registry import Task, TaskProblem, make_task
from replay.trainer.tasks import TINY_ADDITION_SPEC, make_addition_model
from replay.trainer.trainer_group import TrainerGroup, start_trainer
from replay.trainer.workers import RolloutWorkers

__all__ = ["GRPOTrainer", "prepare_model", "step_requests", "step_rewards", "train"]

logger = logging.getLogger(__name__)


def prepare_model(config: TrainConfig) -> Path:
    """The absolute checkpoint folder of ``config.model``: a folder or a Hugging Face Hub id
    (``rollout.resolve_model``), or, with ``model_init: random_addition``, a local folder that
    gets a small random addition model when it has no config.json yet.

    Raises:
        ValueError: no checkpoint there (naming what was looked for where), or no tokenizer.json.
    """
    if config.model_init == "random_addition":
        path = Path(config.model).expanduser().absolute()
        if not (path / "config.json").exists():
            make_addition_model(path, TINY_ADDITION_SPEC, seed=config.seed)
            logger.info("wrote a random addition model to %s", path)
    else:
        path = rollout.resolve_model(config.model, revision=config.model_revision)
    if not (path / "config.json").exists():
        raise ValueError(f"model: expected an HF checkpoint folder with config.json, got {path}")
    if not (path / "tokenizer.json").exists():
        raise ValueError(
            f"model: expected tokenizer.json in {path} (the task's prompts are text), got none"
        )
    return path


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Run ``config`` to its last step (resuming if asked); return the records of the steps
    run by this call. Ray must be initialised."""
    trainer = GRPOTrainer(config)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()


def step_requests(
    task: Task,
    grpo: GRPOConfig,
    rollout_config: RolloutConfig,
    *,
    seed: int,
    step: int,
    rng: np.random.Generator,
) -> tuple[list[TaskProblem], list[rollout.SamplingParams]]:
    """The requests of one step: ``grpo.prompts_per_step`` problems drawn from ``task`` with
    ``rng``, each ``grpo.group_size`` times in a row, and their sampling (one seed per request
    derived from ``(seed, step, index)``).

    Raises:
        ValueError: the task drew another number of problems than asked.
    """
    problems = list(task.sample(grpo.prompts_per_step, rng))
    if len(problems) != grpo.prompts_per_step:
        raise ValueError(
            f"task.sample: expected {grpo.prompts_per_step} problems (grpo.prompts_per_step), "
            f"got {len(problems)}"
        )
    per_answer = [p for p in problems for _ in range(grpo.group_size)]
    seeds = np.random.SeedSequence([seed, step]).generate_state(len(per_answer))
    sampling = [
        rollout.SamplingParams(
            max_tokens=rollout_config.max_tokens,
            temperature=1.0,
            seed=int(s),
            return_routed_experts=rollout_config.capture_routing,
        )
        for s in seeds
    ]
    return per_answer, sampling


def step_rewards(
    task: Task,
    grpo: GRPOConfig,
    problems: list[TaskProblem],
    texts: list[str],
    finished: list[bool],
) -> tuple[np.ndarray, np.ndarray]:
    """float32 rewards of one step's answers (``texts[i]`` answers ``problems[i]``, as
    ``step_requests`` laid them out) by ``task``, and their group-relative advantages.

    Raises:
        ValueError: the task gave another number of rewards than answers.
    """
    rewards = np.asarray(task.rewards(problems, texts, finished), dtype=np.float32)
    if rewards.shape != (len(texts),):
        raise ValueError(
            f"task.rewards: expected shape ({len(texts)},) (one per answer), got {rewards.shape}"
        )
    advantages = group_advantages(
        torch.from_numpy(rewards), grpo.group_size, normalize_std=grpo.normalize_std
    )
    return rewards, advantages.numpy()


class GRPOTrainer:
    """Owns the actors and the run folder of one GRPO run (see the module docstring).

    Building it prepares the model (``prepare_model``), finds the checkpoint to resume from
    (``log.resume``), reserves the actors' placement group (``config.placement``: a request
    the cluster cannot hold raises ``PlacementError`` here, before any actor starts), starts
    the trainer and rollout actors in it and writes ``config.yaml``. Every output goes under
    ``out_dir``, the absolute ``log.out_dir`` (``LogConfig.out_path``).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out_dir = config.log.out_path()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("run folder %s", self.out_dir)
        base = prepare_model(config)
        resume_from = latest_checkpoint(self.out_dir) if config.log.resume else None
        start_model = base if resume_from is None else Learner.policy_dir(resume_from)
        self.task = make_task(config.task)
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.placement = Placement.reserve(
            plan_from_config(config), timeout_s=config.placement_timeout_s
        )
        self.trainer: TrainerGroup | None = None
        self.workers: RolloutWorkers | None = None
        self.log: MetricsLog | None = None
        try:
            self.trainer = start_trainer(
                start_model,
                trainer=config.trainer,
                grpo=config.grpo,
                routing=config.routing,
                seed=config.seed,
                reference_path=base,
                native_router_agreement=config.log.native_router_agreement,
                policy_dtype=config.rollout.dtype,
                deterministic=config.rollout.deterministic,
                placement=self.placement,
            )
            self.workers = RolloutWorkers.from_config(
                start_model, config.rollout, seed=config.seed, placement=self.placement
            )
            self._check_layers()
            if resume_from is not None:
                self._resume(resume_from)
            # Inside the try: a log that cannot start (no tensorboard) ends the actors too.
            self.log = MetricsLog(
                self.out_dir,
                tensorboard=config.log.tensorboard,
                wandb=config.log.wandb,
                run_config=config_to_dict(config),
                resume_step=self.step,
            )
        except BaseException:
            self.shutdown()
            raise
        (self.out_dir / "config.yaml").write_text(
            yaml.safe_dump(config_to_dict(config), sort_keys=False)
        )
        if not config.rollout.capture_routing:
            logger.info("capture_routing off: router agreement metrics are not reported")
        if config.rollout.release_kv_while_training:
            logger.info("release_kv_while_training: the rollout engines sleep during each update")

    def _check_layers(self) -> None:
        assert self.workers is not None and self.trainer is not None
        trainer_layers = self.trainer.moe_layers()
        if trainer_layers != self.workers.routing_spec.moe_layers:
            raise ValueError(
                f"model: expected the engine and the trainer to see the same MoE layers, got "
                f"{self.workers.routing_spec.moe_layers} (engine) and {trainer_layers} (trainer)"
            )

    def _resume(self, folder: Path) -> None:
        self.trainer.load_state(folder)
        state = load_driver_state(folder)
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        logger.info("resumed from %s at step %d", folder, self.step)

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, Any]]:
        """Run the remaining steps; return their records."""
        records = []
        steps = self.config.steps
        with tqdm(
            total=steps,
            initial=self.step,
            desc=f"grpo {self.config.routing}",
            unit="step",
            disable=not self.config.log.progress,
        ) as bar:
            while self.step < steps:
                record = self.train_step()
                records.append(record)
                self.log.write(record)
                every = self.config.log.checkpoint_every
                if every and (self.step % every == 0 or self.step == steps):
                    self.save_checkpoint()
                bar.set_postfix(
                    reward=f"{record['reward_mean']:.3f}",
                    kl=f"{record['kl_k3']:.2e}",
                    refresh=False,
                )
                bar.update(1)
        return records

    def train_step(self) -> dict[str, Any]:
        """Rollout, update and weight sync of one step; returns its record."""
        config, grpo = self.config, self.config.grpo
        start = time.perf_counter()
        per_answer, sampling = step_requests(
            self.task, grpo, config.rollout, seed=config.seed, step=self.step, rng=self.rng
        )
        # The routing stays in the object store until the trainer reads it on its node.
        result = self.workers.rollout([p.prompt for p in per_answer], sampling)
        batch = result.batch
        rollout_done = time.perf_counter()
        release = config.rollout.release_kv_while_training
        if release:
            self.workers.sleep()
        asleep = time.perf_counter()

        # The checkpoint has a tokenizer (checked at start), so the engine decoded every answer.
        texts = [text for text in batch.texts if text is not None]
        assert len(texts) == len(batch), "an answer came back without text"
        rewards, advantages = step_rewards(self.task, grpo, per_answer, texts, batch.finished)
        metrics = self.trainer.step(batch, advantages, result.routing)
        train_done = time.perf_counter()

        self.trainer.push_weights(self.workers)
        sync_done = time.perf_counter()
        if release:
            self.workers.wake_up()
        step_done = time.perf_counter()
        self.step += 1

        time_rollout = rollout_done - start
        time_train = train_done - asleep
        record: dict[str, Any] = {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "accuracy": float((rewards == 1.0).mean()),
            "finished_fraction": float(np.mean(batch.finished)),
            "answer_tokens_mean": batch.num_generated_tokens / len(batch),
            **{k: v for k, v in metrics.items() if k not in ("time_train_s", "train_tokens")},
            "trainer_compute_s": metrics["time_train_s"],
            "rollout_tokens_per_s": batch.num_generated_tokens / time_rollout,
            "train_tokens_per_s": metrics["train_tokens"] / time_train,
            "time_rollout_s": time_rollout,
            "time_train_s": time_train,
            "time_sync_s": sync_done - train_done,
            "time_release_s": (asleep - rollout_done) + (step_done - sync_done),
            "time_step_s": step_done - start,
        }
        return record

    # ------------------------------------------------------------------ checkpoints, teardown

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (policy, optimizer, RNG, driver state)."""
        folder = staging_dir(self.out_dir, self.step)
        self.trainer.save(folder)
        if not (Learner.policy_dir(folder) / "config.json").exists():
            node = self.trainer.infos[0]
            raise RuntimeError(
                f"log.out_dir: expected a folder that trainer rank 0 (node {node.node_id[:12]} "
                f"at {node.node_ip}) and this driver share (a shared filesystem), got "
                f"{self.out_dir}, where the policy it just saved is not visible here"
            )
        save_driver_state(folder, {"step": self.step, "rng": self.rng.bit_generator.state})
        final = commit_checkpoint(self.out_dir, self.step)
        prune_checkpoints(self.out_dir, self.config.log.keep_checkpoints)
        logger.info("checkpoint %s", final)
        return final

    def shutdown(self) -> None:
        """Close the log, end the actors and release their placement group (idempotent)."""
        if self.log is not None:
            self.log.close()
        if self.workers is not None:
            self.workers.shutdown()
        if self.trainer is not None:
            self.trainer.shutdown()
        self.placement.remove()
