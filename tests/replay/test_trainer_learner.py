"""replay.trainer batch, ExpertsTap, Learner (routing modes, metrics, checkpoints) and the
rollout worker's weight sync, in-process on CPU (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import replay
import rollout
import routing_kernels
from replay.expert_tap import ExpertsTap
from replay.layout import BatchLayout
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, TrainerConfig
from replay.trainer.grpo import token_logprobs
from replay.trainer.learner import Learner
from replay.trainer.tasks import AdditionModelSpec, make_addition_model
from replay.trainer.workers import RolloutWorker

SPEC = AdditionModelSpec(
    num_layers=2,
    num_experts=8,
    top_k=2,
    hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    moe_intermediate_size=16,
    router_std=3.0,
)
CPU = {"device": "cpu", "num_gpus": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("addition")
    make_addition_model(path, SPEC, seed=0)
    return path


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def random_sequences(rng: torch.Generator, count: int) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [
        torch.randint(2, 14, (int(torch.randint(3, 7, (1,), generator=rng)),), generator=rng)
        for _ in range(count)
    ]
    answers = [
        torch.randint(0, 14, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng)
        for _ in range(count)
    ]
    return [p.tolist() for p in prompts], [a.tolist() for a in answers]


def make_batch(
    model: transformers.PreTrainedModel,
    prompts: list[list[int]],
    answers: list[list[int]],
    traces: list[replay.RoutedExperts] | None,
) -> Batch:
    """A batch whose rollout logprobs are ``model``'s, computed replaying ``traces`` (an engine
    identical to the trainer except for the routing it chose), or natively without traces."""
    ctl = replay.patch(model)
    logprobs = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            if traces is None:
                logits = model(ids).logits
            else:
                with ctl.replay([traces[i]]):
                    logits = model(ids).logits
        logprobs.append(token_logprobs(logits, ids)[0, len(p) :].numpy())
    return Batch(
        prompt_token_ids=tuple(map(tuple, prompts)),
        token_ids=tuple(map(tuple, answers)),
        logprobs=tuple(logprobs),
        finish_reasons=("stop",) * len(prompts),
        texts=(None,) * len(prompts),
        traces=None if traces is None else tuple(traces),
    )


def recorded_traces(
    model: transformers.PreTrainedModel, prompts, answers
) -> list[replay.RoutedExperts]:
    ctl = replay.patch(model)
    traces = []
    for p, a in zip(prompts, answers, strict=True):
        with torch.no_grad(), ctl.record() as rec:
            model(torch.tensor([p + a]))
        traces.extend(rec.traces)
    return traces


def perturbed_traces(
    checkpoint: Path, prompts, answers, rng: torch.Generator
) -> list[replay.RoutedExperts]:
    """Routing of a copy of the policy with noisy routers: disagrees on some rows."""
    other = load(checkpoint)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(0.5 * param.std() * torch.randn(param.shape, generator=rng))
    return recorded_traces(other, prompts, answers)


def learner(checkpoint: Path, routing: str, **trainer: object) -> Learner:
    config = TrainerConfig(**{**CPU, "micro_batch_size": 3, "lr": 1e-3, **trainer})
    return Learner(checkpoint, trainer=config, grpo=GRPOConfig(group_size=2), routing=routing)


# ---------------------------------------------------------------------- Batch


def output(prompt, answer, logprobs, routed=None, reason="stop") -> rollout.RequestOutput:
    return rollout.RequestOutput(
        request_id=0,
        prompt_token_ids=prompt,
        token_ids=answer,
        text=None,
        logprobs=np.asarray(logprobs, dtype=np.float32),
        finish_reason=reason,
        num_cached_tokens=0,
        routed_experts=routed,
    )


SPEC_2x8 = rollout.RoutingSpec(
    moe_layers=(0, 2),
    num_experts=8,
    top_k=2,
    method=routing_kernels.RoutingMethod.RENORMALIZE_NAIVE,
)


def test_batch_from_outputs_and_tensors() -> None:
    routed = [np.array([[[0, 1], [2, 3]]] * n, dtype=np.uint8) for n in (4, 2)]
    outs = [
        output([5, 6, 7], [8, 9], [-0.5, -1.5], routed[0]),
        output([5], [3, 0], [-0.25, -2.0], routed[1], reason="length"),
    ]
    batch = Batch.from_outputs(outs, SPEC_2x8)
    assert len(batch) == 2 and batch.num_generated_tokens == 4
    assert batch.finished == [True, False]
    assert batch.traces[0].moe_layers == (0, 2) and batch.traces[1].num_rows == 2
    t = batch.to_tensors(pad_token_id=1)
    assert t.input_ids_BS.tolist() == [[5, 6, 7, 8, 9], [5, 3, 0, 1, 1]]
    assert t.attention_mask_BS.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert t.answer_mask_BS.tolist() == [
        [False, False, False, True, True],
        [False, True, True, False, False],
    ]
    assert t.rollout_logp_BS.tolist() == [[0, 0, 0, -0.5, -1.5], [0, -0.25, -2.0, 0, 0]]
    assert t.lengths_B.tolist() == [5, 3] and t.num_tokens == 8
    picked = batch.select([1])
    assert picked.prompt_token_ids == ((5,),) and picked.traces[0] == batch.traces[1]
    both = Batch.concat([batch.select([1]), batch.select([0])])
    assert both.token_ids == ((3, 0), (8, 9))


def test_batch_errors() -> None:
    good = output([5, 6], [7], [-1.0], np.zeros((2, 2, 2), dtype=np.uint8) + [0, 1])
    bare = output([5, 6], [7], [-1.0])
    with pytest.raises(ValueError, match=r"outputs\[1\]\.routed_experts: expected routing"):
        Batch.from_outputs([good, bare], SPEC_2x8)
    with pytest.raises(ValueError, match="routing_spec: expected the engine's spec"):
        Batch.from_outputs([good])
    with pytest.raises(
        ValueError,
        match=r"traces\[0\]: expected start 0 and 1 rows \(prompt \+ answer - 1\), got start 0 "
        r"and 2",
    ):
        Batch.from_outputs(
            [output([5], [7], [-1.0], np.zeros((2, 2, 2), dtype=np.uint8) + [0, 1])],
            SPEC_2x8,
        )
    with pytest.raises(ValueError, match=r"logprobs\[0\]: expected shape \(1,\)"):
        Batch.from_outputs([output([5], [7], [-1.0, -2.0])])
    with pytest.raises(ValueError, match="routing r3: expected the rollout's routed experts"):
        Batch.from_outputs([bare]).require_traces("routing r3")


# ---------------------------------------------------------------------- ExpertsTap


def test_tap_sees_native_and_replayed_ids(checkpoint: Path, rng: torch.Generator) -> None:
    model = load(checkpoint)
    ctl = replay.patch(model)
    ids = torch.randint(2, 14, (3, 6), generator=rng)
    layout = BatchLayout.dense(3, 6)
    with torch.no_grad(), ctl.record() as rec, ExpertsTap(ctl) as tap:
        model(ids)
    assert tap.traces(layout) == rec.traces
    forced = [
        replay.RoutedExperts(
            torch.rand(5, 2, 8, generator=rng).argsort(-1)[..., :2].numpy(), (0, 1), 8
        )
        for _ in range(3)
    ]
    with torch.no_grad(), ctl.replay(forced), ExpertsTap(ctl) as tap:
        model(ids)
    assert tap.traces(layout) == forced


# ---------------------------------------------------------------------- Learner


def test_r3_without_routing_raises(checkpoint: Path, rng: torch.Generator) -> None:
    prompts, answers = random_sequences(rng, 4)
    batch = make_batch(load(checkpoint), prompts, answers, None)
    with pytest.raises(ValueError, match="routing r3: expected the rollout's routed experts"):
        learner(checkpoint, "r3").step(batch, np.ones(4))


@pytest.mark.parametrize("experts", ["off", "loop"])
def test_r3_replays_the_rollout_routing(
    checkpoint: Path, rng: torch.Generator, experts: str
) -> None:
    prompts, answers = random_sequences(rng, 6)
    traces = perturbed_traces(checkpoint, prompts, answers, rng)
    batch = make_batch(load(checkpoint), prompts, answers, traces)
    advantages = np.linspace(-1, 1, 6)
    r3 = learner(checkpoint, "r3", grouped_experts=experts).step(batch, advantages)
    none = learner(checkpoint, "none", grouped_experts=experts).step(batch, advantages)
    # The noisy routers disagree with the policy's on some rows ...
    assert none["router_agreement"] < 1.0
    assert none["router_agreement"] == none["router_agreement_native"]
    assert r3["router_agreement_native"] == none["router_agreement_native"]
    # ... the replayed forward uses exactly the rollout's experts, and since the "engine"
    # differs from the trainer only in its routing, replay removes the whole mismatch.
    assert r3["router_agreement"] == 1.0
    assert none["kl_k3"] > 1e-10
    assert r3["kl_k3"] < 1e-3 * none["kl_k3"] and r3["extreme_token_fraction"] == 0.0


@pytest.mark.parametrize("routing", ["none", "r2", "r3"])
def test_modes_with_minibatches_update_the_policy(
    checkpoint: Path, rng: torch.Generator, routing: str
) -> None:
    prompts, answers = random_sequences(rng, 8)
    traces = perturbed_traces(checkpoint, prompts, answers, rng)
    batch = make_batch(load(checkpoint), prompts, answers, traces)
    trainer = learner(checkpoint, routing, num_minibatches=2, micro_batch_size=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.step(batch, np.linspace(-1, 1, 8))
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("mlp.gate.weight") for n in changed)  # the router learns, replayed or not
    assert metrics["grad_norm"] > 0 and np.isfinite(metrics["loss"])
    assert metrics["train_tokens"] == sum(
        len(p) + len(a) for p, a in zip(prompts, answers, strict=True)
    )
    if routing == "r2":
        # Updates replay the pre-update policy's own routing: used == native.
        assert metrics["router_agreement"] == metrics["router_agreement_native"]
    if routing == "r3":
        assert metrics["router_agreement"] == 1.0


def test_unknown_routing_mode_raises_naming_the_modes(checkpoint: Path) -> None:
    with pytest.raises(
        ValueError, match=r"routing: expected one of \['none', 'r3', 'r2'\], got 'r4'"
    ):
        learner(checkpoint, "r4")


def test_uneven_minibatches_cover_every_answer_once(checkpoint: Path, rng: torch.Generator) -> None:
    prompts, answers = random_sequences(rng, 7)
    batch = make_batch(load(checkpoint), prompts, answers, None)
    trainer = learner(checkpoint, "none", num_minibatches=3, micro_batch_size=2)
    metrics = trainer.step(batch, np.linspace(-1, 1, 7))
    assert metrics["train_tokens"] == sum(
        len(p) + len(a) for p, a in zip(prompts, answers, strict=True)
    )
    with pytest.raises(
        ValueError,
        match=r"batch: expected at least num_minibatches \(3\) answers, got 2",
    ):
        trainer.step(batch.select([0, 1]), np.ones(2))


def test_metrics_without_traces_have_no_routing_keys(
    checkpoint: Path, rng: torch.Generator
) -> None:
    prompts, answers = random_sequences(rng, 4)
    batch = make_batch(load(checkpoint), prompts, answers, None)
    metrics = learner(checkpoint, "r2").step(batch, np.array([1.0, -1.0, 0.5, -0.5]))
    assert not any(key.startswith("router_agreement") for key in metrics)
    assert metrics["kl_k3"] < 1e-10  # same model, native routing on both sides


def test_checkpoint_resume_continues_identically(
    checkpoint: Path, rng: torch.Generator, tmp_path: Path
) -> None:
    prompts, answers = random_sequences(rng, 6)
    batch = make_batch(load(checkpoint), prompts, answers, None)
    advantages = np.linspace(-1, 1, 6)
    first = learner(checkpoint, "none", num_minibatches=2, micro_batch_size=2)
    first.step(batch, advantages)
    first.save(tmp_path)
    assert (Learner.policy_dir(tmp_path) / "tokenizer.json").exists()
    want = first.step(batch, advantages)
    resumed = learner(Learner.policy_dir(tmp_path), "none", num_minibatches=2, micro_batch_size=2)
    resumed.load_state(tmp_path)
    assert resumed.step_count == 1
    got = resumed.step(batch, advantages)
    for key in ("loss", "kl_k3", "grad_norm", "ratio_mean"):
        assert got[key] == want[key], key
    for (name, a), (_, b) in zip(
        first.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------- weight sync


def test_weight_sync_into_the_engine(
    checkpoint: Path, rng: torch.Generator, tmp_path: Path
) -> None:
    prompts, answers = random_sequences(rng, 4)
    trainer = learner(checkpoint, "none")
    trainer.step(make_batch(load(checkpoint), prompts, answers, None), np.array([1.0, -1, 1, -1]))
    llm_kwargs = {"device": "cpu", "max_num_seqs": 4, "max_model_len": 32}
    worker = RolloutWorker(str(checkpoint), rank=0, seed=0, llm_kwargs=llm_kwargs)
    weights = trainer.named_weights()
    assert worker.update_weights(weights) > 0
    trainer.save(tmp_path)
    fresh = RolloutWorker(str(Learner.policy_dir(tmp_path)), rank=0, seed=0, llm_kwargs=llm_kwargs)
    sampling = [rollout.SamplingParams(max_tokens=5, seed=s) for s in range(4)]
    synced = worker.generate(prompts, sampling)
    reference = fresh.generate(prompts, sampling)
    for a, b in zip(synced, reference, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    partial = {k: v for k, v in weights.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="expected tensors for every engine parameter"):
        worker.update_weights(partial)
    worker.shutdown()
    fresh.shutdown()
