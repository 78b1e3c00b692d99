"""The GRPO trainer's configuration: typed, frozen dataclasses loaded from YAML with overrides.

A run is one ``TrainConfig`` made of sections (``rollout``, ``trainer``, ``grpo``, ``task``,
``log``). Every dataclass checks its fields' types and ranges in ``__post_init__``, so a config
built in Python is validated exactly like one read from YAML; errors are ValueError (TypeError
for a wrong Python type) naming the field, e.g. ``trainer.lr: expected a float > 0, got -1.0``.

YAML files mirror the sections::

    model: runs/addition/sft
    routing: r3
    trainer: {lr: 1.0e-5, micro_batch_size: 64}

``load_config(path, overrides)`` applies ``section.field=value`` overrides (the value is
parsed as YAML: ``null``, ``true``, numbers, lists) on top of the file; an unknown section or
field raises. PyYAML reads ``1e-5`` (no dot) as a string, so float fields also accept a string
that parses as a float.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from replay.trainer.preflight import check_against_model
from replay.trainer.task_registry import TASKS

__all__ = [
    "GRPOConfig",
    "LogConfig",
    "RolloutConfig",
    "RoutingMode",
    "TaskConfig",
    "TrainConfig",
    "TrainerConfig",
    "WandbConfig",
    "WeightSync",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
]

RoutingMode = Literal["none", "r3", "r2"]
Device = Literal["cpu", "cuda"]
# How updated weights reach the rollout workers (``replay.trainer.weight_sync``).
WeightSync = Literal["object_store", "cuda_ipc"]


# ---------------------------------------------------------------------- field checking


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` and normalised (int -> float)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool):
            raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(name, value, inner)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_check_value(f"{name}[{i}]", v, item_hint) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"{name}: expected a float, got str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite float, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise TypeError(f"{name}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise AssertionError(f"unsupported annotation {hint!r} of {name}")


def _check_fields(instance: Any) -> None:
    """Type-check (and normalise) every field of a frozen dataclass instance."""
    hints = _type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = _check_value(f.name, getattr(instance, f.name), hints[f.name])
        object.__setattr__(instance, f.name, value)


def _require(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


# ---------------------------------------------------------------------- sections


@dataclass(kw_only=True, slots=True, frozen=True)
class RolloutConfig:
    """Rollout workers: one ``rollout.LLM`` per data-parallel rank, each a Ray actor.

    Args:
        num_workers: data-parallel rollout ranks; the prompts of a step are split among them.
        device: where each engine runs.
        num_gpus_per_worker: Ray GPUs per worker (0 on CPU; a fraction to share a GPU with the
            trainer, e.g. 0.5 each on one GPU).
        num_cpus_per_worker: Ray CPUs per worker.
        dtype: the engine's dtype (``"auto"``: the checkpoint's on CUDA, float32 on CPU).
        max_tokens: most generated tokens per answer.
        capture_routing: record routed experts (needed by ``routing: r3`` and by the router
            agreement metric).
        max_num_seqs, max_num_batched_tokens, max_model_len, block_size, kv_cache_blocks,
        gpu_memory_utilization, enable_prefix_caching, enforce_eager: ``rollout.LLM``'s
            arguments of the same name.
        release_kv_while_training: put the engines to sleep (``LLM.sleep``: KV cache, CUDA
            graphs and attention workspaces released) after each rollout and wake them after
            the weight sync, so that a trainer sharing their GPU gets that memory.
        deterministic: ``rollout.LLM(deterministic=True)``, the true on-policy mode: with
            ``trainer.policy: engine`` and ``routing: r3`` the trainer's first forward of each
            update reproduces the rollout's logprobs bit for bit.
        data_parallel_size, data_parallel_mode: engine ranks inside each worker
            (``rollout.LLM``'s arguments: ``data_parallel_size`` processes, one GPU each on
            CUDA, so ``num_gpus_per_worker`` must equal it there).
        node_resource: a custom resource the rollout nodes were started with
            (``ray start --resources='{"rollout_node": 1}'``); each worker takes a token
            amount of it, so workers go to those nodes only (``replay.trainer.placement``).

    Sampling is fixed at temperature 1 without top-p / top-k: the engine's logprobs are those
    of the temperature-1 softmax, so the behaviour policy is exactly the policy whose
    logprobs the trainer compares and corrects against.
    """

    num_workers: int = 1
    device: Device = "cuda"
    num_gpus_per_worker: float = 1.0
    num_cpus_per_worker: float = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_tokens: int = 16
    capture_routing: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    release_kv_while_training: bool = False
    deterministic: bool = False
    data_parallel_size: int = 1
    data_parallel_mode: Literal["replicas", "dp_attention"] = "replicas"
    node_resource: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(self.num_workers >= 1, "num_workers", "an int >= 1", self.num_workers)
        _require(
            self.data_parallel_size >= 1,
            "data_parallel_size",
            "an int >= 1",
            self.data_parallel_size,
        )
        if self.device == "cuda" and self.data_parallel_size > 1:
            _require(
                self.num_gpus_per_worker == self.data_parallel_size,
                "num_gpus_per_worker",
                f"{self.data_parallel_size} (data_parallel_size: one GPU per engine rank)",
                self.num_gpus_per_worker,
            )
        _require(self.node_resource != "", "node_resource", "null or a resource name", "")
        if self.device == "cpu":
            _require(
                self.num_gpus_per_worker == 0,
                "num_gpus_per_worker",
                "0 with device cpu",
                self.num_gpus_per_worker,
            )
        else:
            _require(
                self.num_gpus_per_worker > 0,
                "num_gpus_per_worker",
                "> 0 with device cuda",
                self.num_gpus_per_worker,
            )
        _require(
            self.num_cpus_per_worker >= 0,
            "num_cpus_per_worker",
            ">= 0",
            self.num_cpus_per_worker,
        )
        _require(self.max_tokens >= 1, "max_tokens", "an int >= 1", self.max_tokens)
        _require(self.max_num_seqs >= 1, "max_num_seqs", "an int >= 1", self.max_num_seqs)
        _require(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            "an int >= 1",
            self.max_num_batched_tokens,
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 2,
            "max_model_len",
            "null or an int >= 2",
            self.max_model_len,
        )
        if self.max_model_len is not None:
            # A prompt has at least one token; load_config checks the task's actual prompts.
            _require(
                self.max_tokens < self.max_model_len,
                "max_tokens",
                f"an int < max_model_len ({self.max_model_len}; prompts take a token or more)",
                self.max_tokens,
            )
        _require(self.block_size >= 1, "block_size", "an int >= 1", self.block_size)
        _require(
            self.kv_cache_blocks is None or self.kv_cache_blocks >= 1,
            "kv_cache_blocks",
            "null or an int >= 1",
            self.kv_cache_blocks,
        )
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            "a float in (0, 1]",
            self.gpu_memory_utilization,
        )

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``rollout.LLM`` (besides the model path and seed)."""
        names = (
            "dtype",
            "device",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "block_size",
            "kv_cache_blocks",
            "gpu_memory_utilization",
            "enable_prefix_caching",
            "enforce_eager",
            "capture_routing",
            "deterministic",
            "data_parallel_size",
            "data_parallel_mode",
        )
        return {name: getattr(self, name) for name in names}


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainerConfig:
    """The trainer actor: the HF policy, its optimizer and how a step's batch is processed.

    Args:
        device: where the policy trains.
        world_size: trainer ranks, one Ray actor each. 1: the policy trains whole in one
            process; N > 1: it is sharded with FSDP2 (``fully_shard`` per decoder layer, then
            the root) over N ranks (NCCL on CUDA, one GPU each; gloo on CPU), each training
            on its share of every minibatch.
        num_gpus: Ray GPUs of each trainer rank (0 on CPU; 0.5 to share one GPU with a rollout
            worker of ``num_gpus_per_worker`` 0.5; 1 with ``world_size`` > 1).
        num_cpus: Ray CPUs of each trainer rank.
        compute_dtype: ``float32``, or ``bfloat16`` autocast over float32 parameters.
        lr, weight_decay, beta1, beta2, adam_eps: AdamW.
        max_grad_norm: gradient-norm clipping (0: no clipping; the norm is logged anyway).
        micro_batch_size: sequences per forward/backward (gradient accumulation).
        num_minibatches: optimizer steps per rollout batch, each on an equal slice of it.
        gradient_checkpointing: HF ``gradient_checkpointing_enable`` on the policy.
        grouped_experts: ``"off"`` (HF's experts), or ``replay.use_grouped_experts`` with
            that backend.
        weight_sync: how the weights reach the rollout workers after each step:
            ``"object_store"`` (CPU copies through Ray's object store, any placement) or
            ``"cuda_ipc"`` (CUDA IPC handles of the trainer's GPU tensors, no copy on the
            trainer's side: rollout workers on the trainer's GPU, ``world_size`` 1).
        policy: ``"hf"`` (HF transformers' model of the checkpoint) or ``"engine"`` (the
            rollout engine's own model, ``rollout.load_policy``, with ``rollout.deterministic``'s
            numerics: float32 parameters, the forward in ``rollout.dtype``; ``world_size`` 1,
            ``compute_dtype`` float32 (no autocast), no grouped experts or gradient
            checkpointing, which are HF-model features).
    """

    device: Device = "cuda"
    world_size: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = 1e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    micro_batch_size: int = 32
    num_minibatches: int = 1
    gradient_checkpointing: bool = False
    grouped_experts: Literal["off", "auto", "loop", "grouped_mm"] = "off"
    weight_sync: WeightSync = "object_store"
    policy: Literal["hf", "engine"] = "hf"
    node_resource: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(self.world_size >= 1, "world_size", "an int >= 1", self.world_size)
        _require(self.node_resource != "", "node_resource", "null or a resource name", "")
        if self.device == "cpu":
            _require(self.num_gpus == 0, "num_gpus", "0 with device cpu", self.num_gpus)
        elif self.world_size > 1:
            # NCCL cannot run two ranks on one GPU, and Ray may pack fractions onto one.
            _require(
                self.num_gpus == 1,
                "num_gpus",
                f"1 with world_size {self.world_size} (one GPU per trainer rank)",
                self.num_gpus,
            )
        else:
            _require(self.num_gpus > 0, "num_gpus", "> 0 with device cuda", self.num_gpus)
        if self.weight_sync == "cuda_ipc":
            _require(
                self.device == "cuda",
                "weight_sync",
                f"'object_store' with device {self.device} ('cuda_ipc' shares CUDA memory)",
                self.weight_sync,
            )
            # Rank 0 owns a whole GPU when world_size > 1, so no rollout worker can share it.
            _require(
                self.world_size == 1,
                "weight_sync",
                f"'object_store' with world_size {self.world_size} ('cuda_ipc' needs the "
                f"rollout workers on the trainer's GPU)",
                self.weight_sync,
            )
        _require(self.num_cpus >= 0, "num_cpus", ">= 0", self.num_cpus)
        _require(self.lr > 0, "lr", "a float > 0", self.lr)
        _require(self.weight_decay >= 0, "weight_decay", "a float >= 0", self.weight_decay)
        _require(0 <= self.beta1 < 1, "beta1", "a float in [0, 1)", self.beta1)
        _require(0 <= self.beta2 < 1, "beta2", "a float in [0, 1)", self.beta2)
        _require(self.adam_eps > 0, "adam_eps", "a float > 0", self.adam_eps)
        _require(self.max_grad_norm >= 0, "max_grad_norm", "a float >= 0", self.max_grad_norm)
        _require(
            self.micro_batch_size >= 1,
            "micro_batch_size",
            "an int >= 1",
            self.micro_batch_size,
        )
        _require(
            self.num_minibatches >= 1,
            "num_minibatches",
            "an int >= 1",
            self.num_minibatches,
        )
        if self.policy == "engine":
            for name, expected, ok in (
                ("world_size", "1", self.world_size == 1),
                ("compute_dtype", "'float32'", self.compute_dtype == "float32"),
                ("grouped_experts", "'off'", self.grouped_experts == "off"),
                ("gradient_checkpointing", "false", not self.gradient_checkpointing),
            ):
                _require(ok, name, f"{expected} with policy 'engine'", getattr(self, name))


@dataclass(kw_only=True, slots=True, frozen=True)
class GRPOConfig:
    """The GRPO objective (``replay.trainer.grpo``).

    Args:
        prompts_per_step: distinct prompts per step.
        group_size: answers sampled per prompt (>= 2: advantages are relative to the group).
        normalize_std: divide group-centred rewards by the group's standard deviation.
        ratio: ``"token"`` (PPO/GRPO per-token ratio) or ``"sequence"`` (GSPO: the
            length-normalised sequence ratio).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        loss_agg: ``"token_mean"`` (mean over all answer tokens of the minibatch) or
            ``"seq_mean"`` (mean over each answer's tokens, then over answers); GSPO always
            averages over sequences.
        tis_cap: truncated importance sampling: weight each token's loss by
            ``min(p_old / p_rollout, tis_cap)`` (None: off).
        kl_coef: weight of the k3 KL to a frozen reference policy (0: no reference model).
    """

    prompts_per_step: int = 16
    group_size: int = 8
    normalize_std: bool = True
    ratio: Literal["token", "sequence"] = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    tis_cap: float | None = None
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(
            self.prompts_per_step >= 1,
            "prompts_per_step",
            "an int >= 1",
            self.prompts_per_step,
        )
        _require(self.group_size >= 2, "group_size", "an int >= 2", self.group_size)
        _require(0 <= self.clip_low < 1, "clip_low", "a float in [0, 1)", self.clip_low)
        _require(self.clip_high >= 0, "clip_high", "a float >= 0", self.clip_high)
        _require(
            self.tis_cap is None or self.tis_cap >= 1,
            "tis_cap",
            "null or a float >= 1",
            self.tis_cap,
        )
        _require(self.kl_coef >= 0, "kl_coef", "a float >= 0", self.kl_coef)

    @property
    def batch_size(self) -> int:
        """Answers per step: ``prompts_per_step * group_size``."""
        return self.prompts_per_step * self.group_size


@dataclass(kw_only=True, slots=True, frozen=True)
class TaskConfig:
    """The task: ``name`` is an entry of ``replay.trainer.task_registry.TASKS`` (default the toy
    task ``addition``, ``replay.trainer.tasks``: addition of ``min_digits``..``max_digits``-digit
    numbers; ``partial_credit`` in [0, 1) rewards near misses, 0: exact answers only)."""

    name: str = "addition"
    min_digits: int = 1
    max_digits: int = 3
    partial_credit: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(self.name in TASKS, "name", f"one of {sorted(TASKS)}", self.name)
        _require(self.min_digits >= 1, "min_digits", "an int >= 1", self.min_digits)
        _require(
            self.max_digits >= self.min_digits,
            "max_digits",
            f"an int >= min_digits ({self.min_digits})",
            self.max_digits,
        )
        _require(
            0 <= self.partial_credit < 1,
            "partial_credit",
            "a float in [0, 1)",
            self.partial_credit,
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class WandbConfig:
    """A Weights & Biases run that receives every step's record (``log.wandb``).

    Args:
        project: the W&B project.
        name: the run's name (null: W&B picks one).
        mode: ``online`` (stream to the W&B server), ``offline`` (write the run under
            ``<out_dir>/wandb`` only; ``wandb sync`` uploads it later) or ``disabled``.
    """

    project: str
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(bool(self.project), "project", "a non-empty str", self.project)
        _require(self.name != "", "name", "null or a non-empty str", self.name)


@dataclass(kw_only=True, slots=True, frozen=True)
class LogConfig:
    """Outputs of a run.

    Args:
        out_dir: run folder: ``metrics.jsonl``, ``config.yaml``, TensorBoard events,
            ``checkpoints/``. An absolute path is used as it is (a shared filesystem on a
            cluster); a relative one is taken against the working directory of the process
            that runs the training loop (``out_path``). Under ``ray job submit`` that is Ray's
            unpacked copy of the submitted working directory on the head node, so pass an
            absolute path there (``--set log.out_dir=$PWD/runs/...`` on a machine that shares
            the filesystem).
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package, a
            dependency; without it the run stops at start with an error naming this field).
        wandb: also log every step to Weights & Biases (a ``WandbConfig`` or its fields as a
            mapping; null: off). Needs the ``wandb`` package (``pip install
            'routing-replay[wandb]'``); without it the run stops at start naming this field.
        progress: show a tqdm progress bar over steps.
        checkpoint_every: save every this many steps and after the last (0: never).
        keep_checkpoints: most recent checkpoints kept.
        resume: continue from the latest checkpoint in ``out_dir`` (none there: start fresh).
        native_router_agreement: under ``r3``, run an extra no-grad forward recording the
            trainer's native routing to report its agreement with the rollout's (under
            ``none`` and ``r2`` it comes without an extra forward).
    """

    out_dir: str = "runs/grpo"
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    progress: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    native_router_agreement: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.wandb, Mapping):  # from YAML: a nested section
            object.__setattr__(self, "wandb", _build(WandbConfig, self.wandb, "wandb."))
        _check_fields(self)
        _require(bool(self.out_dir), "out_dir", "a non-empty path", self.out_dir)
        _require(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            "an int >= 0",
            self.checkpoint_every,
        )
        _require(
            self.keep_checkpoints >= 1,
            "keep_checkpoints",
            "an int >= 1",
            self.keep_checkpoints,
        )

    def out_path(self) -> Path:
        """``out_dir`` as an absolute path (a relative one against the current directory)."""
        return Path(self.out_dir).expanduser().absolute()


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    """One GRPO run.

    Args:
        model: HF checkpoint folder (config.json, safetensors, tokenizer.json) that both the
            rollout engine and the trainer load, or a Hugging Face Hub id (``org/name``)
            resolved through the Hugging Face cache (``rollout.resolve_model``).
        model_revision: the Hub id's branch, tag or commit hash (null: ``main``).
        model_init: ``"existing"`` (the folder must hold a checkpoint) or ``"random_addition"``
            (when the folder has no config.json, first write a small random addition model
            there: smoke tests without a supervised warm-up).
        seed: seeds prompts, sampling and the trainer.
        steps: training steps (each: rollout, update, weight sync).
        routing: ``none`` (native routing), ``r3`` (replay the rollout's routing) or ``r2``
            (record the trainer's own routing on a no-grad forward, then replay it).
        placement: ``separate`` (a bundle per actor) or ``colocated`` (rollout worker ``r``
            and trainer rank ``r`` in one bundle: one GPU per pair, ``rollout.num_workers ==
            trainer.world_size``); see ``replay.trainer.placement``.
        placement_timeout_s: how long the actors' placement group may wait for resources
            that the cluster has but are in use (or that an autoscaler is adding); a request
            the cluster can never hold fails at once.
    """

    model: str
    model_revision: str | None = None
    model_init: Literal["existing", "random_addition"] = "existing"
    seed: int = 0
    steps: int = 100
    routing: RoutingMode = "r3"
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    log: LogConfig = field(default_factory=LogConfig)
    placement: Literal["separate", "colocated"] = "separate"
    placement_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        _check_fields(self)
        _require(bool(self.model), "model", "a non-empty path", self.model)
        _require(
            self.model_revision is None or self.model_init == "existing",
            "model_revision",
            "null with model_init random_addition (it writes a local folder)",
            self.model_revision,
        )
        _require(
            self.placement_timeout_s > 0,
            "placement_timeout_s",
            "a float > 0",
            self.placement_timeout_s,
        )
        _require(self.seed >= 0, "seed", "an int >= 0", self.seed)
        _require(self.steps >= 1, "steps", "an int >= 1", self.steps)
        if self.routing == "r3" and not self.rollout.capture_routing:
            raise ValueError(
                "rollout.capture_routing: expected true with routing r3 (replay needs the "
                "rollout's routing), got false"
            )
        batch = self.grpo.batch_size
        if batch % self.trainer.num_minibatches:
            raise ValueError(
                f"trainer.num_minibatches: expected a divisor of the batch (grpo.prompts_per_step "
                f"x grpo.group_size = {batch}), got {self.trainer.num_minibatches}"
            )
        shares = self.trainer.num_minibatches * self.trainer.world_size
        if batch % shares:
            raise ValueError(
                f"trainer.world_size: expected every minibatch ({batch} // "
                f"{self.trainer.num_minibatches} answers) to split evenly over the trainer "
                f"ranks, got {self.trainer.world_size}"
            )
        if self.trainer.weight_sync == "cuda_ipc" and self.rollout.device != "cuda":
            raise ValueError(
                f"trainer.weight_sync: expected 'object_store' with rollout.device "
                f"{self.rollout.device} ('cuda_ipc' shares CUDA memory), got 'cuda_ipc'"
            )
        if self.trainer.weight_sync == "cuda_ipc":
            rollout = self.rollout
            gpus = self.trainer.num_gpus + rollout.num_workers * rollout.num_gpus_per_worker
            if gpus > 1 + 1e-9:  # float sums such as 0.1 + 3 x 0.3
                raise ValueError(
                    f"trainer.weight_sync: expected 'object_store' when the trainer and the "
                    f"rollout workers cannot share one GPU (trainer.num_gpus "
                    f"{self.trainer.num_gpus:g} + rollout.num_workers {rollout.num_workers} x "
                    f"rollout.num_gpus_per_worker {rollout.num_gpus_per_worker:g} = {gpus:g} > 1; "
                    f"'cuda_ipc' needs every worker on the trainer's GPU), got 'cuda_ipc'"
                )
        self._check_placement()

    def _check_placement(self) -> None:
        rollout, trainer = self.rollout, self.trainer
        if rollout.num_workers > self.grpo.batch_size:
            raise ValueError(
                f"rollout.num_workers: expected at most the answers of a step to split among "
                f"the workers (grpo.prompts_per_step x grpo.group_size = {self.grpo.batch_size})"
                f", got {rollout.num_workers}"
            )
        if self.placement != "colocated":
            return
        if rollout.num_workers != trainer.world_size:
            raise ValueError(
                f"rollout.num_workers: expected trainer.world_size ({trainer.world_size}) with "
                f"placement colocated (one rollout worker per trainer rank), got "
                f"{rollout.num_workers}"
            )
        if rollout.device != trainer.device:
            raise ValueError(
                f"rollout.device: expected trainer.device ({trainer.device}) with placement "
                f"colocated, got {rollout.device}"
            )
        if rollout.device == "cuda" and trainer.world_size > 1:
            raise ValueError(
                f"placement: expected 'separate' with trainer.world_size {trainer.world_size} "
                f"on cuda (each rank then needs trainer.num_gpus 1, leaving no share of its GPU "
                f"to a rollout worker), got 'colocated'"
            )
        pair = rollout.num_gpus_per_worker + trainer.num_gpus
        if rollout.device == "cuda" and pair > 1:
            raise ValueError(
                f"rollout.num_gpus_per_worker: expected at most 1 - trainer.num_gpus "
                f"({1 - trainer.num_gpus:g}) with placement colocated (a worker and a trainer "
                f"rank share one GPU), got {rollout.num_gpus_per_worker:g}"
            )
        if rollout.node_resource != trainer.node_resource:
            raise ValueError(
                f"rollout.node_resource: expected trainer.node_resource "
                f"({trainer.node_resource!r}) with placement colocated (a pair sits on one "
                f"node), got {rollout.node_resource!r}"
            )


_SECTIONS: dict[str, type] = {
    "rollout": RolloutConfig,
    "trainer": TrainerConfig,
    "grpo": GRPOConfig,
    "task": TaskConfig,
    "log": LogConfig,
}


# ---------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"trainer.lr=1e-5"`` -> ``(("trainer", "lr"), 1e-5)``; the value is parsed as YAML."""
    if not isinstance(text, str):
        raise TypeError(f"override: expected a str 'key=value', got {type(text).__name__}")
    key, sep, raw = text.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise ValueError(f"override: expected 'section.field=value' or 'field=value', got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"{key}: could not parse the value {raw!r} as YAML: {err}") from err
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the nested ``data`` with every ``key=value`` override applied in order."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(path[: depth + 1])
                raise TypeError(
                    f"{dotted}: expected a section to set {'.'.join(path)} in, got {child!r}"
                )
            node = child
        node[path[-1]] = value
    return result


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a ``TrainConfig`` from nested plain data (a parsed YAML document)."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"config: expected a mapping of sections and fields, got {type(data).__name__}"
        )
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            top[key] = _build(_SECTIONS[key], value, f"{key}.")
        else:
            top[key] = value
    return _build(TrainConfig, top, "")


def load_config(
    path: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    *,
    check_model: bool = True,
) -> TrainConfig:
    """Read a YAML config (None: start from no file) and apply ``section.field=value`` overrides.

    With ``check_model`` (the default) the config is also checked against the model folder it
    names (``replay.trainer.preflight.check_against_model``: the folder, its context length, the
    task's prompts plus ``rollout.max_tokens``), so that a run that cannot start fails here,
    before Ray starts any worker. False validates the values alone (e.g. a config for another
    machine, or a model that a previous step has yet to write).
    """
    data: Any = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {os.fspath(path)}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(
                f"config {os.fspath(path)}: expected a mapping at the top level, "
                f"got {type(data).__name__}"
            )
    config = config_from_dict(apply_overrides(data, overrides))
    if check_model:
        check_against_model(config)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain data of a config (``load_config`` of its YAML dump gives it back)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    """``cls(**data)``, naming unknown keys and bad values with their dotted path."""
    name = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise TypeError(f"{name}: expected a mapping of fields, got {type(data).__name__} {data!r}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    for key in data:
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown field, expected one of {sorted(known)}")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ValueError(f"{prefix}{f.name}: expected a value (required field), got none")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise type(err)(prefix + str(err)) from None


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
