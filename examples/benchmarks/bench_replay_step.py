"""Training-step time of R3 replay vs native routing, and grouped experts vs HF eager experts.

The model: a mid-size Qwen3-MoE built from a config (no download), bf16 on CUDA, random
weights (std 0.02; router weights redrawn with std 3 / sqrt(hidden) so that routing is
decisive): hidden 2048, 8 layers, 128 experts, top-8, expert intermediate 768, 32 query / 4 KV
heads of 128, ``norm_topk_prob`` True, SDPA attention. The vocabulary is 32000 instead of
Qwen3's 151936 to keep memory modest (the logits and the embedding tables are not what is
measured); the experts alone are ~4.8B parameters (~9.7 GB in bf16, as much again in grads).

One timed step is a training step without the optimizer: forward with random labels
(``model(input_ids, labels=labels).loss``, HF's cross-entropy), ``loss.backward()``, then
``zero_grad(set_to_none=True)``. Variants, on the same weights:

- grouped, native: ``replay.use_grouped_experts(model)``, routing as the model computes it,
  on the model before ``replay.patch`` and again after it (controller OFF);
- grouped, R3 replay: every step enters ``with ctl.replay(traces)`` for the forward (trace
  alignment and the copy to the GPU counted, as a user pays them); the traces are the
  model's own routing, recorded once with ``ctl.record()``;
- HF eager, native and R3 replay: a second model object holding the very same parameters,
  with HF's own experts loop (``experts_implementation="eager"``); it is slow at 128 experts,
  so it runs fewer iterations (``--eager-warmup``, ``--eager-iters``).

Before timing, replaying the recorded traces must reproduce the native logits and loss within
bf16 tolerance (the script stops otherwise); the difference is printed next to the one a
random trace makes, which shows the size of a real routing change.

    python examples/benchmarks/bench_replay_step.py              # needs CUDA; < 3 min on an H100
    python examples/benchmarks/bench_replay_step.py --layers 2   # a quick run

Prints a Markdown table: ms per step (median of CUDA-event timings), replay / native on the
same experts (target <= 1.02x) and HF eager / grouped on the same routing (target >= 5x).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from common import cuda_time_ms, print_table
from torch import nn
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import replay

REPLAY_TARGET = 1.02  # replay step / native step, at most
SPEEDUP_TARGET = 5.0  # HF eager step / grouped step, at least
ROUTER_LOGIT_STD = 3.0  # router weights redrawn with std ROUTER_LOGIT_STD / sqrt(hidden)

MID_SIZE = dict(
    hidden_size=2048,
    moe_intermediate_size=768,
    intermediate_size=6144,  # dense MLP size; unused: every layer is MoE
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=32000,  # Qwen3's is 151936: smaller to keep memory modest
)
# --cpu-smoke: the same code paths at sizes a CPU runs in seconds.
TINY = dict(
    hidden_size=64,
    moe_intermediate_size=32,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    vocab_size=128,
)


@dataclass(kw_only=True, slots=True, frozen=True)
class Row:
    """One timed variant."""

    experts: str
    routing: str
    ms: float
    iters: int


def qwen3_moe_config(sizes: dict[str, int], num_layers: int) -> Qwen3MoeConfig:
    """A Qwen3-MoE config of the given sizes, every layer MoE, no KV cache (training)."""
    return Qwen3MoeConfig(
        **sizes,
        num_hidden_layers=num_layers,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=8192,
        rope_theta=1e6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_model(config: Qwen3MoeConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Random-init HF model on ``device``, HF's eager experts, routers redrawn to be decisive."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa", experts_implementation="eager"
        )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, ROUTER_LOGIT_STD / config.hidden_size**0.5)
    return model.train()


def eager_twin(model: nn.Module, config: Qwen3MoeConfig) -> nn.Module:
    """A second HF model holding ``model``'s very parameters (no copy), with HF's eager experts
    forward whatever was installed on ``model``'s experts modules."""
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", experts_implementation="eager"
        )
    twin.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    # Its buffers are not in the state dict; the module is stateless otherwise.
    twin.model.rotary_emb = model.model.rotary_emb
    meta = [name for name, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    assert not meta, f"twin tensors left on the meta device: {meta[:5]}"
    return twin.train()


def make_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    replay_with: tuple[replay.ReplayController, list[replay.RoutedExperts]] | None = None,
) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, grads set to None); returns the detached loss.
    With ``replay_with=(ctl, traces)`` the forward runs inside ``ctl.replay(traces)``."""

    def step() -> torch.Tensor:
        context = nullcontext() if replay_with is None else replay_with[0].replay(replay_with[1])
        with context:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_ms(step: Callable[[], object], *, warmup: int, iters: int, cuda: bool) -> float:
    """Median ms of ``step``: CUDA events on CUDA, wall clock on CPU (the smoke run)."""
    if cuda:
        return cuda_time_ms(step, warmup=warmup, iters=iters)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_traces(
    ctl: replay.ReplayController, batch: int, seq_len: int, rng: np.random.Generator
) -> list[replay.RoutedExperts]:
    """One trace per row with uniformly random distinct experts (the check's control)."""
    rows, layers = seq_len - 1, len(ctl.moe_layers)
    scores = rng.random((batch, rows, layers, ctl.num_experts))
    ids_BRLK = np.argsort(scores, axis=-1)[..., : ctl.top_k]
    return [replay.RoutedExperts(ids_RLK, ctl.moe_layers, ctl.num_experts) for ids_RLK in ids_BRLK]


def check_replay_reproduces_native(
    model: nn.Module,
    ctl: replay.ReplayController,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    tolerance: float,
    rng: np.random.Generator,
) -> list[replay.RoutedExperts]:
    """Record the native routing, replay it, and require the same logits and loss; returns the
    recorded traces. A random trace's difference is printed beside it for scale."""
    with torch.no_grad():
        with ctl.record() as recorded:
            native = model(input_ids=input_ids, labels=labels)
        traces = recorded.traces
        with ctl.replay(traces):
            replayed = model(input_ids=input_ids, labels=labels)
        with ctl.replay(random_traces(ctl, *input_ids.shape, rng)):
            control = model(input_ids=input_ids, labels=labels)
    logits_diff = (replayed.logits.float() - native.logits.float()).abs().max().item()
    control_diff = (control.logits.float() - native.logits.float()).abs().max().item()
    # Relative L2 error of the whole logits tensor: in bf16 a 1-ulp difference of one gate
    # weight moves a handful of the 10^8 logits by a few 1e-2 through 8 layers, so an
    # elementwise bound would flag rounding; a routing error moves the whole tensor.
    native_norm = native.logits.float().norm().item()
    replay_rel = (replayed.logits.float() - native.logits.float()).norm().item() / native_norm
    control_rel = (control.logits.float() - native.logits.float()).norm().item() / native_norm
    loss_diff = abs(replayed.loss.item() - native.loss.item())
    print(
        f"replay check: native loss {native.loss.item():.6f}, replayed loss "
        f"{replayed.loss.item():.6f} (|diff| {loss_diff:.2e}); logits max |diff| "
        f"{logits_diff:.2e}, relative L2 {replay_rel:.2e} (a random trace: max {control_diff:.2e}, "
        f"relative L2 {control_rel:.2e}); tolerance {tolerance:g}",
        flush=True,
    )
    if replay_rel > tolerance or replay_rel > control_rel / 20:
        raise SystemExit(
            f"replay check: expected the replayed logits within relative L2 {tolerance:g} of the "
            f"native ones (and far below a random trace's {control_rel:.2e}), got {replay_rel:.2e}"
        )
    if loss_diff > tolerance:
        raise SystemExit(
            f"replay check: expected the replayed loss within {tolerance:g} of the native "
            f"loss {native.loss.item():.6f}, got {replayed.loss.item():.6f}"
        )
    return traces


def report(rows: Sequence[Row], device_name: str) -> None:
    """The Markdown table and the two target lines."""
    native = {r.experts: r.ms for r in rows if r.routing == "native"}
    replayed = {r.experts: r.ms for r in rows if r.routing == "R3 replay"}
    table = []
    for r in rows:
        by_routing = native if r.routing.startswith("native") else replayed
        eager_ms = by_routing.get("HF eager") if r.routing != "native, patched (OFF)" else None
        table.append([
            device_name, r.experts, r.routing, r.iters, r.ms,
            f"{r.ms / native[r.experts]:.3f}x",
            f"{eager_ms / r.ms:.1f}x" if eager_ms is not None and r.experts == "grouped" else "",
        ])  # fmt: skip
    print()
    print_table(
        ["device", "experts", "routing", "iters", "ms / step", "vs native", "vs HF eager"], table
    )
    ratio = replayed["grouped"] / native["grouped"]
    print(
        f"\nreplay / native (grouped): {ratio:.3f}x, target <= {REPLAY_TARGET}x: "
        f"{'met' if ratio <= REPLAY_TARGET else 'MISSED'}"
    )
    if "HF eager" in native:
        speedup = native["HF eager"] / native["grouped"]
        print(
            f"grouped vs HF eager (native): {speedup:.1f}x, target >= {SPEEDUP_TARGET}x: "
            f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (all MoE)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq)")
    parser.add_argument("--batch", type=int, default=2, help="rows; seq_len = tokens / batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--eager-warmup", type=int, default=1, help="HF eager experts warmup")
    parser.add_argument("--eager-iters", type=int, default=3, help="HF eager experts iterations")
    parser.add_argument("--no-eager", action="store_true", help="skip the HF eager experts")
    parser.add_argument(
        "--no-eager-replay", action="store_true", help="skip R3 replay with HF eager experts"
    )
    parser.add_argument("--seed", type=int, default=0)
    # Tiny float32 model on CPU, one step per variant: checks the code paths, times nothing.
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers < 1:
        parser.error(f"--layers: expected >= 1, got {args.layers}")
    if args.batch < 1 or args.tokens % args.batch or args.tokens // args.batch < 2:
        parser.error(
            f"--tokens: expected a multiple of --batch {args.batch} with >= 2 tokens per row, "
            f"got {args.tokens}"
        )

    if args.cpu_smoke:
        device, dtype, sizes, tolerance = torch.device("cpu"), torch.float32, TINY, 1e-4
        batch, seq_len = 2, 16
        args.warmup, args.iters, args.eager_warmup, args.eager_iters = 0, 1, 0, 1
        device_name = "CPU (smoke test)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_replay_step needs a CUDA device")
        device, dtype, sizes, tolerance = torch.device("cuda"), torch.bfloat16, MID_SIZE, 5e-3
        batch, seq_len = args.batch, args.tokens // args.batch
        device_name = torch.cuda.get_device_name()
    cuda = device.type == "cuda"

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = qwen3_moe_config(sizes, args.layers)
    model = build_model(config, dtype, device)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"device: {device_name}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}\nQwen3-MoE: {args.layers} layers, hidden "
        f"{config.hidden_size}, {config.num_experts} experts top-{config.num_experts_per_tok}, "
        f"expert intermediate {config.moe_intermediate_size}, vocab {config.vocab_size} "
        f"(reduced from Qwen3's 151936 to keep memory modest), {num_params / 1e9:.2f}B "
        f"parameters, {dtype}; {batch} x {seq_len} = {batch * seq_len} tokens per step",
        flush=True,
    )
    input_ids = torch.randint(config.vocab_size, (batch, seq_len), device=device)
    labels = torch.randint(config.vocab_size, (batch, seq_len), device=device)
    rows: list[Row] = []

    def timed(experts: str, routing: str, step: Callable[[], object], eager: bool) -> None:
        warmup = args.eager_warmup if eager else args.warmup
        iters = args.eager_iters if eager else args.iters
        ms = time_ms(step, warmup=warmup, iters=iters, cuda=cuda)
        rows.append(Row(experts=experts, routing=routing, ms=ms, iters=iters))
        print(f"  {experts}, {routing}: {ms:.1f} ms / step", flush=True)

    replay.use_grouped_experts(model)
    timed("grouped", "native", make_step(model, input_ids, labels), eager=False)
    ctl = replay.patch(model)
    traces = check_replay_reproduces_native(model, ctl, input_ids, labels, tolerance, rng)
    timed("grouped", "native, patched (OFF)", make_step(model, input_ids, labels), eager=False)
    replay_step = make_step(model, input_ids, labels, replay_with=(ctl, traces))
    timed("grouped", "R3 replay", replay_step, eager=False)

    if not args.no_eager:
        twin = eager_twin(model, config)
        timed("HF eager", "native", make_step(twin, input_ids, labels), eager=True)
        if not args.no_eager_replay:
            twin_ctl = replay.patch(twin)
            eager_replay_step = make_step(twin, input_ids, labels, replay_with=(twin_ctl, traces))
            timed("HF eager", "R3 replay", eager_replay_step, eager=True)
    report(rows, device_name)


if __name__ == "__main__":
    main()
