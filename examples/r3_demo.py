"""The main job: rollout with routing capture, then a training forward without and with
Rollout Routing Replay (R3), on an embedded tiny MoE model on whatever device is there.

1. ``rollout.LLM`` (capture on) samples answers and returns each one's routed experts.
2. The trainer's copy of the policy, HF transformers in ``--train-dtype`` (bfloat16 by
   default: a real precision mismatch against the float32 / FlashInfer rollout), scores the
   same tokens with its own routing and then replaying the rollout's routing.
3. A table compares the two, and the last line is one JSON object with ``kl_none``,
   ``kl_r3``, ``router_agreement_none``, ``router_agreement_r3``, ``tokens`` (and F(2)).

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

import torch
import transformers
from generate import engine_config, generation_rows, make_prompts, print_rows

import replay
from rollout import LLM, SamplingParams
from rollout.testing import FAMILIES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    transformers.utils.logging.disable_progress_bar()

    prompts = make_prompts(args.num_prompts)
    sampling = SamplingParams(max_tokens=args.max_tokens, seed=0, return_routed_experts=True)
    with tempfile.TemporaryDirectory() as folder:
        config = engine_config(args.family, args.device, Path(folder))
        start = time.perf_counter()
        with LLM(**config, capture_routing=True) as llm:
            startup = time.perf_counter() - start
            start = time.perf_counter()
            outputs = llm.generate(prompts, sampling, use_tqdm=False)
            elapsed = time.perf_counter() - start
            stats, spec = llm.stats, llm.routing_spec
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config["model"], dtype=getattr(torch, args.train_dtype)
        ).to(args.device).eval()

    print_rows(generation_rows(args.family, args.device, outputs, startup, elapsed, stats))
    samples = [
        replay.RolloutSample.from_output(
            o, moe_layers=spec.moe_layers, num_experts=spec.num_experts
        )
        for o in outputs
        if o.token_ids
    ]
    ctl = replay.patch(model)
    none = replay.measure_mismatch(model, ctl, samples, replay=False)
    r3 = replay.measure_mismatch(model, ctl, samples, replay=True)
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
