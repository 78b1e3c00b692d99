"""Supervised warm-up of the addition toy policy: a small Qwen3-MoE learns ``a+b=`` -> answer, eos.

    python examples/sft_addition.py --out runs/addition/sft                 # GPU toy model
    python examples/sft_addition.py --out /tmp/sft --preset tiny --device cpu --max-steps 50

The model (``replay.trainer.tasks.AdditionModelSpec``: 4 MoE layers, 32 experts, top-4 for the
``gpu`` preset) starts from random weights with fixed seeds and trains with AdamW on freshly
drawn problems, the loss on the answer and eos tokens only. Every ``--eval-every`` steps it
measures, on fixed held-out problems, the *sampled* accuracy (the probability that sampling at
temperature 1 writes exactly the answer and eos: the product of those tokens' probabilities,
computed exactly, no sampling) and the greedy accuracy. Training stops when the sampled
accuracy reaches ``--target-accuracy`` (GRPO learns from groups whose answers differ, so the
warm-up stops half-way rather than at perfection) or after ``--max-steps``. The checkpoint
(float32 safetensors, config, ``tokenizer.json``) loads in ``rollout.LLM`` and transformers.
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from replay.trainer.grpo import token_logprobs
from replay.trainer.tasks import (
    TINY_ADDITION_SPEC,
    AdditionModelSpec,
    AdditionTask,
    Problem,
    build_addition_model,
    char_tokenizer,
    save_addition_model,
)

logger = logging.getLogger("sft_addition")

PRESETS = {"gpu": AdditionModelSpec(), "tiny": TINY_ADDITION_SPEC}


def encode(problems: list[Problem], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``prompt answer eos`` ids, the attention mask and the answer + eos mask."""
    tok = char_tokenizer()
    eos = tok.token_to_id("<eos>")
    rows = [(tok.encode(p.prompt).ids, tok.encode(p.answer).ids + [eos]) for p in problems]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        ids[i, :n] = torch.tensor(prompt + target)
        attention[i, :n] = 1
        answer[i, len(prompt) : n] = True
    return ids.to(device), attention.to(device), answer.to(device)


def answer_logprobs(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], autocast: bool
) -> torch.Tensor:
    ids, attention, _ = batch
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return token_logprobs(logits, ids)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], autocast: bool
) -> dict[str, float]:
    """Sampled accuracy (exact, see the module doc) and greedy accuracy on ``batch``."""
    model.eval()
    ids, attention, answer = batch
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
    model.train()
    logp = token_logprobs(logits, ids)
    sampled = torch.exp((logp * answer).sum(dim=1))
    predicted = torch.nn.functional.pad(logits[:, :-1].argmax(-1), (1, 0))
    greedy = ((predicted == ids) | ~answer).all(dim=1)
    return {
        "sampled_accuracy": float(sampled.mean()),
        "greedy_accuracy": float(greedy.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=1024)
    parser.add_argument(
        "--target-accuracy", type=float, default=0.5, help="stop at this sampled accuracy"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    device = torch.device(args.device)
    autocast = device.type == "cuda"  # bfloat16 autocast over float32 weights on CUDA
    torch.manual_seed(args.seed)
    task = AdditionTask(min_digits=args.min_digits, max_digits=args.max_digits)
    train_rng = np.random.default_rng(args.seed)
    held_out = encode(task.sample(args.eval_size, np.random.default_rng(args.seed + 1)), device)
    model = build_addition_model(PRESETS[args.preset], seed=args.seed).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / args.warmup_steps)
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))

    start = time.perf_counter()
    metrics = evaluate(model, held_out, autocast)
    step = 0
    while step < args.max_steps and metrics["sampled_accuracy"] < args.target_accuracy:
        batch = encode(task.sample(args.batch_size, train_rng), device)
        logp = answer_logprobs(model, batch, autocast)
        answer = batch[2]
        loss = -(logp * answer).sum() / answer.sum()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            metrics = evaluate(model, held_out, autocast)
            logger.info("step %d loss %.4f %s", step, loss.item(), metrics)

    metrics = evaluate(model, held_out, autocast)
    save_addition_model(model.to("cpu"), args.out)
    summary = {
        "out": str(args.out),
        "preset": args.preset,
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        **metrics,
    }
    (args.out / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
