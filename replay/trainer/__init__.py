"""GRPO on Ray with rollout routing replay: rollout workers, a trainer, the toy task.

Imports Ray and ``rollout`` (``replay`` itself imports neither; only this subpackage does).

The training-loop API, for a loop of your own::

    workers = RolloutWorkers(path, capture_routing=True, device="cpu")
    batch = workers.generate(prompts, SamplingParams(max_tokens=8, return_routed_experts=True))
    tensors = batch.to_tensors()
    with ctl.replay(batch.traces, attention_mask=tensors.attention_mask_BS):
        logits = model(tensors.input_ids_BS, attention_mask=tensors.attention_mask_BS).logits
    ...  # your loss on token_logprobs(logits, tensors.input_ids_BS), backward, step
    workers.update_weights(model.state_dict())

The trainer: ``train(load_config("examples/configs/toy_addition.yaml"))`` (see
``examples/train_grpo.py``).
"""

from replay.trainer.batch import Batch, TrainBatch
from replay.trainer.config import (
    GRPOConfig,
    LogConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
    TrainerConfig,
    WandbConfig,
    load_config,
)
from replay.trainer.grpo import LossTerms, group_advantages, policy_loss, token_logprobs
from replay.trainer.learner import Learner
from replay.trainer.loop import GRPOTrainer, train
from replay.trainer.metrics_log import MetricsLog, read_metrics
from replay.trainer.placement import Placement, PlacementError
from replay.trainer.task_registry import TASKS, Task, make_task
from replay.trainer.tasks import (
    AdditionModelSpec,
    AdditionTask,
    Problem,
    make_addition_model,
)
from replay.trainer.trainer_group import TrainerGroup, TrainerWorker, start_trainer
from replay.trainer.workers import Rollout, RolloutWorker, RolloutWorkers, WorkerDiedError

__all__ = [
    "TASKS",
    "AdditionModelSpec",
    "AdditionTask",
    "Batch",
    "GRPOConfig",
    "GRPOTrainer",
    "Learner",
    "LogConfig",
    "LossTerms",
    "MetricsLog",
    "Placement",
    "PlacementError",
    "Problem",
    "Rollout",
    "RolloutConfig",
    "RolloutWorker",
    "RolloutWorkers",
    "Task",
    "TaskConfig",
    "TrainBatch",
    "TrainConfig",
    "TrainerConfig",
    "TrainerGroup",
    "TrainerWorker",
    "WandbConfig",
    "WorkerDiedError",
    "group_advantages",
    "load_config",
    "make_addition_model",
    "make_task",
    "policy_loss",
    "read_metrics",
    "start_trainer",
    "token_logprobs",
    "train",
]
