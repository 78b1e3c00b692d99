"""The true on-policy mode in the GRPO trainer, in-process on CPU (no Ray): a deterministic
rollout worker and a ``Learner`` with ``trainer.policy: engine``, weights synced after every
step exactly as the training loop does.

With ``routing: r3`` the trainer's gradient-carrying forward reproduces the rollout's logprobs
bit for bit at every step, also after weight syncs: KL k3 and F(2) exactly 0. With
``routing: none`` the policy's own routing is the engine's (their router logits are equal bit
for bit), so KL is 0 as well; with the HF policy beside the same deterministic rollout it is
not (different kernels), which shows the check can fail. Also: the config's validation of the
new fields and the sync's bitwise weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import rollout
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, RolloutConfig, TrainConfig, TrainerConfig
from replay.trainer.grpo import group_advantages
from replay.trainer.learner import Learner
from replay.trainer.tasks import TINY_ADDITION_SPEC, AdditionTask, make_addition_model
from replay.trainer.workers import RolloutWorker

GRPO = GRPOConfig(prompts_per_step=4, group_size=4)
ENGINE = dict(device="cpu", dtype="float32", capture_routing=True, max_num_seqs=16,
              max_model_len=32, block_size=4, max_num_batched_tokens=48, deterministic=True)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: faster for the tiny model's many small ops (same bits anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("addition")
    make_addition_model(path, TINY_ADDITION_SPEC, seed=0)
    return path


def run_grpo(checkpoint: Path, *, routing: str, policy: str, steps: int) -> list[dict]:
    """``steps`` GRPO steps: rollout, update, weight sync (the loop's ``train_step``)."""
    worker = RolloutWorker(str(checkpoint), rank=0, seed=0, llm_kwargs=ENGINE)
    trainer = TrainerConfig(device="cpu", num_gpus=0, policy=policy, micro_batch_size=8, lr=3e-3)
    learner = Learner(
        checkpoint,
        trainer=trainer,
        grpo=GRPO,
        routing=routing,
        policy_dtype="float32",
        deterministic=True,
    )
    task = AdditionTask(min_digits=1, max_digits=2, partial_credit=0.5)
    rng = np.random.default_rng(0)
    records = []
    for step in range(steps):
        problems = [p for p in task.sample(GRPO.prompts_per_step, rng) for _ in range(4)]
        sampling = [
            rollout.SamplingParams(
                max_tokens=6, temperature=1.0, seed=1000 * step + i, return_routed_experts=True
            )
            for i in range(len(problems))
        ]
        outputs = worker.generate([p.prompt for p in problems], sampling)
        batch = Batch.from_outputs(outputs, worker.routing_spec())
        rewards = task.rewards(problems, list(batch.texts), batch.finished)
        advantages = group_advantages(torch.from_numpy(rewards), GRPO.group_size)
        records.append(learner.step(batch, advantages.numpy()))
        worker.update_weights(learner.named_weights())  # raises unless every weight is written
    if policy == "engine":  # the sync is bitwise: the engine holds exactly the policy's weights
        engine = dict(worker.llm.engine.runner.model.named_parameters())
        for name, tensor in learner.model.named_parameters():
            assert torch.equal(engine[name], tensor.detach()), name
    worker.shutdown()
    return records


def test_r3_engine_policy_reproduces_the_rollout_at_every_step(checkpoint):
    records = run_grpo(checkpoint, routing="r3", policy="engine", steps=3)
    for step, record in enumerate(records):
        assert record["kl_k3"] == 0.0, (step, record["kl_k3"])
        assert record["extreme_token_fraction"] == 0.0, step
        assert record["router_agreement"] == 1.0, step
        assert record["grad_norm"] > 0, step  # the update is real: the weights move
    assert records[-1]["router_agreement_native"] == 1.0


def test_native_routing_of_the_engine_policy_is_the_rollouts(checkpoint):
    records = run_grpo(checkpoint, routing="none", policy="engine", steps=2)
    for record in records:
        assert record["router_agreement"] == 1.0
        assert record["kl_k3"] == 0.0


def test_the_hf_policy_beside_a_deterministic_rollout_is_not_bitwise(checkpoint):
    records = run_grpo(checkpoint, routing="r3", policy="hf", steps=1)
    assert records[0]["router_agreement"] == 1.0
    assert 0.0 < records[0]["kl_k3"] < 1e-6


def test_config_fields_and_validation():
    base = dict(
        model="m",
        rollout=RolloutConfig(device="cpu", num_gpus_per_worker=0, deterministic=True),
        trainer=TrainerConfig(device="cpu", num_gpus=0, policy="engine"),
    )
    config = TrainConfig(**base)
    assert config.rollout.llm_kwargs()["deterministic"] is True
    with pytest.raises(ValueError, match="policy: expected one of"):
        TrainerConfig(device="cpu", num_gpus=0, policy="vllm")
    for field, value, message in (
        ("compute_dtype", "bfloat16", "compute_dtype: expected 'float32' with policy 'engine'"),
        ("grouped_experts", "loop", "grouped_experts: expected 'off' with policy 'engine'"),
        ("gradient_checkpointing", True, "gradient_checkpointing: expected false with policy"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainerConfig(device="cpu", num_gpus=0, policy="engine", **{field: value})
    with pytest.raises(TypeError, match="deterministic: expected a bool"):
        RolloutConfig(device="cpu", num_gpus_per_worker=0, deterministic="yes")
