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

``--profile`` (after the timed rounds, on the grouped variants plus two ablations: "R3, no row
replayed", the same replay context, seams and hooks with every trace row marked invalid, so no
layer runs ``replay_topk``; and "R3, torch ops (no Triton)", R3 with the plain-torch
``replay_topk_reference`` in place of the fused Triton kernels) prints where R3's extra time
goes:

- host time per step by phase (replay context, forward, backward, zero_grad; wall clock, no
  profiler) and the wait at the final synchronization: near 0 means the GPU waited for the
  host; Python GC runs per step;
- under the torch profiler (``--profile-steps`` steps each): wall, GPU time, GPU ops, kernel
  time / wall, GPU idle time and gaps, host time of forward and backward, GPU time launched by
  the forward; the GPU activities and the CPU events (self time) whose time per step differs
  most between R3 and native, the CUDA runtime / driver calls (syncs, allocations, launches),
  the longest GPU idle gaps with the activities on each side;
- one MoE layer's routing alone (router vs router + ``replay_topk``, forward + backward):
  host and GPU us per call, times the layer count;
- the host-GPU synchronizations of one step of each variant (torch's sync debug mode).

    python examples/benchmarks/bench_replay_step.py --rounds 5 --iters 10 --eager-iters 1 --profile

Prints a Markdown table: ms per step, replay / native on the same experts (target <= 1.02x)
and HF eager / grouped on the same routing (target >= 5x).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch
import transformers
from common import (
    busy_and_gaps,
    device_events,
    print_diff_table,
    print_table,
    totals_by_name,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import replay
from routing_kernels.replay_weights import replay_topk, replay_topk_reference

REPLAY_TARGET = 1.02  # replay step / native step, at most
SPEEDUP_TARGET = 5.0  # HF eager step / grouped step, at least
ROUTER_LOGIT_STD = 3.0  # router weights redrawn with std ROUTER_LOGIT_STD / sqrt(hidden)
NATIVE, OFF, R3 = "native", "native, patched (OFF)", "R3 replay"
# --profile's ablations: the replay context, seams and hooks with every trace row invalid; R3
# with kernels.replay_topk_reference (plain torch ops) instead of the fused Triton kernels.
R3_NO_ROWS = "R3, no row replayed"
R3_TORCH = "R3, torch ops (no Triton)"

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


def build_model(config: Qwen3MoeConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
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
            layer.mlp.gate.weight.normal_(0.0, ROUTER_LOGIT_STD / config.hidden_size**0.5)
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
    meta = [name for name, t in [*other.named_parameters(), *other.named_buffers()] if t.is_meta]
    assert not meta, f"twin tensors left on the meta device: {meta[:5]}"
    return other.train()


# A step's phases, in order; ``make_step`` wraps each in ``phase(name)``.
PHASES = ("replay context", "forward", "backward", "zero_grad")
Phase = Callable[[str], AbstractContextManager[object]]
_NO_PHASE = nullcontext()


def no_phase(name: str) -> AbstractContextManager[object]:
    """The timed steps' ``phase``: nothing around the phases."""
    return _NO_PHASE


def make_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    replay_with: tuple[replay.ReplayController, list[replay.RoutedExperts]] | None = None,
    phase: Phase = no_phase,
) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, grads set to None); returns the detached loss.
    With ``replay_with=(ctl, traces)`` the forward runs inside ``ctl.replay(traces)``. Each of
    ``PHASES`` runs inside ``phase(name)`` (``--profile`` times or annotates them)."""

    def step() -> torch.Tensor:
        with phase(PHASES[0]):
            context = (
                nullcontext() if replay_with is None else replay_with[0].replay(replay_with[1])
            )
        with phase(PHASES[1]), context:
            loss = model(input_ids=input_ids, labels=labels).loss
        with phase(PHASES[2]):
            loss.backward()
        with phase(PHASES[3]):
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
            statistics.median(t) / n for t, n in zip(per_round, native_rounds, strict=True)
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
    """The Markdown table, the spread of the paired ratios and the two target lines."""
    native = {r.experts: r.ms for r in rows if r.routing == NATIVE}
    replayed = {r.experts: r for r in rows if r.routing == R3}
    table = []
    for r in rows:
        ratio = statistics.median(r.ratios) if r.ratios else r.ms / native[r.experts]
        eager_ms = None
        if r.experts == "grouped" and r.routing in (NATIVE, R3):
            by_routing = native if r.routing == NATIVE else {k: v.ms for k, v in replayed.items()}
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


@dataclass(kw_only=True, slots=True, frozen=True)
class Variants:
    """The models of the grouped variants and the batch they train on: ``native`` never
    patched, ``patched`` its twin (OFF and R3) with controller ``ctl``, ``traces`` the model's
    own recorded routing."""

    native: nn.Module
    patched: nn.Module
    ctl: replay.ReplayController
    traces: list[replay.RoutedExperts]
    input_ids: torch.Tensor
    labels: torch.Tensor

    def step(self, routing: str, phase: Phase = no_phase) -> Callable[[], torch.Tensor]:
        """The training step of variant ``routing``: NATIVE, OFF, R3 or one of ``--profile``'s
        ablations, R3_NO_ROWS (every trace row marked invalid, so the replay machinery runs but
        no layer replays a row) and R3_TORCH (the replay controller's ``replay_topk`` swapped
        for ``replay_topk_reference`` during the step)."""
        args = (self.input_ids, self.labels)
        if routing == NATIVE:
            return make_step(self.native, *args, phase=phase)
        if routing == OFF:
            return make_step(self.patched, *args, phase=phase)
        if routing == R3:
            return make_step(self.patched, *args, (self.ctl, self.traces), phase)
        if routing == R3_NO_ROWS:
            invalid = [
                replay.RoutedExperts(
                    t.ids, t.moe_layers, t.num_experts, valid=np.zeros(t.num_rows, bool)
                )
                for t in self.traces
            ]
            return make_step(self.patched, *args, (self.ctl, invalid), phase)
        if routing == R3_TORCH:
            replayed = make_step(self.patched, *args, (self.ctl, self.traces), phase)

            def with_torch_ops() -> torch.Tensor:
                # Only the forward calls it; its autograd graph then holds torch ops.
                with mock.patch.object(replay.contexts, "replay_topk", replay_topk_reference):
                    return replayed()

            return with_torch_ops
        raise ValueError(
            f"routing: expected one of {[NATIVE, OFF, R3, R3_NO_ROWS, R3_TORCH]}, got {routing!r}"
        )


def grouped_variants(
    model: nn.Module,
    config: Qwen3MoeConfig,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    tolerance: float,
    rng: np.random.Generator,
    use_experts: Callable[[nn.Module], object] = replay.use_grouped_experts,
) -> Variants:
    """The variants with ``use_experts``'s experts (``model`` gets them and stays unpatched; a
    patched twin runs OFF and R3), after the replay check recorded the traces."""
    use_experts(model)
    patched = twin(model, config)
    use_experts(patched)
    ctl = replay.patch(patched)
    traces = check_replay_reproduces_native(patched, ctl, input_ids, labels, tolerance, rng)
    return Variants(
        native=model,
        patched=patched,
        ctl=ctl,
        traces=traces,
        input_ids=input_ids,
        labels=labels,
    )


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


# ---------------------------------------------------------------------- --profile

# The variants --profile compares; the differences tables are R3 against native.
PROFILED = (NATIVE, OFF, R3, R3_NO_ROWS, R3_TORCH)
GAP_US = 50.0  # GPU idle gaps at least this long are counted and listed
# CUDA runtime and driver calls among the CPU events (cudaLaunchKernel, cuLaunchKernelEx, ...).
_CUDA_API = re.compile(r"cu(da)?[A-Z]")


class PhaseTimer:
    """``make_step``'s ``phase`` that adds up the host seconds of each phase."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begin


@contextmanager
def gc_pauses() -> Iterator[list[float]]:
    """Seconds of each Python garbage collection run inside the block."""
    pauses: list[float] = []
    began = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(callback)


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def host_phases(variants: Variants, iters: int, cuda: bool) -> None:
    """Host ms of each phase of a step (no profiler: wall clock around each, no added
    synchronization) and the wait at the step's final synchronization, medians over ``iters``
    steps per variant."""
    rows = []
    for name in PROFILED:
        timer = PhaseTimer()
        step = variants.step(name, timer)
        step()
        synchronize(cuda)
        per_step: dict[str, list[float]] = {k: [] for k in (*PHASES, "wait", "wall")}
        with gc_pauses() as pauses:
            for _ in range(iters):
                timer.seconds = dict.fromkeys(PHASES, 0.0)
                begin = time.perf_counter()
                step()
                launched = time.perf_counter()
                synchronize(cuda)
                end = time.perf_counter()
                for phase, seconds in timer.seconds.items():
                    per_step[phase].append(seconds)
                per_step["wait"].append(end - launched)
                per_step["wall"].append(end - begin)
        median_ms = {k: 1e3 * statistics.median(v) for k, v in per_step.items()}
        rows.append([
            name, median_ms["wall"], *(median_ms[p] for p in PHASES), median_ms["wait"],
            f"{len(pauses) / iters:.1f}", f"{1e3 * sum(pauses) / iters:.2f}",
        ])  # fmt: skip
    print(
        f"\nhost time per step, no profiler (medians of {iters} steps; ms). 'wait for GPU' is "
        "the host's wait at the step's final synchronization: near 0 means the GPU waited "
        "for the host (host-bound), otherwise the host ran ahead by that much\n"
    )
    print_table(
        ["routing", "wall", *(f"host: {p}" for p in PHASES), "wait for GPU",
         "GC runs / step", "GC ms / step"],
        rows,
    )  # fmt: skip


@dataclass(kw_only=True, slots=True, frozen=True)
class StepProfile:
    """What --profile reads from a torch profiler trace of ``steps`` steps of one variant;
    times in us per step, ``gaps`` over all steps (longest first)."""

    steps: int
    wall_us: float
    kernels: dict[str, tuple[float, float]]
    cpu_self: dict[str, tuple[float, float]]
    busy_us: float
    gaps: list[tuple[float, str, str]]
    phase_host_us: dict[str, float]
    forward_gpu_us: float

    @property
    def gpu_us(self) -> float:
        return sum(t for t, _ in self.kernels.values())

    @property
    def gpu_ops(self) -> float:
        return sum(n for _, n in self.kernels.values())


def profile_steps(step: Callable[[], object], steps: int, cuda: bool) -> StepProfile:
    """``steps`` steps (each followed by a synchronization) under the torch profiler, CPU and
    (on CUDA) GPU activities, after one unprofiled step."""
    step()
    synchronize(cuda)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
            synchronize(cuda)
        wall = time.perf_counter() - begin
    kernels = device_events(prof)
    cpu = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async
    ]
    busy, gaps = busy_and_gaps(kernels)
    markers = {f"step: {p}": p for p in PHASES}
    host = dict.fromkeys(PHASES, 0.0)
    forward_gpu = 0.0
    for e in cpu:
        phase = markers.get(e.name)
        if phase is not None:
            host[phase] += e.cpu_time_total / steps
            if phase == "forward":
                forward_gpu += e.device_time_total / steps
    return StepProfile(
        steps=steps,
        wall_us=1e6 * wall / steps,
        kernels=totals_by_name(kernels, steps, lambda e: e.device_time),
        cpu_self=totals_by_name(cpu, steps, lambda e: e.self_cpu_time_total),
        busy_us=busy / steps,
        gaps=gaps,
        phase_host_us=host,
        forward_gpu_us=forward_gpu,
    )


def sync_sites(step: Callable[[], object]) -> Counter[str]:
    """Where one step synchronizes the host with the GPU (torch's sync debug mode warns at
    every synchronizing CUDA call made from Python's thread), counted per call site."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return Counter(
        f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:80]}"
        for w in caught
        if "synchroniz" in str(w.message)
    )


def routing_alone(variants: Variants, layers: int, cuda: bool, iters: int = 20) -> None:
    """One MoE layer's routing alone at the benchmark's size, forward + backward (a random
    probe as the weights' gradient): the router's own forward (linear, softmax, top-k) against
    the same then ``routing_kernels.replay_topk`` with the recorded trace, as an R3 layer runs
    it. Host us per call (wall clock of the call, which returns once backward's kernels are
    launched) and GPU us per call (profiler)."""
    ctl = variants.ctl
    router = ctl.layers[0].router
    aligned = ctl.replay(variants.traces).aligned  # aligned only, never entered
    trace_TK, replay_T = aligned.ids_TLK[:, 0], aligned.replay_T
    weight = router.weight
    num_tokens = replay_T.shape[0]
    hidden_TH = torch.randn(
        num_tokens, weight.shape[1], dtype=weight.dtype, device=weight.device
    ).requires_grad_()
    probe_TK = torch.rand(num_tokens, ctl.top_k, device=weight.device)
    forward = type(router).forward  # the class's: never a seam
    routing = ctl.routing

    def native() -> None:
        _, weights_TK, _ = forward(router, hidden_TH)
        (weights_TK.float() * probe_TK).sum().backward()

    def replayed() -> None:
        logits_TE, weights_TK, ids_TK = forward(router, hidden_TH)
        weights_TK, _ = replay_topk(
            logits_TE, weights_TK, ids_TK, trace_TK, replay_T, routing.method,
            routed_scaling_factor=routing.routed_scaling_factor,
        )  # fmt: skip
        (weights_TK.float() * probe_TK).sum().backward()

    rows, profiles = [], {}
    for name, fn in (("router", native), ("router + replay_topk", replayed)):
        host = []
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            host.append(1e6 * (time.perf_counter() - begin))
            synchronize(cuda)
        p = profiles[name] = profile_steps(fn, iters, cuda)
        rows.append([name, statistics.median(host), p.gpu_us, f"{p.gpu_ops:.0f}"])
    weight.grad = None
    delta = [b - a for a, b in zip(rows[0][1:3], rows[1][1:3], strict=True)]
    rows.append([f"difference x {layers} layers", *(layers * d for d in delta), ""])
    print(
        f"\none MoE layer's routing alone, forward + backward, {num_tokens} tokens, "
        f"{ctl.num_experts} experts top-{ctl.top_k} ({iters} calls; us per call)\n"
    )
    print_table(["routing", "host us", "GPU us", "GPU ops"], rows)
    if cuda:
        print()
        print_diff_table(
            "GPU activity",
            ("+replay", "router"),
            profiles["router + replay_topk"].kernels,
            profiles["router"].kernels,
            top=8,
        )


def profile_report(variants: Variants, args: argparse.Namespace, cuda: bool) -> None:
    """``--profile``: where a replayed step's time goes, against a native one (see the module
    docstring)."""
    print(f"\n--profile: {', '.join(PROFILED)}", flush=True)
    host_phases(variants, args.iters, cuda)

    def annotate(name: str) -> AbstractContextManager[object]:
        return torch.profiler.record_function(f"step: {name}")

    profiles = {
        name: profile_steps(variants.step(name, annotate), args.profile_steps, cuda)
        for name in PROFILED
    }
    print(
        f"\ntorch profiler, {args.profile_steps} steps per variant, each ending in a "
        f"synchronization (profiler overhead inflates host times). 'GPU idle' is wall time "
        f"with no GPU activity; gaps >= {GAP_US:.0f} us are counted. 'GPU ms from forward' "
        f"is the time of the kernels launched by the forward (the rest: backward)\n"
    )
    rows = []
    for name, p in profiles.items():
        long_gaps = [g for g, *_ in p.gaps if g >= GAP_US]
        rows.append([
            name, p.wall_us / 1e3, p.gpu_us / 1e3, f"{p.gpu_ops:.0f}",
            f"{100 * p.gpu_us / p.wall_us:.1f}%", (p.wall_us - p.busy_us) / 1e3,
            f"{len(long_gaps) / p.steps:.1f} ({sum(long_gaps) / p.steps / 1e3:.2f} ms)",
            p.phase_host_us["forward"] / 1e3, p.phase_host_us["backward"] / 1e3,
            p.forward_gpu_us / 1e3,
        ])  # fmt: skip
    print_table(
        ["routing", "wall ms/step", "GPU ms/step", "GPU ops/step", "kernel time / wall",
         "GPU idle ms/step", f"gaps >= {GAP_US:.0f} us / step", "host ms: forward",
         "host ms: backward", "GPU ms from forward"],
        rows,
    )  # fmt: skip
    r3, native = profiles[R3], profiles[NATIVE]
    labels = ("R3", "native")
    print(
        "\nCPU events by self CPU time per step, R3 vs native ('step: <phase>' self time is "
        "Python time outside torch ops; backward ops run on autograd's thread)\n"
    )
    print_diff_table("CPU event", labels, r3.cpu_self, native.cpu_self)
    routing_alone(variants, len(variants.ctl.layers), cuda)
    if not cuda:
        print("\n(CPU run: the GPU tables and the synchronization count need CUDA)")
        return
    print("\nGPU activities whose time per step differs most, R3 vs native\n")
    print_diff_table("GPU activity", labels, r3.kernels, native.kernels)
    print("\nCUDA runtime and driver calls (syncs, allocations, launches), R3 vs native\n")
    api = [{n: v for n, v in p.cpu_self.items() if _CUDA_API.match(n)} for p in (r3, native)]
    print_diff_table("CUDA call", labels, *api, top=12)
    for name in (NATIVE, R3):
        print(f"\nlongest GPU idle gaps, {name} ({args.profile_steps} steps)\n")
        print_table(
            ["idle us", "GPU activity before", "GPU activity after"],
            [[f"{g:.0f}", before, after] for g, before, after in profiles[name].gaps[:6]],
        )
    print("\nhost-GPU synchronizations in one step (torch sync debug mode)")
    for name in PROFILED:
        sites = sync_sites(variants.step(name))
        print(f"  {name}: {sum(sites.values())}")
        for site, count in sites.most_common(5):
            print(f"    {count} x {site}")


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
    variants = grouped_variants(model, config, input_ids, labels, 1e-4, rng, use_stand_in_experts)
    ctl = variants.ctl
    steps = {name: variants.step(name) for name in (NATIVE, OFF, R3)}
    times = interleaved(steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup, cuda=False)
    native_rounds = [statistics.median(t) for t in times[NATIVE]]
    counts = {name: (ops_per_step(s), python_calls_per_step(s)) for name, s in steps.items()}
    print(
        f"\nhost cost per step, CPU, torch {torch.__version__}: Qwen3-MoE {args.layers} layers, "
        f"{config.num_experts} experts top-{config.num_experts_per_tok}, hidden "
        f"{config.hidden_size}, float32, {batch} x {seq_len} tokens, stand-in experts; "
        f"us vs native: median over {args.rounds} rounds of the paired round-median difference\n"
    )
    table = []
    for name, per_round in times.items():
        differences = [
            (statistics.median(t) - n) * 1e3 for t, n in zip(per_round, native_rounds, strict=True)
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
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (all MoE)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq)")
    parser.add_argument("--batch", type=int, default=2, help="rows; seq_len = tokens / batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--eager-warmup", type=int, default=1, help="HF eager experts warmup")
    parser.add_argument("--eager-iters", type=int, default=3, help="HF eager experts iterations")
    parser.add_argument("--no-eager", action="store_true", help="skip the HF eager experts")
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
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed rounds: host phases, a torch profile of native vs R3 steps "
        "and their host-GPU synchronizations",
    )
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant")
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
    if args.profile_steps < 1:
        parser.error(f"--profile-steps: expected >= 1, got {args.profile_steps}")
    if args.rounds < 1 or args.iters < 1:
        parser.error(f"--rounds, --iters: expected >= 1, got {args.rounds}, {args.iters}")
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

    variants = grouped_variants(model, config, input_ids, labels, tolerance, rng)
    ctl, traces = variants.ctl, variants.traces
    steps = {name: variants.step(name) for name in (NATIVE, OFF, R3)}
    print(
        f"grouped experts: {args.rounds} rounds x {args.iters} steps per variant, interleaved",
        flush=True,
    )
    times = interleaved(steps, rounds=args.rounds, iters=args.iters, warmup=args.warmup, cuda=cuda)
    rows = rows_of("grouped", times)
    for r in rows:
        print(f"  grouped, {r.routing}: {r.ms:.1f} ms / step", flush=True)
    entry = host_us(lambda: ctl.replay(traces))
    print(f"  host time of ctl.replay(traces) (layout, checks, alignment, copy): {entry:.0f} us")
    if args.profile:
        profile_report(variants, args, cuda)

    def timed_eager(routing: str, step: Callable[[], object]) -> None:
        time_steps(step, args.eager_warmup, cuda=cuda)
        ms = statistics.median(time_steps(step, args.eager_iters, cuda=cuda))
        rows.append(Row(experts="HF eager", routing=routing, ms=ms, iters=args.eager_iters))
        print(f"  HF eager, {routing}: {ms:.1f} ms / step", flush=True)

    if not args.no_eager:
        timed_eager(NATIVE, make_step(twin(model, config), input_ids, labels))
        if not args.no_eager_replay:
            eager = twin(model, config)
            eager_ctl = replay.patch(eager)
            timed_eager(R3, make_step(eager, input_ids, labels, replay_with=(eager_ctl, traces)))
    report(rows, device_name)


if __name__ == "__main__":
    main()
