"""The main job: rollout with routing capture, then a training forward without and with
Rollout Routing Replay (R3), on an embedded tiny MoE model on whatever device is there.

1. A tiny random MoE checkpoint is built in a temporary folder (``rollout.testing``; nothing
   is downloaded). ``rollout.LLM`` (capture on) samples answers and returns each one's routed
   experts. Half of the prompts share a long instruction prefix, so the prefix cache serves
   their first blocks. On CUDA the engine runs in bfloat16 with FlashInfer attention and CUDA
   graphs; on CPU in float32.
2. The trainer's copy of the policy, HF transformers in --train-dtype (bfloat16 by default: a
   real precision mismatch against the engine), scores the same tokens with its own routing,
   then replaying the rollout's routing.
3. Two tables (generation; rollout vs trainer), each with a legend, and a last line that is
   one JSON object: kl_none, kl_r3, f2_none, f2_r3, router_agreement_none,
   router_agreement_r3, tokens.

    python examples/r3_demo.py
    python examples/r3_demo.py --family glm4_moe --num-prompts 64 --train-dtype float16
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import replay
from rollout import LLM, EngineStats, RequestOutput, SamplingParams
from rollout.testing import FAMILIES, TOKENIZER_TEXT, flashinfer_overrides, make_tiny_moe

INSTRUCTION = (
    "You are a careful assistant. Read the passage, think about what the experts of the "
    "model should do with every token, and then answer in one short sentence. Passage: "
)
GENERATION_LEGEND = (
    "engine start-up: rollout.LLM built from the checkpoint folder (weights, KV cache, warm-up); "
    "tokens/s: generated tokens / generation time"
)
MISMATCH_LEGEND = (
    "k3: KL(rollout || train) estimate, mean of r - 1 - log r, r = p_train / p_rollout per "
    "generated token; F(2): share with r outside [1/2, 2]; none: the trainer's own routing; "
    "r3: the rollout's routing replayed"
)


def engine_config(family: str, device: str, folder: Path) -> dict[str, Any]:
    """Build the tiny checkpoint in ``folder``; return the ``LLM`` keyword arguments."""
    cuda = device.startswith("cuda")
    path = make_tiny_moe(family, folder, seed=0, **(flashinfer_overrides(family) if cuda else {}))
    return {
        "model": path,
        "device": device,
        "dtype": "bfloat16" if cuda else "float32",
        "max_num_seqs": 64,
        "max_num_batched_tokens": 2048,
        "max_model_len": 512,
        "seed": 0,
    }


def make_prompts(num_prompts: int) -> list[str]:
    """Lines of the tokenizer's text; every other prompt behind the shared instruction."""
    lines = [line for line in TOKENIZER_TEXT.splitlines() if line.strip()]
    return [(INSTRUCTION if i % 2 == 0 else "") + lines[i % len(lines)] for i in range(num_prompts)]


def generation_rows(
    family: str,
    device: str,
    outputs: list[RequestOutput],
    startup: float,
    elapsed: float,
    stats: EngineStats,
) -> list[tuple[object, ...]]:
    """The generation table's (metric, value) rows."""
    generated = sum(len(o.token_ids) for o in outputs)
    return [
        ("family", family),
        ("device", device),
        ("requests", len(outputs)),
        ("prompt tokens", sum(len(o.prompt_token_ids) for o in outputs)),
        ("generated tokens", generated),
        ("engine start-up (s)", f"{startup:.2f}"),
        ("generation (s)", f"{elapsed:.2f}"),
        ("tokens/s (generated)", f"{generated / elapsed:.1f}"),
        ("prefix-cache hit rate", f"{stats.prefix_cache_hit_rate:.1%}"),
        ("preemptions", stats.num_preemptions),
    ]


def print_rows(
    rows: list[tuple[object, ...]], header: tuple[str, ...] = ("metric", "value")
) -> None:
    """A Markdown table of ``header`` and ``rows``."""
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--train-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16"
    )
    parser.add_argument("--verbose", action="store_true", help="log the engine's start-up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # make_tiny_moe's save_pretrained

    prompts = make_prompts(args.num_prompts)
    sampling = SamplingParams(max_tokens=args.max_tokens, seed=0, return_routed_experts=True)
    with tempfile.TemporaryDirectory() as folder:
        config = engine_config(args.family, args.device, Path(folder))
        start = time.perf_counter()
        with LLM(**config, capture_routing=True) as llm:
            startup = time.perf_counter() - start
            start = time.perf_counter()
            outputs = llm.generate(prompts, sampling)  # a progress bar on stderr
            elapsed = time.perf_counter() - start
            stats, spec = llm.stats, llm.routing_spec
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config["model"], dtype=getattr(torch, args.train_dtype)
        ).to(args.device).eval()

    print_rows(generation_rows(args.family, args.device, outputs, startup, elapsed, stats))
    print(GENERATION_LEGEND)
    samples = [
        replay.RolloutSample.from_output(
            o, moe_layers=spec.moe_layers, num_experts=spec.num_experts
        )
        for o in outputs
        if o.token_ids
    ]
    ctl = replay.patch(model)
    none = replay.measure_mismatch(model, ctl, samples, replay=False, progress=True)
    r3 = replay.measure_mismatch(model, ctl, samples, replay=True, progress=True)
    print(f"\nrollout ({config['dtype']}) vs trainer (HF, {args.train_dtype}):")
    print_rows(
        [
            ("KL(rollout || train), k3", f"{none.kl_k3:.3e}", f"{r3.kl_k3:.3e}"),
            ("F(2) extreme tokens", f"{none.extreme_token_fraction:.4f}",
             f"{r3.extreme_token_fraction:.4f}"),
            ("router agreement", f"{none.router_agreement:.4f}", f"{r3.router_agreement:.4f}"),
        ],
        header=("metric", "none", "r3"),
    )  # fmt: skip
    print(MISMATCH_LEGEND)
    print(json.dumps({
        "kl_none": none.kl_k3,
        "kl_r3": r3.kl_k3,
        "f2_none": none.extreme_token_fraction,
        "f2_r3": r3.extreme_token_fraction,
        "router_agreement_none": none.router_agreement,
        "router_agreement_r3": r3.router_agreement,
        "tokens": none.tokens,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
