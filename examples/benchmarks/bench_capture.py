"""Routed-expert capture costs: decode throughput with capture on vs off, the time from a request
finishing to its rows being in its output, and reader throughput.

1. Decode throughput at Qwen3-30B-A3B's shape (``bench_engine``'s model: dummy bf16 weights, input
   512, output 256), batch 1, 64 and 256, for an engine built with ``capture_routing=False``
   and one with ``capture_routing=True`` whose requests all ask for their rows. The two engines
   cannot share the GPU, so they run one after the other, in the order off, on, off: the "off"
   figure is the better of its two runs, so drift between the runs cannot favour capture.
   Target (issue 4): on / off >= 0.99 at every batch.
2. Finish-to-rows latency, measured in the capture-on runs: for each request that finishes, the
   host time from its finishing step's sampled tokens being known to its ``RequestOutput``
   holding its rows, i.e. the routing recorder's ``on_finish`` (which reads the rows of its
   positions from the store straight into the output array, filing a pending step's copy first
   only when that step fed one of them).
3. Reader throughput: a routing store of 256 requests x 8192 KV slots (48 MoE layers, top-8,
   uint8 ids: 805 MB of shared memory) filled with random ids; a second process attaches a
   ``RoutedExpertsReader`` and pulls every request's rows by its slots (16-slot blocks in a
   shuffled order, as a paged KV cache hands them out). Floor: one contiguous host copy of the
   same bytes, measured in the same process.

    python examples/benchmarks/bench_capture.py                  # everything (an H200 runs
                                                                 # batch 256; an H100 does not)
    python examples/benchmarks/bench_capture.py --layers 4 --batches 1 64
    python examples/benchmarks/bench_capture.py --reader-only    # part 3 (no GPU needed)
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_engine import INPUT_LEN, OUTPUT_LEN, qwen3_30b_a3b_config, run_engine_decode
from common import print_table

from rollout import LLM
from rollout.capture import RoutedExpertsReader, RoutingRecorder, RoutingStore
from rollout.engine.llm_engine import LLMEngine

BATCHES = (1, 64, 256)
READER_REQUESTS, READER_TOKENS, BLOCK = 256, 8192, 16


class FinishLatency:
    """Times, per finishing request, the recorder's ``on_finish`` (wraps the recorder's bound
    method, which the scheduler calls; ``restore`` puts it back)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.recorder = engine.capture
        assert isinstance(self.recorder, RoutingRecorder), "FinishLatency needs capture_routing"
        self.seconds: dict[int, float] = {}
        on_finish = self.recorder.on_finish

        def timed(seq):
            start = time.perf_counter()
            on_finish(seq)
            self.seconds[seq.seq_id] = time.perf_counter() - start

        self.recorder.on_finish = timed

    def restore(self) -> None:
        del self.recorder.on_finish  # the class's method again


def decode_runs(
    folder: Path,
    layers: int,
    batches: list[int],
    prompts: list[list[int]],
    *,
    capture: bool,
) -> tuple[dict[int, float], list[float]]:
    """Decode tokens/s per batch for one engine, and the finish-to-rows latencies (seconds) of
    every request of the capture-on engine."""
    max_batch = max(batches)
    blocks_per_seq = math.ceil((INPUT_LEN + OUTPUT_LEN) / BLOCK)
    llm = LLM(
        folder,
        dtype="bfloat16",
        load_format="dummy",
        max_num_seqs=max_batch,
        max_num_batched_tokens=8192,
        max_model_len=INPUT_LEN + OUTPUT_LEN,
        block_size=BLOCK,
        kv_cache_blocks=max_batch * blocks_per_seq + 64,
        capture_routing=capture,
    )
    latency = FinishLatency(llm.engine) if capture else None
    tokens_per_s: dict[int, float] = {}
    try:
        for batch in batches:
            seconds, tokens, _, _ = run_engine_decode(
                llm, prompts[:batch], return_routed_experts=capture
            )
            tokens_per_s[batch] = tokens / seconds
    finally:
        if latency is not None:
            latency.restore()
        llm.shutdown()
    seconds = [] if latency is None else list(latency.seconds.values())
    del llm, latency
    gc.collect()  # the wrappers' closures form cycles with the engine: free its weights now
    torch.cuda.empty_cache()
    return tokens_per_s, seconds


def _read_all(spec, requests: list[np.ndarray], result) -> None:
    """Child process: attach and pull every request's rows; send back the seconds taken."""
    with RoutedExpertsReader.from_spec(spec) as reader:
        seconds = []
        for _ in range(2):  # the first pass also faults the mapping's pages in
            start = time.perf_counter()
            total = sum(reader.read(slots).nbytes for slots in requests)
            seconds.append(time.perf_counter() - start)
        result.send((seconds, total))


def reader_throughput(num_layers: int) -> list[list[object]]:
    """Rows [pass, requests, tokens each, GB pulled, seconds, GB/s, floor GB/s, % of floor] for
    a cold pass (the reader's first: it faults the mapping in) and a warm one."""
    num_slots = READER_REQUESTS * READER_TOKENS
    gen = np.random.default_rng(0)
    name = f"rr-bench-reader-{multiprocessing.current_process().pid}"
    with RoutingStore(
        name=name,
        num_kv_slots=num_slots,
        num_moe_layers=num_layers,
        top_k=8,
        max_num_tokens=8192,
        device="cpu",
        dtype=torch.uint8,
    ) as store:
        # Fill it through the engine's own path: capture-buffer rows filed by slot.
        chunk = 8192
        for first in range(0, num_slots, chunk):
            ids_TLK = torch.from_numpy(gen.integers(0, 128, (chunk, num_layers, 8), dtype=np.uint8))
            store.after_forward(ids_TLK, chunk, np.arange(first, first + chunk))
            store.commit()
        blocks = gen.permutation(num_slots // BLOCK).reshape(READER_REQUESTS, -1)
        requests = [
            (b[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1).astype(np.int64) for b in blocks
        ]
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_read_all, args=(store.reader_spec(), requests, send))
        child.start()
        seconds, nbytes = receive.recv()
        child.join()
        # Floor: one contiguous copy of the same number of bytes (best of 3).
        src = np.ones(nbytes, dtype=np.uint8)
        out = np.empty_like(src)
        floor_s = min(_timed_copy(out, src) for _ in range(3))
    gb = nbytes / 1e9
    return [
        [
            name,
            READER_REQUESTS,
            READER_TOKENS,
            gb,
            s,
            gb / s,
            gb / floor_s,
            f"{100 * floor_s / s:.0f}%",
        ]
        for name, s in zip(("cold", "warm"), seconds)
    ]


def _timed_copy(out: np.ndarray, src: np.ndarray) -> float:
    start = time.perf_counter()
    np.copyto(out, src)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48, help="decoder layers (48: the model)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--reader-only", action="store_true", help="only part 3 (CPU)")
    args = parser.parse_args()
    began = time.perf_counter()

    if not args.reader_only:
        if not torch.cuda.is_available():
            raise SystemExit("bench_capture: parts 1-2 need a CUDA device (--reader-only runs 3)")
        config = qwen3_30b_a3b_config(args.layers)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(
            0, config.vocab_size, (max(args.batches), INPUT_LEN), generator=gen
        ).tolist()
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            off_a, _ = decode_runs(Path(folder), args.layers, args.batches, prompts, capture=False)
            on, latencies = decode_runs(
                Path(folder), args.layers, args.batches, prompts, capture=True
            )
            off_b, _ = decode_runs(Path(folder), args.layers, args.batches, prompts, capture=False)
        print(
            f"\n{torch.cuda.get_device_name()}, Qwen3-30B-A3B shape with {args.layers} layers "
            f"(dummy bf16 weights), input {INPUT_LEN}, output {OUTPUT_LEN}; decode tokens/s, "
            "capture off (best of the runs before and after) vs on\n"
        )
        rows = []
        for b in args.batches:
            off = max(off_a[b], off_b[b])
            rows.append([b, off_a[b], on[b], off_b[b], f"{on[b] / off:.3f}"])
        print_table(["batch", "off (1st)", "on", "off (2nd)", "on / best off"], rows)
        ms = sorted(1e3 * s for s in latencies)
        print(f"\nFinish-to-rows latency over {len(ms)} requests (capture on)\n")
        print_table(
            ["requests", "median ms", "p99 ms", "max ms"],
            [
                [
                    len(ms),
                    statistics.median(ms),
                    ms[min(len(ms) - 1, int(0.99 * len(ms)))],
                    ms[-1],
                ]
            ],
        )

    print(f"\nReader throughput ({args.layers} MoE layers, top-8, uint8 ids)\n")
    print_table(
        [
            "pass",
            "requests",
            "tokens each",
            "GB",
            "seconds",
            "GB/s",
            "copy floor GB/s",
            "% floor",
        ],
        reader_throughput(args.layers),
    )
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
