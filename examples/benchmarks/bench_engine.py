"""Engine decode throughput at Qwen3-30B-A3B's shape against the HBM roofline and HF generate.

The model: Qwen3-30B-A3B's exact shape (48 layers, hidden 2048, 32 query / 4 KV heads of 128,
128 experts, top-8, expert intermediate 768, vocabulary 151936) written as a config.json to
a temporary folder and loaded with ``load_format="dummy"`` (random bf16 weights: no download).

Per batch size B (1, 16, 64, 256) the engine generates 256 tokens after 512-token random
prompts (temperature 1, ``ignore_eos``). Only decode is timed: the clock starts once every
request has its first token (all prefills done) and stops when the last one finishes; tokens/s
counts the tokens generated in between.

Roofline: each decode step must read the weights it touches and the KV cache of its
sequences. Weights touched: every parameter except the routed experts and the embedding
table; of the experts, the expected number of distinct ones hit by B * top_k uniform picks
(``E * (1 - (1 - K / E) ** B)`` per layer, each ``3 * H * I`` weights); of the embedding, B
rows. KV read: each sequence's whole context per step. Summed over the timed steps, over the
measured device copy bandwidth (``common.copy_bandwidth_gbps``), that is the fastest the
decode could be; "% roofline" is that time over the measured one.

HF: ``Qwen3MoeForCausalLM`` built from the same config whose parameters are views of the
engine's weights (the same numbers without a second copy in memory), bf16, ``generate`` with
the same prompts at B = 1 and 16 for ``--hf-tokens`` new tokens; its decode time is the time of
that run minus a one-token run (the prefill).

    python examples/benchmarks/bench_engine.py               # the full model (H100: batch 256
                                                             # does not fit; H200 runs all)
    python examples/benchmarks/bench_engine.py --layers 4    # a quick run

Prints a Markdown table. ``--time-budget`` (seconds, default 330) skips what would not finish
in time, so the script ends in under 6 minutes on an H100.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from common import copy_bandwidth_gbps, device_events, print_table, totals_by_name
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from rollout import LLM, SamplingParams
from rollout.layers.linear import Linear
from rollout.models.decoder import MoECausalLM
from rollout.sampler import SampledTokens

BATCHES = (1, 16, 64, 256)
HF_BATCHES = (1, 16)
INPUT_LEN, OUTPUT_LEN = 512, 256


def qwen3_30b_a3b_config(num_layers: int) -> Qwen3MoeConfig:
    """Qwen3-30B-A3B's configuration, optionally with fewer layers."""
    config = Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected number of distinct experts hit by ``batch`` rows of ``top_k`` uniform picks."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def weight_bytes_per_step(model: MoECausalLM, batch: int) -> float:
    """Bytes of weights one decode step of ``batch`` sequences reads (module docstring)."""
    routing = model.routing_params
    expert_fraction = (
        expected_distinct_experts(routing.num_experts, routing.top_k, batch) / routing.num_experts
    )
    total = 0.0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if ".mlp.experts." in name:
            nbytes *= expert_fraction
        elif name == "model.embed_tokens.weight":
            nbytes = batch * param.shape[1] * param.element_size()
        total += nbytes
    return total


def kv_bytes_per_token(model: MoECausalLM, dtype: torch.dtype) -> int:
    spec = model.attention_spec
    itemsize = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * itemsize


def run_engine_decode(
    llm: LLM, prompts: list[list[int]], *, return_routed_experts: bool = False
) -> tuple[float, int, int, list[int]]:
    """Generate for ``prompts``; return (decode seconds, decode tokens, decode steps, the
    context length of every sequence at each decode step, summed per step)."""
    engine = llm.engine
    params = SamplingParams(
        max_tokens=OUTPUT_LEN,
        temperature=1.0,
        ignore_eos=True,
        return_routed_experts=return_routed_experts,
    )
    for prompt in prompts:
        engine.add_request(prompt, params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_generated_tokens == 0 for s in scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    generated_before = sum(s.num_generated_tokens for s in scheduler.running)
    context_per_step: list[int] = []
    start = time.perf_counter()
    while engine.has_unfinished():
        context_per_step.append(sum(len(s) for s in scheduler.running))
        engine.step()
    if engine.pipelined:
        context_per_step.pop()  # the last step() only collected the batch in flight
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = len(prompts) * OUTPUT_LEN - generated_before
    assert engine.stats.num_preemptions == 0, "preempted: the timing would include recompute"
    return seconds, tokens, len(context_per_step), context_per_step


def profile_decode(llm: LLM, prompts: list[list[int]], steps: int = 32) -> None:
    """Print where a decode step's time goes: host time per phase of ``engine.step()`` (each
    phase's calls timed in place, without extra synchronisation) and the GPU kernels of
    ``steps`` decode steps (torch profiler), so host-bound and GPU-bound steps can be told
    apart. A step launches batch N+1 (schedule .. advance) before it waits for batch N's
    tokens and postprocesses them; "wait for batch N" is its only wait for the GPU but one:
    with routing capture, "run" files batch N's rows (waiting for N's forward, while N+1 is
    queued). "other" is the rest of ``step()`` (outputs, engine overhead)."""
    engine, scheduler, runner = llm.engine, llm.engine.scheduler, llm.engine.runner
    params = SamplingParams(max_tokens=steps + 8, temperature=1.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    while scheduler.waiting or any(s.num_generated_tokens == 0 for s in scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    timed = [
        (scheduler, "schedule", "schedule"),
        (runner, "prepare", "prepare"),
        (runner, "run", "run (launch)"),
        (runner, "sample_async", "sample (launch)"),
        (scheduler, "advance", "advance"),
        (SampledTokens, "tolist", "wait for batch N"),
        (scheduler, "postprocess", "postprocess"),
    ]
    phases = dict.fromkeys([name for *_, name in timed], 0.0)

    def timer(function, name):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - start

        return timed_call

    originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in timed]
    for owner, attribute, name in timed:
        setattr(owner, attribute, timer(getattr(owner, attribute), name))
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            begin = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - begin
    finally:
        for owner, attribute, original in originals:
            if isinstance(owner, type):
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)  # the class's method shows again
    phases["other"] = wall - sum(phases.values())
    kernels = device_events(prof)
    gpu_us = sum(e.device_time for e in kernels)
    print(
        f"\nbatch {len(prompts)}: {1e3 * wall / steps:.2f} ms/step wall, GPU kernels "
        f"{gpu_us / 1e3 / steps:.2f} ms/step ({len(kernels) / steps:.0f} kernels/step, busy "
        f"{100 * gpu_us / 1e6 / wall:.0f}%)\n"
    )
    print_table(["phase", "ms/step"], [[n, 1e3 * t / steps] for n, t in phases.items()])
    totals = totals_by_name(kernels, steps, lambda e: e.device_time)
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:15]
    print()
    print_table(["kernel", "us/step", "calls/step"], [[n, t, c] for n, (t, c) in top])
    for seq in list(scheduler.running) + list(scheduler.waiting):
        engine.abort_request(seq.seq_id)
    while engine.has_unfinished():  # the batch in flight
        engine.step()


def hf_sharing_weights(model: MoECausalLM, config: Qwen3MoeConfig) -> Qwen3MoeForCausalLM:
    """An HF model whose parameters are views of ``model``'s (fused projections split back
    into HF's q/k/v and gate/up), so both run on the very same weights in one copy."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, Linear) and len(module.shards) > 1:
            prefix = module_name.rpartition(".")[0]
            for shard, (start, end) in module.shards.items():
                state[f"{prefix}.{shard}_proj.{kind}"] = tensor[start:end]
        else:
            state[name] = tensor
    device = next(model.parameters()).device
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(config)
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not meta, f"HF tensors left on the meta device: {meta[:5]}"
    return hf.eval()


def run_hf_decode(hf: Qwen3MoeForCausalLM, prompts: list[list[int]], new_tokens: int) -> float:
    """HF decode tokens/s: ``generate`` of ``new_tokens`` minus a one-token run (prefill)."""
    ids = torch.tensor(prompts, device="cuda")

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(2)  # warm-up
    prefill = generate(1)
    full = generate(new_tokens)
    return len(prompts) * (new_tokens - 1) / (full - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48, help="decoder layers (48: the model)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--hf-tokens", type=int, default=32, help="HF generate's new tokens")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds for it all")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a step profile for each batch",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_engine: needs a CUDA device")
    began = time.perf_counter()

    def time_left() -> float:
        return args.time_budget - (time.perf_counter() - began)

    bandwidth = copy_bandwidth_gbps()
    config = qwen3_30b_a3b_config(args.layers)
    gen = torch.Generator().manual_seed(0)
    max_batch = max(args.batches)
    prompts = torch.randint(0, config.vocab_size, (max_batch, INPUT_LEN), generator=gen).tolist()
    rows: dict[int, list] = {}
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        start = time.perf_counter()
        llm = LLM(
            Path(folder),
            dtype="bfloat16",
            load_format="dummy",
            max_num_seqs=max_batch,
            max_num_batched_tokens=8192,
            max_model_len=INPUT_LEN + OUTPUT_LEN,
            gpu_memory_utilization=0.92,
        )
        startup = time.perf_counter() - start
        stats = llm.stats
        model = llm.engine.runner.model
        kv_token_bytes = kv_bytes_per_token(model, torch.bfloat16)
        blocks_per_seq = math.ceil((INPUT_LEN + OUTPUT_LEN) / stats.block_size)
        for batch in args.batches:
            row = rows[batch] = [batch, "-", "-", "-", "-", "-", "-"]
            if batch * blocks_per_seq > stats.num_kv_blocks:
                row[1] = f"KV cache holds {stats.num_kv_blocks // blocks_per_seq} sequences"
                continue
            if time_left() < 60:
                row[1] = "skipped (time budget)"
                continue
            seconds, tokens, steps, contexts = run_engine_decode(llm, prompts[:batch])
            if args.profile:
                profile_decode(llm, prompts[:batch])
            roofline_bytes = steps * weight_bytes_per_step(model, batch) + kv_token_bytes * sum(
                contexts
            )
            roofline_seconds = roofline_bytes / (bandwidth * 1e9)
            row[1:5] = [
                tokens / seconds,
                1e3 * seconds / steps,
                tokens / roofline_seconds,
                f"{100 * roofline_seconds / seconds:.1f}%",
            ]
        llm.shutdown()
        hf = hf_sharing_weights(model, config)
        for batch in HF_BATCHES:
            if batch not in rows or not isinstance(rows[batch][1], float):
                continue
            if time_left() < 45:
                rows[batch][5] = "skipped (time budget)"
                continue
            hf_tps = run_hf_decode(hf, prompts[:batch], args.hf_tokens)
            rows[batch][5:7] = [hf_tps, f"{rows[batch][1] / hf_tps:.1f}x"]

    print(
        f"\n{torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.0f} GB/s, "
        f"Qwen3-30B-A3B shape with {args.layers} layers (dummy bf16 weights), input "
        f"{INPUT_LEN}, output {OUTPUT_LEN}, engine start-up {startup:.0f} s, KV cache "
        f"{stats.num_kv_blocks} blocks of {stats.block_size}, CUDA graphs up to "
        f"{max(stats.cuda_graph_sizes, default=0)}\n"
    )
    print_table(
        [
            "batch",
            "engine tok/s",
            "ms/step",
            "roofline tok/s",
            "% roofline",
            f"HF tok/s ({args.hf_tokens} new)",
            "x HF",
        ],
        [rows[b] for b in args.batches],
    )
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
