"""replay.trainer with FSDP2 (``trainer.world_size > 1``) on CPU: two gloo ranks in spawned
processes train on their shares of a batch, and the update, the metrics, the gathered weights
and the checkpoint equal those of one rank on the whole batch; the Ray trainer group does the
same with two actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch.distributed.tensor import DTensor

import replay
from replay.trainer import distributed
from replay.trainer.batch import Batch
from replay.trainer.config import GRPOConfig, TrainConfig, TrainerConfig
from replay.trainer.learner import Learner
from replay.trainer.tasks import AdditionModelSpec, make_addition_model
from replay.trainer.trainer_group import start_trainer

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
WORLD = 2
# Adam's first step is lr * g / (|g| + eps): a larger eps keeps it linear in small gradients,
# so float rounding in the gradients stays rounding in the weights (with eps 1e-8 a gradient
# that is float noise around 0 moves a weight by +-lr either way).
BASE = {
    "device": "cpu",
    "num_gpus": 0.0,
    "lr": 0.05,
    "adam_eps": 1e-2,
    "micro_batch_size": 2,
}
CASES: dict[str, dict[str, Any]] = {
    # No clipping: a wrong gradient scale across ranks would show in the weights.
    "r3": {"trainer": {"max_grad_norm": 0.0}, "grpo": {}},
    # Old pass, reference model, TIS, GSPO's per-sequence normaliser, global-norm clipping.
    "r3_gspo_kl_tis": {
        "trainer": {"num_minibatches": 2, "max_grad_norm": 0.5},
        "grpo": {"ratio": "sequence", "kl_coef": 0.1, "tis_cap": 2.0},
    },
}
COMPARED = (
    "loss",
    "policy_loss",
    "kl_ref",
    "kl_k3",
    "extreme_token_fraction",
    "grad_norm",
    "ratio_mean",
    "clip_fraction",
    "tis_weight_mean",
    "router_agreement",
    "router_agreement_native",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("addition")
    make_addition_model(path, SPEC, seed=0)
    return path


def make_learner(checkpoint: Path, case: str, world_size: int) -> Learner:
    trainer = TrainerConfig(**{**BASE, **CASES[case]["trainer"], "world_size": world_size})
    grpo = GRPOConfig(group_size=2, **CASES[case]["grpo"])
    return Learner(checkpoint, trainer=trainer, grpo=grpo, routing="r3", seed=3)


def random_batch(rng: torch.Generator, count: int) -> tuple[Batch, np.ndarray]:
    """Answers with random routing traces (replay forces them) and rollout logprobs."""
    prompts, answers, traces = [], [], []
    for _ in range(count):
        p = torch.randint(2, 14, (int(torch.randint(3, 7, (1,), generator=rng)),), generator=rng)
        a = torch.randint(0, 14, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng)
        rows = len(p) + len(a) - 1
        ids = torch.rand(rows, SPEC.num_layers, SPEC.num_experts, generator=rng).argsort(-1)
        traces.append(
            replay.RoutedExperts(ids[..., : SPEC.top_k].numpy(), (0, 1), SPEC.num_experts)
        )
        prompts.append(tuple(p.tolist()))
        answers.append(tuple(a.tolist()))
    batch = Batch(
        prompt_token_ids=tuple(prompts),
        token_ids=tuple(answers),
        logprobs=tuple(
            (-3 * torch.rand(len(a), generator=rng)).numpy().astype(np.float32) for a in answers
        ),
        finish_reasons=("stop",) * count,
        texts=(None,) * count,
        traces=tuple(traces),
    )
    advantages = torch.randn(count, generator=rng).numpy()
    return batch, advantages


def _rank_main(rank: int, port: int, checkpoint: Path, batch: Batch, adv: np.ndarray, out: Path):
    """One of the two ranks: each case's step, its weights and metrics; a checkpoint; a resumed
    step; the uneven-batch error. Rank 0 saves what it got to ``out/rank0.pt``."""
    torch.set_num_threads(1)
    distributed.init_process_group(
        rank=rank,
        world_size=WORLD,
        master_addr="127.0.0.1",
        master_port=port,
        device="cpu",
    )
    results: dict[str, Any] = {}
    for case in CASES:
        learner = make_learner(checkpoint, case, WORLD)
        metrics = learner.step(batch, adv)
        weights = learner.named_weights()
        assert (weights == {}) == (rank != 0)
        results[case] = (metrics, weights)
        if case == "r3":
            learner.save(out / "ckpt")
    dist.barrier()  # rank 0 has written the checkpoint
    resumed = make_learner(Learner.policy_dir(out / "ckpt"), "r3", WORLD)
    resumed.load_state(out / "ckpt")
    resumed.step(batch, adv)
    results["resumed"] = (None, resumed.named_weights())
    try:
        resumed.step(batch.select(range(len(batch) - 1)), adv[:-1])
    except ValueError as err:
        results["uneven"] = str(err)
    if rank == 0:
        torch.save(results, out / "rank0.pt")
    dist.destroy_process_group()


def assert_weights_close(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what  # HF names, in model order
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-6, rtol=0, msg=f"{what}: {name}")


def assert_metrics_close(got: dict, want: dict, case: str) -> None:
    for key in COMPARED:
        assert (key in got) == (key in want), (case, key)
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (case, key)
    assert got["router_agreement"] == 1.0
    assert got["router_agreement_per_layer"] == want["router_agreement_per_layer"]
    assert got["train_tokens"] == want["train_tokens"]


def test_two_ranks_match_one_rank(checkpoint: Path, rng: torch.Generator, tmp_path: Path) -> None:
    batch, advantages = random_batch(rng, 8)
    mp.spawn(
        _rank_main,
        args=(distributed.free_port(), checkpoint, batch, advantages, tmp_path),
        nprocs=WORLD,
    )
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    initial = dict(transformers.AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters())
    singles = {case: make_learner(checkpoint, case, 1) for case in CASES}
    for case, single in singles.items():
        want_metrics = single.step(batch, advantages)
        want = single.named_weights()
        metrics, weights = got[case]
        assert_metrics_close(metrics, want_metrics, case)
        assert_weights_close(weights, want, case)
        moved = max(float((want[n] - initial[n].detach()).abs().max()) for n in want)
        assert moved > 1e-3, case  # the step changed the policy well beyond the tolerance
    # The checkpoint of two ranks holds the gathered policy, and its optimizer state resumes
    # on two ranks and on one like the uninterrupted run.
    saved = dict(
        transformers.AutoModelForCausalLM.from_pretrained(
            Learner.policy_dir(tmp_path / "ckpt")
        ).named_parameters()
    )
    assert_weights_close({n: p.detach() for n, p in saved.items()}, got["r3"][1], "saved")
    # The rollout engine picks its model class by this, so FSDP's class must not leak into it.
    config = transformers.AutoConfig.from_pretrained(Learner.policy_dir(tmp_path / "ckpt"))
    assert config.architectures == ["Qwen3MoeForCausalLM"]
    singles["r3"].step(batch, advantages)
    want = singles["r3"].named_weights()
    assert_weights_close(got["resumed"][1], want, "resumed on 2 ranks")
    one = make_learner(Learner.policy_dir(tmp_path / "ckpt"), "r3", 1)
    one.load_state(tmp_path / "ckpt")
    assert one.step_count == 1
    one.step(batch, advantages)
    assert_weights_close(one.named_weights(), want, "resumed on 1 rank")
    assert got["uneven"] == (
        "batch: expected a multiple of num_minibatches x world_size (2) answers (every rank "
        "trains on an equal share of each minibatch), got 7"
    )


def test_world_size_needs_a_process_group(checkpoint: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"trainer\.world_size: expected an initialised torch\.distributed process group "
        r"of 2 ranks \(TrainerWorker joins one\), got none",
    ):
        make_learner(checkpoint, "r3", 2)


def test_world_size_config_errors() -> None:
    with pytest.raises(ValueError, match=r"world_size: expected an int >= 1, got 0"):
        TrainerConfig(device="cpu", num_gpus=0, world_size=0)
    with pytest.raises(TypeError, match=r"world_size: expected an int, got float 2\.0"):
        TrainerConfig(device="cpu", num_gpus=0, world_size=2.0)
    with pytest.raises(
        ValueError,
        match=r"num_gpus: expected 1 with world_size 2 \(one GPU per trainer rank\)",
    ):
        TrainerConfig(device="cuda", num_gpus=0.5, world_size=2)
    assert TrainerConfig(device="cuda", num_gpus=1, world_size=4).world_size == 4
    trainer = TrainerConfig(device="cpu", num_gpus=0, world_size=3, num_minibatches=2)
    with pytest.raises(
        ValueError,
        match=r"trainer\.world_size: expected every minibatch \(16 // 2 answers\) to split "
        r"evenly over the trainer ranks, got 3",
    ):
        TrainConfig(
            model="m",
            trainer=trainer,
            grpo=GRPOConfig(prompts_per_step=4, group_size=4),
        )


def test_shard_policy_needs_decoder_layers() -> None:
    with pytest.raises(ValueError, match=r"model: expected decoder layers named by "):
        distributed.shard_policy(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_trainer_group_of_two_ranks(
    checkpoint: Path, rng: torch.Generator, tmp_path: Path
) -> None:
    batch, advantages = random_batch(rng, 8)
    single = make_learner(checkpoint, "r3_gspo_kl_tis", 1)
    want_metrics = single.step(batch, advantages)
    case = CASES["r3_gspo_kl_tis"]
    trainer = TrainerConfig(**{**BASE, **case["trainer"], "world_size": WORLD, "num_cpus": 1})
    ray.init(num_cpus=WORLD, include_dashboard=False, log_to_driver=False)
    try:
        group = start_trainer(
            checkpoint,
            trainer=trainer,
            grpo=GRPOConfig(group_size=2, **case["grpo"]),
            routing="r3",
            seed=3,
        )
        assert group.world_size == WORLD and group.moe_layers() == (0, 1)
        assert_metrics_close(group.step(batch, advantages), want_metrics, "ray")
        assert_weights_close(ray.get(group.named_weights()), single.named_weights(), "ray")
        group.save(tmp_path)
        group.shutdown()
    finally:
        ray.shutdown()
    saved = transformers.AutoModelForCausalLM.from_pretrained(Learner.policy_dir(tmp_path))
    assert_weights_close(
        {n: p.detach() for n, p in saved.named_parameters()},
        single.named_weights(),
        "saved",
    )
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    # The optimizer state is keyed by HF parameter name (resumable on any number of ranks).
    names = set(state["optimizer"]["state"])
    assert state["step"] == 1 and names and names <= {n for n, _ in saved.named_parameters()}


def _one_rank_main(rank: int, port: int, device: str, checkpoint: Path, out: Path) -> None:
    """FSDP2 on one rank (on CUDA a one-rank NCCL group): a replayed forward, backward and
    clipped AdamW step of the sharded policy against the same model unsharded on that device."""
    distributed.init_process_group(
        rank=rank, world_size=1, master_addr="127.0.0.1", master_port=port, device=device
    )
    gen = torch.Generator().manual_seed(port)
    ids_BS = torch.randint(0, 14, (4, 9), generator=gen).to(device)
    experts = torch.rand(4, 8, SPEC.num_layers, SPEC.num_experts, generator=gen).argsort(-1)
    traces = [
        replay.RoutedExperts(e[..., : SPEC.top_k].numpy(), (0, 1), SPEC.num_experts)
        for e in experts
    ]
    results = {}
    for sharded in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        model.to(device)
        ctl = replay.patch(model)
        if sharded:
            distributed.shard_policy(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-2)
        with ctl.replay(traces):
            logits_BSV = model(input_ids=ids_BS).logits
        loss = torch.nn.functional.cross_entropy(
            logits_BSV[:, :-1].flatten(0, 1), ids_BS[:, 1:].flatten()
        )
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norm = distributed.full_tensor(torch.nn.utils.get_total_norm(grads))
        torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), 0.5, norm)
        optimizer.step()
        state = distributed.full_optimizer_state(model, optimizer)
        results[sharded] = {
            "loss": loss.item(),
            "grad_norm": float(norm),
            "weights": {k: v.cpu() for k, v in distributed.full_model_state(model).items()},
            "exp_avg": {k: v["exp_avg"].cpu() for k, v in state["state"].items()},
            "sharded": any(isinstance(p, DTensor) for p in model.parameters()),
        }
    torch.save(results, out / "one_rank.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_fsdp2_on_one_gpu_matches_the_unsharded_policy(checkpoint: Path, tmp_path: Path) -> None:
    port = distributed.free_port()
    mp.spawn(_one_rank_main, args=(port, "cuda", checkpoint, tmp_path), nprocs=1)
    check_one_rank_matches_unsharded(tmp_path)


def check_one_rank_matches_unsharded(out: Path) -> None:
    results = torch.load(out / "one_rank.pt", weights_only=False)
    plain, sharded = results[False], results[True]
    assert sharded["sharded"] and not plain["sharded"]
    assert sharded["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert sharded["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    assert sharded["grad_norm"] > 0.5  # clipped: the norm's value reached the update
    assert_weights_close(sharded["weights"], plain["weights"], "one rank")
    assert sharded["exp_avg"].keys() == plain["exp_avg"].keys() != set()
    for name, tensor in plain["exp_avg"].items():
        torch.testing.assert_close(sharded["exp_avg"][name], tensor, atol=1e-6, rtol=1e-5)
