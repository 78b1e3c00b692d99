"""Soak: does anything pile up over a long run? Shared-memory segments, open descriptors, RSS.

1. ``--generate-calls`` (1,000) capture-on ``LLM.generate`` calls on the tiny Qwen3-MoE
   checkpoint (``rollout.testing.make_tiny_moe``), in this process, each of
   ``--prompts-per-call`` sampled requests that return their routed experts (rows checked
   against each request's length), and a ``RoutedExpertsReader`` attached to the store and
   closed again after each call, as a trainer would.
2. ``--grpo-steps`` (200) GRPO steps of ``examples/configs/tiny_cpu.yaml`` (the random
   addition model, R3, one rollout worker and one trainer worker on a local Ray), driven step by
   step with ``GRPOTrainer.train_step``.

For each part, a table of the figures at start (after one warm-up call or step: lazy
allocations are not leaks) and at end, and the change: segments of this run in ``/dev/shm``
(named after the pid of this process or of one of its Ray workers) and their bytes, and open
descriptors and RSS of each process of the run (this driver, the rollout worker, the trainer
worker). Then the segments left once everything is shut down (expected: none). With ``--out``,
``soak.json`` (every sample) and ``soak.png`` (RSS and descriptors over the run).

    python examples/benchmarks/soak.py                                   # the full soak
    python examples/benchmarks/soak.py --generate-calls 20 --grpo-steps 3 --out runs/soak
    python examples/benchmarks/soak.py --grpo-steps 0                    # no Ray
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import print_table
from tqdm.auto import tqdm

from rollout import LLM, SamplingParams
from rollout.capture import RoutedExpertsReader, shm
from rollout.testing import make_tiny_moe

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
# Ray names an actor's process after its class ("ray::RolloutWorker.generate" while busy).
RAY_ACTORS = ("RolloutWorker", "TrainerWorker")
SAMPLES = 50  # points per part for the plot


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """Resources of the run at one moment."""

    segments: int
    segment_bytes: int
    fds: dict[str, int]  # process label -> open descriptors
    rss_mb: dict[str, float]  # process label -> resident set size


def run_processes() -> dict[str, int]:
    """Label -> pid of this process and of the Ray actor processes below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {"driver": os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid in [p for p, pp in parents.items() if pp == parent]:
            frontier.append(pid)
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            for actor in RAY_ACTORS:
                if argv0.startswith(f"ray::{actor}"):
                    found[actor] = pid
    return found


def run_segments(pids: set[int]) -> dict[str, int]:
    """Name -> bytes of the segments in ``/dev/shm`` named after one of ``pids``
    (``routing-replay-<pid>-...``, the pid of the process that drew the engine's id)."""
    sizes = {}
    for entry in os.scandir("/dev/shm"):
        fields = entry.name.split("-")
        ours = entry.name.startswith(f"{shm.SEGMENT_PREFIX}-") and fields[2].isdigit()
        if ours and int(fields[2]) in pids:
            try:
                sizes[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                pass  # unlinked since the scan
    return sizes


def snapshot(processes: dict[str, int]) -> Snapshot:
    segments = run_segments(set(processes.values()))
    fds, rss = {}, {}
    for label, pid in processes.items():
        try:
            count = len(os.listdir(f"/proc/{pid}/fd"))
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue  # the process is gone
        kb = [line.split()[1] for line in status if line.startswith("VmRSS")]
        if kb:  # a zombie has no RSS line
            fds[label], rss[label] = count, int(kb[0]) / 1024
    return Snapshot(
        segments=len(segments), segment_bytes=sum(segments.values()), fds=fds, rss_mb=rss
    )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Part:
    """One part's result: the processes measured, the snapshots after the warm-up and at the
    end, and the samples along the way."""

    processes: dict[str, int]
    start: Snapshot
    end: Snapshot
    samples: list[dict]


def soak(
    part: str, iterations: int, step: Callable[[int], None], processes: Callable[[], dict]
) -> Part:
    """Run ``step(i)`` for i in 0..iterations (0 is the warm-up), measuring as it goes."""
    step(0)
    procs = processes()
    start = snapshot(procs)
    samples = [{"i": 0, **dataclasses.asdict(start)}]
    every = max(1, iterations // SAMPLES)
    for i in tqdm(
        range(1, iterations + 1), desc=part, unit="call" if part == "generate" else "step"
    ):
        step(i)
        if i % every == 0 or i == iterations:
            samples.append({"i": i, **dataclasses.asdict(snapshot(procs))})
    return Part(processes=procs, start=start, end=snapshot(procs), samples=samples)


def generate_part(model: Path, calls: int, prompts_per_call: int) -> Part:
    llm = LLM(model, capture_routing=True, device="cpu", block_size=4, max_num_seqs=16)
    gen = np.random.default_rng(0)

    def call(i: int) -> None:
        prompts = [
            gen.integers(0, 300, gen.integers(4, 24)).tolist() for _ in range(prompts_per_call)
        ]
        params = [
            SamplingParams(
                max_tokens=int(gen.integers(4, 16)),
                seed=int(gen.integers(2**31)),
                return_routed_experts=True,
            )
            for _ in prompts
        ]
        for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
            rows = len(prompt) + len(out.token_ids) - 1
            assert out.routed_experts.shape[0] == rows, (i, out.routed_experts.shape, rows)
        with RoutedExpertsReader.from_spec(llm.routing_reader_spec) as reader:
            reader.read([0])

    try:
        result = soak("generate", calls, call, lambda: {"driver": os.getpid()})
    finally:
        llm.shutdown()
    return result


def grpo_part(model: Path, out_dir: Path, steps: int) -> Part:
    import ray

    from replay.trainer import load_config
    from replay.trainer.loop import GRPOTrainer

    overrides = [
        f"model={model}",
        f"log.out_dir={out_dir}",
        f"steps={steps + 1}",
        "log.checkpoint_every=0",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    config = load_config(TINY_CONFIG, overrides)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = GRPOTrainer(config)
        try:
            result = soak("grpo", steps, lambda i: trainer.train_step(), run_processes)
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
    return result


def table_rows(start: Snapshot, end: Snapshot) -> list[list[object]]:
    """Rows [what, start, end, change] (end and change None for a process that is gone)."""

    def row(what: str, first: float, last: float | None) -> list[object]:
        return [what, first, last, None if last is None else last - first]

    rows = [
        row("/dev/shm segments of the run", start.segments, end.segments),
        row("/dev/shm bytes of the run", start.segment_bytes, end.segment_bytes),
    ]
    for label in start.fds:
        rows.append(row(f"open fds, {label}", start.fds[label], end.fds.get(label)))
        rows.append(row(f"RSS MB, {label}", start.rss_mb[label], end.rss_mb.get(label)))
    return rows


def plot(parts: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(parts), figsize=(6 * len(parts), 6), squeeze=False)
    for col, (part, samples) in enumerate(parts.items()):
        xs = [s["i"] for s in samples]
        for row, (key, ylabel) in enumerate((("rss_mb", "RSS (MB)"), ("fds", "open descriptors"))):
            ax = axes[row][col]
            for label in samples[0][key]:
                ax.plot(xs, [s[key].get(label, np.nan) for s in samples], label=label)
            ax.set_xlabel("call" if part == "generate" else "step")
            ax.set_ylabel(ylabel)
            ax.set_title(part)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate-calls", type=int, default=1000, help="0: skip part 1")
    parser.add_argument("--prompts-per-call", type=int, default=4)
    parser.add_argument("--grpo-steps", type=int, default=200, help="0: skip part 2")
    parser.add_argument("--out", type=Path, default=None, help="write soak.json and soak.png")
    args = parser.parse_args()
    if min(args.generate_calls, args.grpo_steps) < 0 or args.prompts_per_call < 1:
        parser.error(
            "counts: expected --generate-calls, --grpo-steps >= 0, --prompts-per-call >= 1"
        )
    torch.set_num_threads(1)
    parts: dict[str, Part] = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        if args.generate_calls:
            model = make_tiny_moe("qwen3_moe", Path(work) / "qwen3")
            parts["generate"] = generate_part(model, args.generate_calls, args.prompts_per_call)
        if args.grpo_steps:
            parts["grpo"] = grpo_part(Path(work) / "addition", Path(work) / "run", args.grpo_steps)
    titles = {
        "generate": f"{args.generate_calls} capture-on generate calls "
        f"({args.prompts_per_call} requests each)",
        "grpo": f"{args.grpo_steps} GRPO steps (tiny_cpu.yaml, local Ray)",
    }
    for name, part in parts.items():
        print(f"\n{titles[name]}:")
        print_table(["", "start", "end", "change"], table_rows(part.start, part.end))
    # Everything is shut down: no segment of any process of the run may be left.
    left = run_segments({pid for part in parts.values() for pid in part.processes.values()})
    print(f"\nafter shutdown: {len(left)} segments of the run's processes left {sorted(left)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        samples = {name: part.samples for name, part in parts.items()}
        (args.out / "soak.json").write_text(json.dumps(samples, indent=1))
        plot(samples, args.out / "soak.png")
        print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")


if __name__ == "__main__":
    main()
