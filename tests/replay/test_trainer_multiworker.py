"""Several rollout workers on one 2-CPU local Ray (fractional CPUs), against one in-process engine.

- 2 and 3 workers (and, marked slow, workers of 2 data-parallel engine ranks each): the prompts
  are split, the answers come back in prompt order, every request's tokens and routing rows
  are those one engine gives it (seeded sampling), logprobs equal to float32 rounding (each
  worker batches other shapes); the routing comes as one object per worker.
- A weight sync reaches every worker: each worker's engine parameters read back equal to a
  reference engine's given the same weights (data-parallel workers: their answers equal that
  engine's after the sync), and each worker reports the new version.
- A worker killed (SIGKILL of its process) fails the next call with ``WorkerDiedError`` naming
  it; a sync with a dead worker changes no engine (the living worker still holds the previous
  weights and version); the group then refuses every call.
- The routing's way to the trainer: ``split_routing`` / ``attach_routing`` give back the traces
  ``Batch.from_outputs`` builds; a shared-memory reader attaches on its store's node only.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import rollout
from replay.trainer.batch import Batch
from replay.trainer.routing_transfer import (
    NodeReaderSpecs,
    attach_routing,
    open_routing_readers,
    split_routing,
)
from replay.trainer.tasks import TINY_ADDITION_SPEC, make_addition_model
from replay.trainer.workers import RolloutWorkers, WorkerDiedError
from rollout.capture import RoutingStore
from rollout.capture.shm import new_instance_id, segment_name
from routing_kernels import RoutingMethod

ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "capture_routing": True,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 32,
    "max_model_len": 32,
    "block_size": 4,
}
# Each worker batches a subset of the requests (other GEMM shapes): float32 logprobs differ by
# rounding, tokens and routing rows are exact (as for data-parallel ranks, test_data_parallel).
LOGPROB_ATOL = 1e-5
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (34, 5), (67, 89), (0, 0), (9, 99), (12, 3), (5, 50)]]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny addition checkpoint and its HF-named weights."""
    path = tmp_path_factory.mktemp("model")
    hf = make_addition_model(path, TINY_ADDITION_SPEC, seed=3)
    return path, {name: t.detach().clone() for name, t in hf.state_dict().items()}


def sampling(rng: torch.Generator) -> list[rollout.SamplingParams]:
    seeds = torch.randint(0, 2**31, (len(PROMPTS),), generator=rng).tolist()
    return [
        rollout.SamplingParams(max_tokens=6, temperature=1.0, seed=s, return_routed_experts=True)
        for s in seeds
    ]


def perturbed(weights: dict[str, torch.Tensor], rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        name: t + 0.05 * torch.randn(t.shape, generator=rng, dtype=t.dtype)
        for name, t in weights.items()
    }


def engine_parameters(actor: object) -> dict[str, torch.Tensor]:
    """The engine's parameters of one rollout worker actor (its process, read back)."""
    # A lambda is pickled by value, so the actor needs no import of this test module.
    peek = lambda worker: {
        n: p.detach().clone() for n, p in worker.llm.engine.runner.model.named_parameters()
    }
    return ray.get(actor.__ray_call__.remote(peek))


def assert_same_answers(batch, reference: list[rollout.RequestOutput]) -> None:
    assert len(batch) == len(reference)
    for i, ref in enumerate(reference):
        assert batch.prompt_token_ids[i] == tuple(ref.prompt_token_ids), f"answer {i}: order"
        assert batch.token_ids[i] == tuple(ref.token_ids), f"answer {i}: tokens differ"
        np.testing.assert_allclose(batch.logprobs[i], ref.logprobs, rtol=0, atol=LOGPROB_ATOL)
        np.testing.assert_array_equal(
            batch.traces[i].ids, ref.routed_experts, err_msg=f"answer {i}: rows differ"
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("num_workers", "data_parallel_size"),
    [
        (3, 1),
        pytest.param(2, 1, marks=pytest.mark.slow),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(3, 2, marks=pytest.mark.slow),
    ],
)
def test_workers_answer_like_one_engine_and_every_worker_gets_the_weights(
    local_ray: None,
    model: tuple[Path, dict[str, torch.Tensor]],
    one_thread: None,
    rng: torch.Generator,
    num_workers: int,
    data_parallel_size: int,
) -> None:
    path, weights = model
    params = sampling(rng)
    new_weights = perturbed(weights, rng)
    with rollout.LLM(path, seed=0, **ENGINE) as reference:
        before = reference.generate(PROMPTS, params, use_tqdm=False)
        reference.update_weights(new_weights.items())
        after = reference.generate(PROMPTS, params, use_tqdm=False)
        synced = {
            n: p.detach().clone() for n, p in reference.engine.runner.model.named_parameters()
        }
    with RolloutWorkers(
        path,
        num_workers=num_workers,
        num_cpus_per_worker=0.25,
        data_parallel_size=data_parallel_size,
        **ENGINE,
    ) as workers:
        assert len({info.pid for info in workers.infos}) == num_workers
        result = workers.rollout(PROMPTS, params)
        assert result.batch.traces is None and len(result.routing) == num_workers
        assert_same_answers(workers.generate(PROMPTS, params), before)
        workers.update_weights(new_weights)
        assert workers.weights_version == 1 and workers.weights_versions() == [1] * num_workers
        if data_parallel_size == 1:  # the parameters live in the actor (else in its ranks)
            for rank, actor in enumerate(workers._actors):
                got = engine_parameters(actor)
                assert got.keys() == synced.keys()
                for name, tensor in synced.items():
                    assert torch.equal(got[name], tensor), f"worker {rank}: {name}"
        assert_same_answers(workers.generate(PROMPTS, params), after)
    # The answers changed with the weights (the sync is not vacuous).
    assert any(a.token_ids != b.token_ids for a, b in zip(before, after, strict=True))


@pytest.mark.timeout(300)
def test_dead_worker_fails_the_call_naming_it_and_nothing_is_half_applied(
    local_ray: None, model: tuple[Path, dict[str, torch.Tensor]], rng: torch.Generator
) -> None:
    path, weights = model
    first, second = perturbed(weights, rng), perturbed(weights, rng)
    workers = RolloutWorkers(path, num_workers=2, num_cpus_per_worker=0.25, **ENGINE)
    try:
        workers.update_weights(first)
        synced = engine_parameters(workers._actors[0])
        survivor = workers._actors[0]
        os.kill(workers.infos[1].pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as err:
            workers.update_weights(second)
        pid = workers.infos[1].pid
        assert str(err.value).startswith(
            f"rollout worker 1 (node {workers.infos[1].node_id[:12]} at "
            f"{workers.infos[1].node_ip}, pid {pid}) died during weight sync 2 (receiving; "
            f"no engine changed)"
        )
        # The living worker dropped what it received: its engine keeps version 1's weights.
        assert ray.get(survivor.weights_version.remote()) == 1
        for name, tensor in engine_parameters(survivor).items():
            assert torch.equal(tensor, synced[name]), name
        assert workers.weights_version == 1
        with pytest.raises(RuntimeError, match=r"rollout workers: unusable since rollout worker 1"):
            workers.generate(PROMPTS, rollout.SamplingParams(max_tokens=2))
    finally:
        workers.shutdown()


@pytest.mark.timeout(300)
def test_worker_killed_before_generate_fails_it_naming_the_worker(
    local_ray: None, model: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, _ = model
    with RolloutWorkers(path, num_workers=2, num_cpus_per_worker=0.25, **ENGINE) as workers:
        os.kill(workers.infos[0].pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=r"^rollout worker 0 \(node .* died during gen"):
            workers.rollout(PROMPTS, rollout.SamplingParams(max_tokens=2))


# ---------------------------------------------------------------------- routing transfer


SPEC = rollout.RoutingSpec(
    moe_layers=(0, 1), num_experts=8, top_k=2, method=RoutingMethod.RENORMALIZE
)


def output(i: int, prompt: int, answer: int, rng: torch.Generator) -> rollout.RequestOutput:
    rows = prompt + answer - 1
    ids_RLK = torch.stack([torch.randperm(8, generator=rng)[:2] for _ in range(rows * 2)])
    return rollout.RequestOutput(
        request_id=i,
        prompt_token_ids=list(range(1, prompt + 1)),
        token_ids=list(range(1, answer + 1)),
        text=None,
        logprobs=np.zeros(answer, dtype=np.float32),
        finish_reason="length",
        num_cached_tokens=0,
        routed_experts=ids_RLK.reshape(rows, 2, 2).numpy().astype(np.uint8),
    )


def test_worker_routing_round_trip(rng: torch.Generator) -> None:
    outputs = [output(i, 3 + i, 2 + (i % 3), rng) for i in range(5)]
    want = Batch.from_outputs(outputs, SPEC)
    halves = [split_routing(outputs[:2], SPEC), split_routing(outputs[2:], SPEC)]
    assert all(out.routed_experts is None for part, _ in halves for out in part)
    packed = [p for _, p in halves]
    assert [len(p) for p in packed] == [2, 3]
    assert packed[0].nbytes == (4 + 6) * 2 * 2
    assert all(a is out.routed_experts for a, out in zip(packed[0].rows, outputs, strict=False))
    bare = Batch.from_outputs([out for part, _ in halves for out in part])
    assert bare.traces is None
    assert attach_routing(bare, packed).traces == want.traces
    with pytest.raises(
        ValueError, match=r"parts: expected routing for the batch's 5 answers, got 3"
    ):
        attach_routing(bare, packed[1:])
    mixed = [outputs[0], dataclasses.replace(outputs[1], routed_experts=None)]
    with pytest.raises(ValueError, match=r"outputs\[1\]\.routed_experts: expected routing"):
        split_routing(mixed, SPEC)
    assert split_routing(mixed[1:], SPEC)[1] is None


def test_routing_readers_attach_on_their_node_only(local_ray: None) -> None:
    here = ray.get_runtime_context().get_node_id()
    name = segment_name(new_instance_id(), 0)
    with RoutingStore(
        name=name, num_kv_slots=16, num_moe_layers=2, top_k=2, max_num_tokens=4, device="cpu"
    ) as store:
        (reader,) = open_routing_readers(NodeReaderSpecs(node_id=here, specs=(store.spec,)))
        assert reader.spec == store.spec
        reader.close()
        elsewhere = NodeReaderSpecs(node_id="f" * len(here), specs=(store.spec,))
        with pytest.raises(ValueError, match=r"shared memory is node-local") as err:
            open_routing_readers(elsewhere)
        assert f"routing stores ['{name}']: expected a reader on their node fff" in str(err.value)
