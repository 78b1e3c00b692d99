"""The cost of the true on-policy mode, measured side by side in one run on one GPU.

1. Decode throughput of ``rollout.LLM(deterministic=True)`` against the normal engine at
   batch 1, 64 and 256 (Qwen3-30B-A3B's shape, ``--layers`` of its 48, dummy bf16 weights,
   512-token random prompts, ``--new-tokens`` generated with ``ignore_eos``). Decode time is
   a run's time minus a one-token run's (the prefill). Target (issue 14): >= 0.95x.
2. A training step (forward + backward over ``--train-batch`` sequences of ``--train-len``
   tokens, native routing) of the engine's deterministic policy (``rollout.load_policy``)
   against HF transformers' model with grouped experts (``replay.use_grouped_experts``), both
   bf16 parameters. Target: <= 1.10x.

    python examples/benchmarks/bench_deterministic.py --layers 4

Prints a Markdown table of the times and ratios (BENCHMARKS.md keeps them with date, device,
command). Needs CUDA.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from bench_engine import qwen3_30b_a3b_config
from common import cuda_time_ms, print_table
from safetensors.torch import save_file
from transformers import Qwen3MoeForCausalLM

import replay
import rollout
from rollout import LLM, SamplingParams

BATCHES = (1, 64, 256)
PROMPT_LEN = 512


def decode_seconds(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds of ``new_tokens - 1`` decode steps for all prompts (a run minus its prefill)."""

    def run(tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)  # warm-up: compilation, autotuning, allocator
    return run(new_tokens) - run(1)


def write_checkpoint(folder: str, layers: int) -> None:
    """Qwen3-30B-A3B's config and random bf16 weights (HF names) in ``folder``."""
    config = qwen3_30b_a3b_config(layers)
    config.save_pretrained(folder)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              f"{folder}/model.safetensors", metadata={"format": "pt"})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 48")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-len", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_deterministic: needs a CUDA device")
    rows = []
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, args.layers)
        vocab = 151936
        for deterministic in (False, True):
            llm = LLM(folder, dtype="bfloat16", deterministic=deterministic,
                      max_num_seqs=max(BATCHES), max_model_len=PROMPT_LEN + args.new_tokens + 8,
                      gpu_memory_utilization=0.6)  # fmt: skip
            for batch in BATCHES:
                prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=generator)
                seconds = decode_seconds(llm, prompts.tolist(), args.new_tokens)
                rows.append((deterministic, batch, batch * (args.new_tokens - 1) / seconds))
            llm.shutdown()
        table = []
        for batch in BATCHES:
            normal = next(r[2] for r in rows if r[1] == batch and not r[0])
            exact = next(r[2] for r in rows if r[1] == batch and r[0])
            table.append([f"decode tok/s, batch {batch}", normal, exact, exact / normal])

        ids = torch.randint(0, vocab, (args.train_batch, args.train_len), device="cuda")
        policy = rollout.load_policy(folder, dtype="bfloat16", device="cuda", deterministic=True)
        hf = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
        replay.use_grouped_experts(hf, backend="auto")

        def policy_step() -> None:
            policy(ids).float().logsumexp(-1).mean().backward()

        def hf_step() -> None:
            hf(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

        engine_ms = cuda_time_ms(policy_step, warmup=2, iters=5)
        hf_ms = cuda_time_ms(hf_step, warmup=2, iters=5)
        table.append(["train step ms (fwd + bwd)", hf_ms, engine_ms, engine_ms / hf_ms])
    name = torch.cuda.get_device_name()
    print(f"{name}, Qwen3-30B-A3B shape with {args.layers} layers, bf16")
    print_table(["what", "normal / HF", "deterministic / engine policy", "ratio"], table)


if __name__ == "__main__":
    main()
