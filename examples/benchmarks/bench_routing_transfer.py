"""The cost of a step's routing on its way from the rollout workers to the trainer (CPU, Ray).

At Qwen3-30B-A3B's shape (48 MoE layers, top-8 of 128 experts, uint8 ids: 384 bytes a token)
a step of 256 samples x 8192 tokens carries 256 x 8191 routing rows, 0.8 GB. On a local Ray
(the machine's object store; on a real cluster the trainer's node adds one network copy), with
``--workers`` rollout-worker actors holding their share of the samples' rows (as engine outputs,
``rollout.RequestOutput``) and a trainer actor, this times, side by side in one run:

- floor: one host copy of the step's bytes in this process, into a buffer written before and
  into a fresh one (first-touch page faults: what every newly allocated buffer pays);
- the routing's way to the trainer, three ways, from the call on the workers to the trainer
  holding every sample's rows:

  - ``via driver``: how the loop moved routing before: each worker returns its outputs with
    their arrays, the driver builds the ``RoutedExperts`` traces (``Batch.from_outputs``:
    validated and copied) and puts them in the object store once more for the trainer;
  - ``object per sample``: each worker puts every sample's rows as an object of its own and
    the trainer fetches them all;
  - ``one concatenated buffer per worker``: the worker concatenates its samples' rows and
    returns the buffer as an object of its own;
  - ``object per worker``: ``RolloutWorker.generate_split`` (``split_routing``: the samples'
    arrays as they are, returned as one object of its own, which the driver never fetches);
    the trainer fetches one object per worker (zero-copy views of the object store); and the
    same with a private copy on the trainer after the fetch (what zero-copy saves);

- on the trainer: ``WorkerRouting.traces`` (one ``RoutedExperts`` per sample: validated and
  copied) and the alignment onto the training batch (``replay.layout.align_traces``) in
  micro-batches of ``--micro-batch`` samples, padded (``[micro, tokens]`` with an attention
  mask) and packed (one row, ``cu_seqlens``).

Each time is the best of ``--repeats`` rounds (after a warm-up) that run the variants in turn:
on a shared machine the least disturbed run. The last column compares each stage with the budget: 2% of a step's rollout time (``--step-s``,
default 25 s). Where 25 s comes from: this repository's engine decodes 256 sequences of
Qwen3-30B-A3B at 10345 tok/s on one H200 (BENCHMARKS.md, 2026-11-23, short context), so a step
of 256 x 8192 tokens is at least 2.1 M / 10345 = 203 s on one engine, and 25 s on eight GPUs at
the same per-GPU rate (a lower bound: longer contexts and smaller per-GPU batches only make
the rollout slower). 2% of 25 s: 0.5 s.

    python examples/benchmarks/bench_routing_transfer.py                 # 0.8 GB, ~3 GB peak
    python examples/benchmarks/bench_routing_transfer.py --scale 0.25    # 64 samples
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
from common import print_table

from replay.layout import BatchLayout, align_traces
from replay.routed_experts import RoutedExperts
from replay.trainer.routing_transfer import WorkerRouting, split_routing
from rollout import RequestOutput, RoutingSpec
from routing_kernels import RoutingMethod

NUM_EXPERTS = 128


def routing_rows(samples: int, rows: int, layers: int, top_k: int, seed: int) -> np.ndarray:
    """Distinct ids per (row, layer) without a sort: ``(r + 16 j) % 128`` for a random ``r``."""
    rng = np.random.default_rng(seed)
    base_SRL1 = rng.integers(0, NUM_EXPERTS, (samples, rows, layers, 1), dtype=np.uint8)
    step_K = (np.arange(top_k, dtype=np.uint8) * (NUM_EXPERTS // top_k)).astype(np.uint8)
    return (base_SRL1 + step_K) % NUM_EXPERTS


class Source:
    """A rollout worker's outputs of one step (engine outputs with their routing rows)."""

    def __init__(self, spec: RoutingSpec, samples: int, rows: int, seed: int) -> None:
        self.spec = spec
        rows_SRLK = routing_rows(samples, rows, spec.num_moe_layers, spec.top_k, seed)
        self.outputs = [
            RequestOutput(
                request_id=i,
                prompt_token_ids=[0],
                token_ids=[0],
                text=None,
                logprobs=np.zeros(1, dtype=np.float32),
                finish_reason="length",
                num_cached_tokens=0,
                routed_experts=rows_SRLK[i],
            )
            for i in range(samples)
        ]

    def arrays(self) -> list[np.ndarray]:
        return [out.routed_experts for out in self.outputs]

    def put_each(self) -> list[ray.ObjectRef]:
        return [ray.put(out.routed_experts) for out in self.outputs]

    def packed(self) -> tuple[list[RequestOutput], WorkerRouting | None]:
        return split_routing(self.outputs, self.spec)

    def concatenated(self) -> tuple[int, np.ndarray]:
        return 0, np.concatenate(self.arrays())


class Trainer:
    """The trainer's side: fetch routing objects, build traces, align them."""

    def fetch(self, refs: list[ray.ObjectRef]) -> int:
        # Nested refs are not resolved by Ray: the get is here, as in TrainerWorker.step.
        return sum(_nbytes(part) for part in ray.get(refs))

    def fetch_nested(self, refs: list[ray.ObjectRef]) -> int:
        return sum(self.fetch(inner) for inner in ray.get(refs))

    def fetch_copy(self, refs: list[ray.ObjectRef]) -> int:
        """``fetch``, then a private copy of each array (what zero-copy saves)."""
        return sum(np.array(a).nbytes for part in ray.get(refs) for a in part.rows)


def _nbytes(part: Any) -> int:
    if isinstance(part, WorkerRouting):
        return part.nbytes
    if isinstance(part, np.ndarray):
        return part.nbytes
    return sum(t.ids.nbytes for t in part)


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """``{name: (seconds, last result)}``: each ``fn`` called once to warm up (page faults of
    fresh buffers, Ray's first-call costs), then ``repeats`` rounds calling every ``fn`` in
    turn; the least of each one's times (on a shared machine, the least disturbed run)."""
    results = {name: fn() for name, fn in fns.items()}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: (min(seconds[name]), results[name]) for name in fns}


def copy_floor_s(nbytes: int, repeats: int) -> tuple[float, float]:
    """Seconds of one host copy of ``nbytes``: into a buffer written before (``numpy.copyto``),
    and into a fresh one (``numpy.array``: the kernel maps and zeroes its pages on first touch,
    as for every buffer a step allocates anew)."""
    src = np.full(nbytes, 7, dtype=np.uint8)
    dst = np.zeros_like(src)
    best = best_of(
        {"touched": lambda: np.copyto(dst, src), "fresh": lambda: np.array(src)}, repeats
    )
    return best["touched"][0], best["fresh"][0]


def transfer_s(
    spec: RoutingSpec, samples: int, rows: int, workers: int, repeats: int
) -> list[tuple[str, float]]:
    """``[(stage, seconds)]`` of the routing's ways from the workers to the trainer."""
    nbytes = samples * rows * spec.num_moe_layers * spec.top_k
    ray.init(
        num_cpus=workers + 1,
        object_store_memory=max(2 << 30, 3 * nbytes),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        shares = np.array_split(np.arange(samples), workers)
        sources = [
            ray.remote(Source).options(num_cpus=1).remote(spec, len(share), rows, seed)
            for seed, share in enumerate(shares)
        ]
        trainer = ray.remote(Trainer).options(num_cpus=1).remote()
        ray.get([actor.__ray_ready__.remote() for actor in [*sources, trainer]])

        def via_driver() -> int:
            arrays = [a for part in ray.get([w.arrays.remote() for w in sources]) for a in part]
            traces = [RoutedExperts(a, spec.moe_layers, spec.num_experts) for a in arrays]
            return ray.get(trainer.fetch.remote([ray.put(traces)]))

        def per_sample() -> int:
            return ray.get(trainer.fetch_nested.remote([w.put_each.remote() for w in sources]))

        def concatenated() -> int:
            routing = [w.concatenated.options(num_returns=2).remote()[1] for w in sources]
            return ray.get(trainer.fetch.remote(routing))

        def per_worker(fetch: str = "fetch") -> int:
            routing = [w.packed.options(num_returns=2).remote()[1] for w in sources]
            return ray.get(getattr(trainer, fetch).remote(routing))

        paths = {
            "via driver (before)": via_driver,
            "object per sample": per_sample,
            "one concatenated buffer per worker": concatenated,
            "object per worker (now)": per_worker,
            "object per worker, copied on the trainer": lambda: per_worker("fetch_copy"),
        }
        out = []
        for name, (seconds, got) in best_of(paths, repeats).items():
            assert got == nbytes, (name, got, nbytes)
            out.append((f"transfer: {name}", seconds))
        return out
    finally:
        ray.shutdown()


def align_all(
    traces: tuple[RoutedExperts, ...], spec: RoutingSpec, micro: int, packed: bool
) -> None:
    """Align every trace onto its micro-batch, as the learner does, padded or packed."""
    tokens = traces[0].num_rows + 1
    for lo in range(0, len(traces), micro):
        chunk = traces[lo : lo + micro]
        if packed:
            layout = BatchLayout.from_cu_seqlens(np.arange(len(chunk) + 1) * tokens)
        else:
            layout = BatchLayout.from_attention_mask(np.ones((len(chunk), tokens), dtype=np.int64))
        align_traces(
            chunk,
            layout,
            moe_layers=spec.moe_layers,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per sample")
    parser.add_argument("--layers", type=int, default=48, help="MoE layers")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of --samples to run")
    parser.add_argument("--workers", type=int, default=2, help="rollout-worker actors")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per alignment")
    parser.add_argument("--repeats", type=int, default=5, help="rounds after a warm-up")
    parser.add_argument("--step-s", type=float, default=25.0, help="assumed rollout s / step")
    args = parser.parse_args()
    samples = max(args.workers, round(args.samples * args.scale))
    rows = args.tokens - 1
    spec = RoutingSpec(
        moe_layers=tuple(range(args.layers)),
        num_experts=NUM_EXPERTS,
        top_k=args.top_k,
        method=RoutingMethod.RENORMALIZE,
    )
    nbytes = samples * rows * args.layers * args.top_k
    print(
        f"{samples} samples x {args.tokens} tokens, {args.layers} layers x top-{args.top_k} "
        f"uint8: {nbytes / 1e9:.3f} GB of routing; {args.workers} workers; "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    copy_s, fresh_s = copy_floor_s(nbytes, args.repeats)
    rows_out = transfer_s(spec, samples, rows, args.workers, args.repeats)

    routing = split_routing(Source(spec, samples, rows, seed=7).outputs, spec)[1]
    assert routing is not None
    ((traces_s, traces),) = best_of({"traces": routing.traces}, args.repeats).values()
    rows_out.append(("trainer: WorkerRouting.traces (validate + copy)", traces_s))
    micro = args.micro_batch
    aligned = best_of(
        {
            f"trainer: align_traces, {layout}, micro-batch {micro}": (
                lambda packed=layout == "packed": align_all(traces, spec, micro, packed)
            )
            for layout in ("padded", "packed")
        },
        args.repeats,
    )
    rows_out += [(name, seconds) for name, (seconds, _) in aligned.items()]

    budget = 0.02 * args.step_s
    table = [
        ("floor: one host copy (numpy.copyto)", copy_s),
        ("floor: one host copy into a fresh buffer", fresh_s),
        *rows_out,
    ]
    print_table(
        ["stage", "s", "GB/s", "x copy", f"% of 2% of {args.step_s:g} s"],
        [
            (name, f"{s:.3f}", f"{nbytes / s / 1e9:.2f}", f"{s / copy_s:.1f}", f"{s / budget:.0%}")
            for name, s in table
        ],
    )
    stage = dict(rows_out)
    path = (
        stage["transfer: object per worker (now)"]
        + stage[f"trainer: align_traces, padded, micro-batch {args.micro_batch}"]
    )
    traces = stage["trainer: WorkerRouting.traces (validate + copy)"]
    print(
        f"\ntransfer (object per worker) + padded alignment: {path:.3f} s = "
        f"{path / args.step_s:.2%} of a {args.step_s:g} s rollout step (target < 2%: "
        f"{'met' if path < budget else 'missed'}); with the traces' construction: "
        f"{(path + traces) / args.step_s:.2%}"
    )


if __name__ == "__main__":
    main()
