"""Training-step time of R3 replay vs native routing, and grouped experts vs HF eager experts.

The model: a mid-size Qwen3-MoE built from a config (no download), bf16 on CUDA, random
weights (std 0.02; router weights redrawn with std 3 / sqrt(hidden) so that routing is
decisive): hidden 2048, 8 layers, 128 experts, top-8, expert intermediate 768, 32 query / 4 KV
heads of 128, ``norm_topk_prob`` True, SDPA attention. The vocabulary is 32000 instead of
Qwen3's 151936 to keep memory modest (the logits and the embedding tables are not what is
measured); the experts alone are ~4.8B parameters (~9.7 GB in bf16, as much again in grads).

One timed step is a training step without the optimizer: forward with random labels
(``model(input_ids, labels=labels).loss``, HF's cross-entropy), ``loss.backward()``, then
``zero_grad(set_to_none=True)``. Variants, all on the very same parameters (twin module
objects sharing them, so no copy):

- grouped, native: ``replay.use_grouped_experts(model)`` on a model never patched;
- grouped, native, patched (OFF): a twin with grouped experts, ``replay.patch``-ed, no context;
- grouped, R3 replay: that twin, every step entering ``with ctl.replay(traces)`` for the
  forward (trace alignment and the copy to the GPU counted, as a user pays them); the traces
  are the model's own routing, recorded once with ``ctl.record()``;
- HF eager, native and R3 replay: twins with HF's own experts loop
  (``experts_implementation="eager"``); slow at 128 experts, so they run fewer iterations
  (``--eager-warmup``, ``--eager-iters``), after the grouped variants.

Measurement: the three grouped variants are interleaved: ``--rounds`` rounds, each timing
``--iters`` consecutive steps of every variant, the order of the variants rotating from round
to round, so that clock or temperature drift and the position in a round hit every variant
alike. Each step is timed by CUDA events and ends with a synchronization (as a training loop
that reads its loss every step). "ms / step" is the median over all of a variant's steps;
"vs native" (grouped) is the median over rounds of the variant's round median divided by
native's round median (paired, so drift between rounds cancels), its range over the rounds
printed under the table. The host time of entering the replay context is printed too.

Before timing, replaying the recorded traces must reproduce the native logits and loss within
bf16 tolerance (the script stops otherwise); the difference is printed next to the one a
random trace makes, which shows the size of a real routing change.

    python examples/benchmarks/bench_replay_step.py              # needs CUDA; < 3 min on an H100
    python examples/benchmarks/bench_replay_step.py --layers 2   # a quick run
    python examples/benchmarks/bench_replay_step.py --host       # CPU: host cost of the paths

``--host`` measures what the patched paths cost the host, without a GPU: the same depth,
experts and top-k with tiny hidden sizes on CPU (so compute is negligible next to the per-op
host cost), native / OFF / R3 interleaved, thread CPU ms per step and the ATen operators
dispatched per step (a count of the launches a GPU would get; on CPU, R3 runs the plain-torch
reference of the fused CUDA kernel, two ``torch.where`` more), plus the host time of
``ctl.replay(traces)`` at the benchmark's token count.

Prints a Markdown table: ms per step, replay / native on the same experts (target <= 1.02x)
and HF eager / grouped on the same routing (target >= 5x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from common import print_table
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import replay

REPLAY_TARGET = 1.02  # replay step / native step, at most
SPEEDUP_TARGET = 5.0  # HF eager step / grouped step, at least
ROUTER_LOGIT_STD = (
    3.0  # router weights redrawn with std ROUTER_LOGIT_STD / sqrt(hidden)
)
NATIVE, OFF, R3 = "native", "native, patched (OFF)", "R3 replay"

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
# --host: MID_SIZE's experts and top-k (what the routing paths handle), tiny everything else.
HOST = dict(
    MID_SIZE,
    hidden_size=64,
    moe_intermediate_size=16,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
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
    """One timed variant: its median step and, for interleaved variants, the per-round ratios
    to native."""

    experts: str
    routing: str
    ms: float
    iters: int
    ratios: tuple[float, ...] = ()


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


def build_model(
    config: Qwen3MoeConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Random-init HF model on ``device``, HF's eager experts, routers redrawn to be decisive."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation="sdpa",
            experts_implementation="eager",
        )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(
                0.0, ROUTER_LOGIT_STD / config.hidden_size**0.5
            )
    return model.train()


def twin(model: nn.Module, config: Qwen3MoeConfig) -> nn.Module:
    """A second HF model holding ``model``'s very parameters (no copy), with HF's eager experts
    forward and no patch, whatever was installed on ``model``'s modules."""
    with torch.device("meta"):
        other = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", experts_implementation="eager"
        )
    other.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    # Its buffers are not in the state dict; the module is stateless otherwise.
    other.model.rotary_emb = model.model.rotary_emb
    meta = [
        name
        for name, t in [*other.named_parameters(), *other.named_buffers()]
        if t.is_meta
    ]
    assert not meta, f"twin tensors left on the meta device: {meta[:5]}"
    return other.train()


def make_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    replay_with: tuple[replay.ReplayController, list[replay.RoutedExperts]]
    | None = None,
) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, grads set to None); returns the detached loss.
    With ``replay_with=(ctl, traces)`` the forward runs inside ``ctl.replay(traces)``."""

    def step() -> torch.Tensor:
        context = (
            nullcontext()
            if replay_with is None
            else replay_with[0].replay(replay_with[1])
        )
        with context:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step: Callable[[], object], iters: int, *, cuda: bool) -> list[float]:
    """ms of each of ``iters`` calls: CUDA events around each (then a synchronization) on
    CUDA; on CPU the calling thread's CPU time, which other processes competing for the cores
    do not inflate (``--host`` runs torch on this one thread)."""
    times = []
    for _ in range(iters):
        if cuda:
            start, end = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.thread_time()
            step()
            times.append((time.thread_time() - begin) * 1e3)
    return times


def interleaved(
    steps: dict[str, Callable[[], object]],
    *,
    rounds: int,
    iters: int,
    warmup: int,
    cuda: bool,
) -> dict[str, list[list[float]]]:
    """Per variant, per round, the ms of its ``iters`` steps; variants take turns within each
    round in an order rotated by one every round."""
    names = list(steps)
    for name in names:
        time_steps(steps[name], warmup, cuda=cuda)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_steps(steps[name], iters, cuda=cuda))
    return times


def rows_of(experts: str, times: dict[str, list[list[float]]]) -> list[Row]:
    """Rows of interleaved variants: median over all steps, paired per-round ratios to native."""
    native_rounds = [statistics.median(t) for t in times[NATIVE]]
    rows = []
    for routing, per_round in times.items():
        ratios = tuple(
            statistics.median(t) / n
            for t, n in zip(per_round, native_rounds, strict=True)
        )
        all_steps = [ms for t in per_round for ms in t]
        rows.append(
            Row(
                experts=experts,
                routing=routing,
                ms=statistics.median(all_steps),
                iters=len(all_steps),
                ratios=ratios,
            )
        )
    return rows


def host_us(fn: Callable[[], object], iters: int = 50) -> float:
    """Median microseconds of the calling thread's CPU time of ``fn()`` (host work only)."""
    fn()
    times = []
    for _ in range(iters):
        begin = time.thread_time()
        fn()
        times.append((time.thread_time() - begin) * 1e6)
    return statistics.median(times)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step: Callable[[], object]) -> int:
    """ATen operators one call of ``step`` dispatches (forward and backward)."""
    with _OpCounter() as counter:
        step()
    return counter.count


def python_calls_per_step(step: Callable[[], object]) -> int:
    """Python-level function calls one call of ``step`` makes (``sys.setprofile`` events)."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


def random_traces(
    ctl: replay.ReplayController, batch: int, seq_len: int, rng: np.random.Generator
) -> list[replay.RoutedExperts]:
    """One trace per row with uniformly random distinct experts (the check's control)."""
    rows, layers = seq_len - 1, len(ctl.moe_layers)
    scores = rng.random((batch, rows, layers, ctl.num_experts))
    ids_BRLK = np.argsort(scores, axis=-1)[..., : ctl.top_k]
    return [
        replay.RoutedExperts(ids_RLK, ctl.moe_layers, ctl.num_experts)
        for ids_RLK in ids_BRLK
    ]


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
    replay_rel = (
        replayed.logits.float() - native.logits.float()
    ).norm().item() / native_norm
    control_rel = (
        control.logits.float() - native.logits.float()
    ).norm().item() / native_norm
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
    """The Markdown table, the spread of the paired ratios and the two target lines."""
    native = {r.experts: r.ms for r in rows if r.routing == NATIVE}
    replayed = {r.experts: r for r in rows if r.routing == R3}
    table = []
    for r in rows:
        ratio = statistics.median(r.ratios) if r.ratios else r.ms / native[r.experts]
        eager_ms = None
        if r.experts == "grouped" and r.routing in (NATIVE, R3):
            by_routing = (
                native
                if r.routing == NATIVE
                else {k: v.ms for k, v in replayed.items()}
            )
            eager_ms = by_routing.get("HF eager")
        table.append([
            device_name, r.experts, r.routing, r.iters, r.ms, f"{ratio:.3f}x",
            f"{eager_ms / r.ms:.1f}x" if eager_ms is not None else "",
        ])  # fmt: skip
    print()
    print_table(
        [
            "device",
            "experts",
            "routing",
            "iters",
            "ms / step",
            "vs native",
            "vs HF eager",
        ],
        table,
    )
    print()
    for r in rows:
        if r.ratios and r.routing != NATIVE:
            print(
                f"{r.experts}, {r.routing} / native per round: median "
                f"{statistics.median(r.ratios):.3f}x, range {min(r.ratios):.3f}x - "
                f"{max(r.ratios):.3f}x over {len(r.ratios)} rounds"
            )
    grouped = replayed["grouped"]
    ratio = statistics.median(grouped.ratios)
    print(
        f"replay / native (grouped): {ratio:.3f}x, target <= {REPLAY_TARGET}x: "
        f"{'met' if ratio <= REPLAY_TARGET else 'MISSED'}"
    )
    if "HF eager" in native:
        speedup = native["HF eager"] / native["grouped"]
        print(
            f"grouped vs HF eager (native): {speedup:.1f}x, target >= {SPEEDUP_TARGET}x: "
            f"{'met' if speedup >= SPEEDUP_TARGET else 'MISSED'}"
        )


def grouped_variants(
    model: nn.Module,
    config: Qwen3MoeConfig,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    tolerance: float,
    rng: np.random.Generator,
    use_experts: Callable[[nn.Module], object] = replay.use_grouped_experts,
) -> tuple[dict[str, Callable[[], torch.Tensor]], replay.ReplayController, list]:
    """The native, OFF and R3 steps with ``use_experts``'s experts (``model`` gets them and
    stays unpatched; a patched twin runs OFF and R3), after the replay check; also the twin's
    controller and the recorded traces."""
    use_experts(model)
    patched = twin(model, config)
    use_experts(patched)
    ctl = replay.patch(patched)
    traces = check_replay_reproduces_native(
        patched, ctl, input_ids, labels, tolerance, rng
    )
    steps = {
        NATIVE: make_step(model, input_ids, labels),
        OFF: make_step(patched, input_ids, labels),
        R3: make_step(patched, input_ids, labels, replay_with=(ctl, traces)),
    }
    return steps, ctl, traces


class StandInExperts:
    """``--host``'s experts forward, installed per instance: the hidden states scaled by the
    summed gate weights plus each token's chosen experts' first ``gate_up_proj`` rows. It reads
    the ids and is differentiable in the weights (so replay's backward runs) at a cost that
    does not hide the routing paths' host cost (HF's loop and CPU grouped GEMMs run one matmul
    per expert)."""

    __slots__ = ("experts",)

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts

    def __call__(
        self, hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        rows_TKH = self.experts.gate_up_proj[ids_TK, 0]
        return hidden_TH * weights_TK.sum(-1, keepdim=True) + rows_TKH.sum(1)


def use_stand_in_experts(model: nn.Module) -> None:
    """Install ``StandInExperts`` on every MoE layer's experts module of ``model``."""
    for layer in model.model.layers:
        layer.mlp.experts.forward = StandInExperts(layer.mlp.experts)


def host_overhead(args: argparse.Namespace) -> None:
    """``--host``: host cost per step of the patched paths on CPU (see the module docstring)."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = qwen3_moe_config(HOST, args.layers)
    model = build_model(config, torch.float32, torch.device("cpu"))
    batch, seq_len = 2, 16
    input_ids = torch.randint(config.vocab_size, (batch, seq_len))
    labels = torch.randint(config.vocab_size, (batch, seq_len))
    steps, ctl, _ = grouped_variants(
        model, config, input_ids, labels, 1e-4, rng, use_stand_in_experts
    )
    times = interleaved(
        steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup, cuda=False
    )
    native_rounds = [statistics.median(t) for t in times[NATIVE]]
    counts = {
        name: (ops_per_step(s), python_calls_per_step(s)) for name, s in steps.items()
    }
    print(
        f"\nhost cost per step, CPU, torch {torch.__version__}: Qwen3-MoE {args.layers} layers, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, hidden "
        f"{config.hidden_size}, float32, {batch} x {seq_len} tokens, stand-in experts; "
        f"us vs native: median over {args.rounds} rounds of the paired round-median difference\n"
    )
    table = []
    for name, per_round in times.items():
        differences = [
            (statistics.median(t) - n) * 1e3
            for t, n in zip(per_round, native_rounds, strict=True)
        ]
        (ops, calls), (native_ops, native_calls) = counts[name], counts[NATIVE]
        table.append([
            name, len(per_round) * args.iters, statistics.median(sum(per_round, [])),
            f"{statistics.median(differences):+.0f}", ops, f"{ops - native_ops:+d}",
            calls, f"{calls - native_calls:+d}",
        ])  # fmt: skip
    print_table(
        ["routing", "iters", "ms / step", "us vs native", "ATen ops", "vs native",
         "Python calls", "vs native"],
        table,
    )  # fmt: skip
    big_batch, big_len = args.batch, args.tokens // args.batch
    big = random_traces(ctl, big_batch, big_len, rng)
    entry = host_us(lambda: ctl.replay(big))
    print(
        f"\nctl.replay(traces) (layout, checks, alignment) at {big_batch} x {big_len} tokens, "
        f"{args.layers} layers, top-{ctl.top_k}: {entry:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="decoder layers (all MoE)"
    )
    parser.add_argument(
        "--tokens", type=int, default=4096, help="tokens per step (batch x seq)"
    )
    parser.add_argument(
        "--batch", type=int, default=2, help="rows; seq_len = tokens / batch"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--iters", type=int, default=10, help="timed steps per variant and round"
    )
    parser.add_argument(
        "--eager-warmup", type=int, default=1, help="HF eager experts warmup"
    )
    parser.add_argument(
        "--eager-iters", type=int, default=3, help="HF eager experts iterations"
    )
    parser.add_argument(
        "--no-eager", action="store_true", help="skip the HF eager experts"
    )
    parser.add_argument(
        "--no-eager-replay",
        action="store_true",
        help="skip R3 replay with HF eager experts",
    )
    parser.add_argument(
        "--host",
        action="store_true",
        help="CPU: host cost per step of the patched paths",
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
    if args.rounds < 1 or args.iters < 1:
        parser.error(
            f"--rounds, --iters: expected >= 1, got {args.rounds}, {args.iters}"
        )
    if args.host:
        host_overhead(args)
        return

    if args.cpu_smoke:
        device, dtype, sizes, tolerance = torch.device("cpu"), torch.float32, TINY, 1e-4
        batch, seq_len = 2, 16
        args.warmup, args.rounds, args.iters, args.eager_warmup, args.eager_iters = (
            0,
            1,
            1,
            0,
            1,
        )
        device_name = "CPU (smoke test)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_replay_step needs a CUDA device (or --host)")
        device, dtype, sizes, tolerance = (
            torch.device("cuda"),
            torch.bfloat16,
            MID_SIZE,
            5e-3,
        )
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

    steps, ctl, traces = grouped_variants(
        model, config, input_ids, labels, tolerance, rng
    )
    print(
        f"grouped experts: {args.rounds} rounds x {args.iters} steps per variant, interleaved",
        flush=True,
    )
    times = interleaved(
        steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup, cuda=cuda
    )
    rows = rows_of("grouped", times)
    for r in rows:
        print(f"  grouped, {r.routing}: {r.ms:.1f} ms / step", flush=True)
    entry = host_us(lambda: ctl.replay(traces))
    print(
        f"  host time of ctl.replay(traces) (layout, checks, alignment, copy): {entry:.0f} us"
    )

    def timed_eager(routing: str, step: Callable[[], object]) -> None:
        time_steps(step, args.eager_warmup, cuda=cuda)
        ms = statistics.median(time_steps(step, args.eager_iters, cuda=cuda))
        rows.append(
            Row(experts="HF eager", routing=routing, ms=ms, iters=args.eager_iters)
        )
        print(f"  HF eager, {routing}: {ms:.1f} ms / step", flush=True)

    if not args.no_eager:
        timed_eager(NATIVE, make_step(twin(model, config), input_ids, labels))
        if not args.no_eager_replay:
            eager = twin(model, config)
            eager_ctl = replay.patch(eager)
            timed_eager(
                R3, make_step(eager, input_ids, labels, replay_with=(eager_ctl, traces))
            )
    report(rows, device_name)


if __name__ == "__main__":
    main()
