"""replay.trainer weight sync by CUDA IPC (``trainer.weight_sync: cuda_ipc``): the config checks
and input errors on CPU; on CUDA a trainer and rollout workers sharing one GPU as Ray actors,
the IPC-synced engines ending with the same weights as object-store-synced ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

import rollout
from replay.trainer.config import (
    GRPOConfig,
    RolloutConfig,
    TrainConfig,
    TrainerConfig,
    load_config,
)
from replay.trainer.tasks import AdditionModelSpec, make_addition_model
from replay.trainer.trainer_group import start_trainer
from replay.trainer.weight_sync import (
    SharedCudaTensors,
    open_cuda_tensors,
    share_cuda_tensors,
)
from replay.trainer.workers import RolloutWorkers

# FlashInfer's attention (the engine on CUDA) needs head_dim 64.
SPEC = AdditionModelSpec(
    num_layers=2,
    num_experts=8,
    top_k=2,
    hidden_size=128,
    num_heads=2,
    num_kv_heads=1,
    head_dim=64,
    moe_intermediate_size=64,
)


def test_cuda_ipc_config_needs_cuda_and_one_rank() -> None:
    assert TrainerConfig().weight_sync == "object_store"
    assert TrainerConfig(weight_sync="cuda_ipc").weight_sync == "cuda_ipc"
    with pytest.raises(
        ValueError,
        match=r"^weight_sync: expected 'object_store' with device cpu \('cuda_ipc' shares CUDA "
        r"memory\), got 'cuda_ipc'$",
    ):
        TrainerConfig(device="cpu", num_gpus=0, weight_sync="cuda_ipc")
    with pytest.raises(
        ValueError,
        match=r"^weight_sync: expected 'object_store' with world_size 2 \('cuda_ipc' needs the "
        r"rollout workers on the trainer's GPU\), got 'cuda_ipc'$",
    ):
        TrainerConfig(world_size=2, num_gpus=1, weight_sync="cuda_ipc")
    with pytest.raises(
        ValueError,
        match=r"^weight_sync: expected one of \['object_store', 'cuda_ipc'\], got 'nccl'",
    ):
        TrainerConfig(weight_sync="nccl")
    cpu_rollout = RolloutConfig(device="cpu", num_gpus_per_worker=0)
    with pytest.raises(
        ValueError,
        match=r"^trainer\.weight_sync: expected 'object_store' with rollout\.device cpu "
        r"\('cuda_ipc' shares CUDA memory\), got 'cuda_ipc'$",
    ):
        TrainConfig(
            model="m",
            rollout=cpu_rollout,
            trainer=TrainerConfig(weight_sync="cuda_ipc"),
        )
    # From YAML overrides, the error names the section too.
    with pytest.raises(ValueError, match=r"^trainer\.weight_sync: expected 'object_store' with"):
        load_config(
            None,
            [
                "model=m",
                "trainer.device=cpu",
                "trainer.num_gpus=0",
                "trainer.weight_sync=cuda_ipc",
            ],
        )


def test_share_and_open_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"tensors: expected at least one tensor to share"):
        share_cuda_tensors({})
    with pytest.raises(
        ValueError, match=r"tensors\['w'\]: expected a CUDA tensor .* got device cpu"
    ):
        share_cuda_tensors({"w": torch.zeros(2)})
    with (
        pytest.raises(TypeError, match=r"shared: expected SharedCudaTensors, got dict"),
        open_cuda_tensors({}),  # type: ignore[arg-type]
    ):
        pass
    # A GPU this process cannot see (or no CUDA at all) is named in the error.
    unknown = SharedCudaTensors(device_uuid="GPU-not-here", handles=())
    with (
        pytest.raises(
            ValueError,
            match=r"trainer\.weight_sync: expected (CUDA in the receiving process|the trainer's "
            r"GPU GPU-not-here among this process's GPUs)",
        ),
        open_cuda_tensors(unknown),
    ):
        pass


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_cuda_ipc_sync_into_colocated_engines(tmp_path: Path) -> None:
    """Trainer and two rollout workers on one GPU: the trainer (another checkpoint than the
    workers') pushes its weights by CUDA IPC into one worker and through the object store into
    the other; both engines then hold the same weights, not the ones they started with."""
    engine_path, trainer_path = tmp_path / "engine", tmp_path / "trainer"
    make_addition_model(engine_path, SPEC, seed=0)
    make_addition_model(trainer_path, SPEC, seed=1)
    engine = {
        "dtype": "bfloat16",
        "device": "cuda",
        "max_num_seqs": 8,
        "max_model_len": 32,
        "kv_cache_blocks": 64,
        "enforce_eager": True,
    }

    def engine_weights(worker: RolloutWorkers) -> dict[str, torch.Tensor]:
        # A lambda is pickled by value, so the actor needs no import of this test module.
        peek = lambda actor_self: {
            n: p.detach().cpu() for n, p in actor_self.llm.engine.runner.model.named_parameters()
        }
        return ray.get(worker._actors[0].__ray_call__.remote(peek))

    prompts = ["12+34=", "5+6=", "99+1="]
    sampling = [rollout.SamplingParams(max_tokens=4, seed=s) for s in range(len(prompts))]
    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        trainer = start_trainer(
            trainer_path,
            trainer=TrainerConfig(num_gpus=0.3, weight_sync="cuda_ipc"),
            grpo=GRPOConfig(),
            routing="none",
            seed=0,
        )
        ipc = RolloutWorkers(engine_path, num_gpus_per_worker=0.3, **engine)
        store = RolloutWorkers(engine_path, num_gpus_per_worker=0.3, **engine)
        before = engine_weights(ipc)
        trainer.push_weights(ipc)
        store.update_weights(trainer.named_weights())
        synced, reference = engine_weights(ipc), engine_weights(store)
        assert synced.keys() == reference.keys() == before.keys()
        for name, tensor in reference.items():
            assert torch.equal(synced[name], tensor), name
        assert any(not torch.equal(before[n], t) for n, t in reference.items())
        got, want = ipc.generate(prompts, sampling), store.generate(prompts, sampling)
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs, strict=True):
            assert a.tolist() == b.tolist()
        # The handles were released: a second push shares afresh.
        trainer.push_weights(ipc)
        for name, tensor in engine_weights(ipc).items():
            assert torch.equal(tensor, reference[name]), name
        ipc.shutdown()
        store.shutdown()
        trainer.shutdown()
    finally:
        ray.shutdown()
