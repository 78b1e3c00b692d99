"""The model runner on CPU: CUDA-graph buckets, the staging of a scheduled batch into the
static inputs, logits of the sampling rows only (against HF), the after-forward hook and the
capture buffer, KV-cache sizing; gpu: a padded CUDA-graph replay against the eager step and
memory-based KV sizing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rollout.capture import CaptureOff, RoutedExpertsCapturer
from rollout.config import EngineConfig, EngineState
from rollout.engine.cuda_graphs import cuda_graph_sizes
from rollout.engine.kv_cache import CPU_KV_CACHE_BYTES
from rollout.engine.model_runner import ModelRunner
from rollout.engine.scheduler import Scheduler
from rollout.engine.step_inputs import StepBuffers
from rollout.layers.attention import kv_cache_bytes_per_block
from rollout.loader import load_checkpoint
from rollout.sampling_params import SamplingParams
from rollout.testing import flashinfer_overrides, make_tiny_moe

BLOCK = 4


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4"))


@pytest.fixture(scope="module")
def cuda_checkpoint_path(tmp_path_factory):
    overrides = flashinfer_overrides("glm4_moe")
    return make_tiny_moe("glm4_moe", tmp_path_factory.mktemp("glm4_cuda"), **overrides)


class _CaptureProbe:
    """The runner's side of routed-expert capture: a real capturer (or None) as the static
    input, and the batches ``after_forward`` was called with."""

    def __init__(self, capturer: RoutedExpertsCapturer | None = None) -> None:
        self.capturer = capturer
        self.seen = []

    def after_forward(self, batch) -> None:
        self.seen.append(batch)


def _runner(path, device="cpu", dtype="float32", **overrides):
    settings = dict(
        model=str(path),
        device=device,
        dtype=dtype,
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=24,
        kv_cache_blocks=64,
    )
    settings.update(overrides)
    config = EngineConfig(**{k: v for k, v in settings.items() if k != "capture"})
    checkpoint = load_checkpoint(path, device=device, dtype=dtype)
    max_len = config.resolve_max_model_len(checkpoint.hf_config.max_position_embeddings)
    runner = ModelRunner(
        config,
        checkpoint,
        max_model_len=max_len,
        capture=overrides.get("capture"),
    )
    state = EngineState(num_kv_blocks=runner.num_kv_blocks, max_model_len=max_len)
    return runner, Scheduler(config, state, capture=CaptureOff())


def test_cuda_graph_sizes():
    assert cuda_graph_sizes(1) == [1]
    assert cuda_graph_sizes(5) == [1, 2, 4, 5]
    assert cuda_graph_sizes(16) == [1, 2, 4, 8, 16]
    sizes = cuda_graph_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert cuda_graph_sizes(30)[-2:] == [24, 30]


def test_stage_table_pads_with_minus_one():
    buffers = StepBuffers({"t": (20, torch.int32)}, torch.device("cpu"))
    host, device = buffers.stage_table("t", [[3, 4, 5], [], [7]], num_rows=4)
    assert host is not None and device.shape == (4, 3)
    assert device.tolist() == [[3, 4, 5], [-1, -1, -1], [7, -1, -1], [-1, -1, -1]]
    host, _ = buffers.stage_table("t", [], num_rows=2)
    assert host.tolist() == [[-1], [-1]]


def test_prepare_and_run_follow_the_schedule(checkpoint_path, rng):
    """Each step's forward inputs are the scheduled lists, the logits are HF's at the sampling
    rows only, the hook sees every batch, and the capture buffer's rows [:T] are written."""
    checkpoint = load_checkpoint(checkpoint_path, device="cpu")
    routing = checkpoint.model.routing_params
    layers = len(checkpoint.model.moe_layers)
    probe = _CaptureProbe(
        RoutedExpertsCapturer(24, layers, routing.top_k, device="cpu", dtype=torch.uint8)
    )
    capture, seen = probe.capturer.buffer, probe.seen
    capture.fill_(255)
    runner, scheduler = _runner(checkpoint_path, capture=probe)
    hf = AutoModelForCausalLM.from_pretrained(
        checkpoint_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompts = [torch.randint(0, 300, (n,), generator=rng).tolist() for n in (7, 30, 3)]
    seqs = [scheduler.add(p, SamplingParams(max_tokens=3, temperature=0.0)) for p in prompts]
    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        inputs = runner.prepare(batch)
        forward = inputs.forward
        assert forward.input_ids.tolist() == batch.input_ids
        assert forward.positions.tolist() == batch.positions
        assert forward.slot_mapping.tolist() == batch.slot_mapping
        assert forward.query_start_loc_cpu.tolist() == batch.query_start_loc
        assert forward.seq_lens_cpu.tolist() == batch.seq_lens
        for row, table in zip(forward.block_tables_cpu.tolist(), batch.block_tables):
            assert row[: len(table)] == table and set(row[len(table) :]) <= {-1}
        assert inputs.graph_size is None and inputs.logits_indices.tolist() == batch.logits_indices
        capture.fill_(255)
        logits = runner.run(inputs)
        assert seen[-1] is batch
        assert logits.dtype == torch.float32 and logits.shape == (len(batch.sample_indices), 384)
        t = batch.num_tokens
        assert int(capture[:t].max()) < routing.num_experts and bool((capture[t:] == 255).all())
        for row, index in enumerate(batch.sample_indices):
            entry = batch.entries[index]
            with torch.no_grad():
                want = hf(input_ids=torch.tensor([entry.seq.token_ids[: entry.end]])).logits[0, -1]
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=0)
        token_ids, logprobs = runner.sample(logits, inputs)
        assert token_ids == logits.argmax(dim=-1).tolist()
        scheduler.postprocess(batch, token_ids, logprobs)
        steps += 1
    assert len(seen) == steps and all(s.finish_reason == "length" for s in seqs)
    assert any(not scheduler_batch.is_decode for scheduler_batch in seen)


def test_capture_buffer_is_checked(checkpoint_path):
    for rows, layers, top_k in ((8, 2, 4), (24, 2, 5), (24, 3, 4)):
        capturer = RoutedExpertsCapturer(rows, layers, top_k, device="cpu")
        with pytest.raises(ValueError, match=r"capturer: expected a buffer \[>= 24, 2, 4\]"):
            _runner(checkpoint_path, capture=_CaptureProbe(capturer))


def test_cpu_kv_cache_size(checkpoint_path):
    runner, _ = _runner(checkpoint_path, kv_cache_blocks=None, max_num_seqs=3, max_model_len=50)
    assert runner.num_kv_blocks == 3 * math.ceil(50 / BLOCK)
    assert runner.kv_cache.shape[1] == runner.num_kv_blocks and not runner.graph_sizes
    big, _ = _runner(checkpoint_path, kv_cache_blocks=None, max_num_seqs=256, block_size=256)
    per_block = kv_cache_bytes_per_block(big.spec, 256, torch.float32)
    assert big.num_kv_blocks == min(256 * 2, CPU_KV_CACHE_BYTES // per_block)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_step(cuda_checkpoint_path, rng):
    """Three decoding sequences replay in the size-4 graph (one padding row): the logits equal
    those of the same step run eagerly."""
    prompts = [torch.randint(0, 300, (n,), generator=rng).tolist() for n in (5, 9, 14)]
    results = []
    for eager in (True, False):
        runner, scheduler = _runner(
            cuda_checkpoint_path,
            device="cuda",
            dtype="bfloat16",
            enforce_eager=eager,
            max_num_batched_tokens=64,
        )
        for p in prompts:
            scheduler.add(p, SamplingParams(max_tokens=4, temperature=0.0))
        step_logits = []
        while scheduler.has_unfinished():
            batch = scheduler.schedule()
            inputs = runner.prepare(batch)
            if batch.is_decode:
                assert inputs.graph_size == (None if eager else 4)
            logits = runner.run(inputs)
            step_logits.append(logits.cpu())
            scheduler.postprocess(batch, *runner.sample(logits, inputs))
        results.append(step_logits)
    for eager_logits, graph_logits in zip(*results, strict=True):
        torch.testing.assert_close(graph_logits, eager_logits, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.whole_gpu
def test_cuda_kv_cache_sized_from_memory(cuda_checkpoint_path):
    utilization = 0.3
    probe = _CaptureProbe()
    runner, _ = _runner(
        cuda_checkpoint_path,
        device="cuda",
        dtype="bfloat16",
        kv_cache_blocks=None,
        gpu_memory_utilization=utilization,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        capture=probe,
    )
    assert probe.seen == [], "the profiling step's slots are not the cache's: no after_forward"
    torch.cuda.empty_cache()  # cached free blocks are not in use
    free, total = torch.cuda.mem_get_info()
    cache_bytes = runner.num_kv_blocks * runner.kv.bytes_per_block
    print(
        f"KV cache {cache_bytes / 2**30:.2f} GiB; in use {(total - free) / 2**30:.2f} GiB "
        f"of {total / 2**30:.0f} GiB"
    )
    # Within the budget, give or take the CUDA graphs captured after sizing.
    assert total - free <= utilization * total + 2**30
    assert cache_bytes >= 0.5 * utilization * total
