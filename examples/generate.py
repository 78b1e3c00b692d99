"""The main job: generate with ``rollout.LLM`` on an embedded tiny MoE model, on whatever
device is there, and print a short table (requests, tokens, tokens/s, prefix-cache hit rate).

The model is built on the spot by ``rollout.testing.make_tiny_moe`` (random weights, a small
locally trained tokenizer; nothing is downloaded) in a temporary folder. Half of the prompts
share a long instruction prefix, so the prefix cache serves their first blocks. On CUDA the
model runs in bfloat16 with FlashInfer attention and CUDA graphs; on CPU in float32.

    python examples/generate.py                                    # qwen3_moe, 32 prompts
    python examples/generate.py --family glm4_moe --num-prompts 64 --max-tokens 48
    python examples/generate.py --device cpu
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from rollout import LLM, SamplingParams
from rollout.testing import (
    FAMILIES,
    TOKENIZER_TEXT,
    flashinfer_overrides,
    make_tiny_moe,
)

INSTRUCTION = (
    "You are a careful assistant. Read the passage, think about what the experts of the "
    "model should do with every token, and then answer in one short sentence. Passage: "
)


def engine_config(family: str, device: str, folder: Path) -> dict[str, Any]:
    """Build the tiny checkpoint in ``folder``; return the ``LLM`` keyword arguments."""
    cuda = device.startswith("cuda")
    path = make_tiny_moe(family, folder, seed=0, **(flashinfer_overrides(family) if cuda else {}))
    return dict(
        model=path,
        device=device,
        dtype="bfloat16" if cuda else "float32",
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        max_model_len=512,
        seed=0,
    )


def make_prompts(num_prompts: int) -> list[str]:
    """Lines of the tokenizer's text; every other prompt behind the shared instruction."""
    lines = [line for line in TOKENIZER_TEXT.splitlines() if line.strip()]
    return [(INSTRUCTION if i % 2 == 0 else "") + lines[i % len(lines)] for i in range(num_prompts)]


def generation_rows(
    family: str, device: str, outputs: list, startup: float, elapsed: float, stats: Any
) -> list[tuple[object, ...]]:
    """The generation table's (metric, value) rows."""
    generated = sum(len(o.token_ids) for o in outputs)
    return [
        ("family", family),
        ("device", device),
        ("requests", len(outputs)),
        ("prompt tokens", sum(len(o.prompt_token_ids) for o in outputs)),
        ("generated tokens", generated),
        ("start-up (s)", f"{startup:.2f}"),
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda",
    )
    parser.add_argument("--verbose", action="store_true", help="log the engine's start-up")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    transformers.utils.logging.disable_progress_bar()  # make_tiny_moe's save_pretrained

    prompts = make_prompts(args.num_prompts)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=0.95)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with LLM(**engine_config(args.family, args.device, Path(folder))) as llm:
            startup = time.perf_counter() - start
            start = time.perf_counter()
            outputs = llm.generate(prompts, sampling, use_tqdm=False)
            elapsed = time.perf_counter() - start
            stats = llm.stats

    print_rows(generation_rows(args.family, args.device, outputs, startup, elapsed, stats))
    print(f"\nexample: {prompts[0]!r}\n  -> {outputs[0].text!r}")


if __name__ == "__main__":
    main()
