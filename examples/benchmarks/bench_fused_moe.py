"""Fused MoE experts at Qwen3-30B-A3B's MoE-layer shape (H 2048, I 768, E 128, top-8, bf16).

Per token count T: the Triton path replayed from a CUDA graph (as the engine runs decode) and
eager, the plain-torch reference (HF's loop over experts), and the HBM floor: the bytes of the
distinct experts a random routing touches (expected count ``E * (1 - (1 - K/E)**T)``, each
``3 * H * I`` weights) plus the activations read and written, over the measured device copy
bandwidth. "% of floor" is floor time over graph time; TFLOP/s counts ``6 * T * K * H * I``.

Each timed call runs ``LAYERS`` layers with their own weights and routing, as consecutive
decoder layers would, so that L2 (50 MB on H100) cannot serve one layer's experts from the
previous call; times are per layer.

Run on a CUDA machine with the project installed (``pip install -e .``)::

    python examples/benchmarks/bench_fused_moe.py            # the table
    python examples/benchmarks/bench_fused_moe.py --sweep    # plus decode tile candidates
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
from common import copy_bandwidth_gbps, cuda_time_ms, print_table
from triton.runtime.errors import OutOfResources

from routing_kernels.fused_moe import (
    FusedMoeConfig,
    GemmTiles,
    default_config,
    fused_experts_reference,
    fused_experts_triton,
)

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
DTYPE = torch.bfloat16
TOKENS = (1, 16, 64, 256, 4096)
SWEEP_TOKENS = (1, 16, 64)
LAYERS = 4

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_weights(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's experts in HF's layout, scaled so activations stay O(1)."""
    gate_up_EFH = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
    down_EHI = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device="cuda", dtype=DTYPE)
    return gate_up_EFH.mul_(HIDDEN**-0.5), down_EHI.mul_(INTER**-0.5)


def make_layer(
    weights: tuple[torch.Tensor, torch.Tensor], num_tokens: int, gen: torch.Generator
) -> Layer:
    """Hidden states and a uniformly random top-k routing (softmax over the k) for T tokens."""
    hidden_TH = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda", dtype=DTYPE)
    logits_TE = torch.randn(num_tokens, EXPERTS, generator=gen, device="cuda")
    top_logits_TK, ids_TK = logits_TE.topk(TOP_K, dim=1)
    return hidden_TH, *weights, top_logits_TK.softmax(dim=1), ids_TK.to(torch.int32)


def expected_distinct_experts(num_tokens: int) -> float:
    """Expected number of experts hit when each token picks TOP_K distinct experts at random."""
    return EXPERTS * (1.0 - (1.0 - TOP_K / EXPERTS) ** num_tokens)


def floor_bytes(num_tokens: int) -> float:
    """Bytes a perfect kernel moves per layer: touched experts, activations in and out, routing."""
    itemsize = torch.finfo(DTYPE).bits // 8
    weights = expected_distinct_experts(num_tokens) * 3 * HIDDEN * INTER * itemsize
    activations = 2 * num_tokens * HIDDEN * itemsize
    routing = num_tokens * TOP_K * (4 + 4)
    return weights + activations + routing


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after one eager run that compiles its kernels)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_triton(layers: list[Layer], config: FusedMoeConfig | None = None) -> Callable[[], None]:
    def fn() -> None:
        for layer in layers:
            fused_experts_triton(*layer, config=config)

    return fn


def run_reference(layers: list[Layer]) -> Callable[[], None]:
    def fn() -> None:
        for layer in layers:
            fused_experts_reference(*layer)

    return fn


def main_table(all_weights: list, bandwidth_gbps: float, gen: torch.Generator) -> None:
    rows = []
    for num_tokens in TOKENS:
        layers = [make_layer(weights, num_tokens, gen) for weights in all_weights]
        graph_ms = cuda_time_ms(graphed(run_triton(layers))) / LAYERS
        eager_ms = cuda_time_ms(run_triton(layers)) / LAYERS
        reference_ms = cuda_time_ms(run_reference(layers), warmup=2, iters=10) / LAYERS
        floor_ms = floor_bytes(num_tokens) / (bandwidth_gbps * 1e9) * 1e3
        tflops = 6 * num_tokens * TOP_K * HIDDEN * INTER / (graph_ms * 1e-3) / 1e12
        config = default_config(num_tokens, TOP_K, EXPERTS, DTYPE)
        rows.append(
            [
                num_tokens,
                config.block_m,
                graph_ms,
                eager_ms,
                reference_ms,
                floor_ms,
                f"{100 * floor_ms / graph_ms:.1f}%",
                tflops,
                reference_ms / graph_ms,
            ]
        )
    print_table(
        [
            "T",
            "block_m",
            "triton ms (graph)",
            "triton ms (eager)",
            "reference ms",
            "floor ms",
            "% of floor",
            "TFLOP/s",
            "x reference",
        ],
        rows,
    )


def sweep(all_weights: list, bandwidth_gbps: float, gen: torch.Generator) -> None:
    """Decode tile candidates (block_m 16), graph-timed, to tune ``default_config``."""
    candidates = [
        FusedMoeConfig(
            block_m=16,
            gate_up=GemmTiles(block_n=gate_up_n, block_k=block_k, num_warps=4, num_stages=stages),
            down=GemmTiles(block_n=down_n, block_k=block_k, num_warps=4, num_stages=stages),
        )
        for (gate_up_n, down_n), block_k, stages in itertools.product(
            [(16, 32), (32, 32), (32, 64), (64, 64), (64, 128)], [64, 128, 256], [3, 4]
        )
    ]
    for num_tokens in SWEEP_TOKENS:
        layers = [make_layer(weights, num_tokens, gen) for weights in all_weights]
        floor_ms = floor_bytes(num_tokens) / (bandwidth_gbps * 1e9) * 1e3
        rows = []
        for config in candidates:
            try:
                ms = cuda_time_ms(graphed(run_triton(layers, config))) / LAYERS
            except OutOfResources:
                continue
            rows.append(
                [
                    num_tokens,
                    config.gate_up.block_n,
                    config.down.block_n,
                    config.gate_up.block_k,
                    config.gate_up.num_stages,
                    ms,
                    f"{100 * floor_ms / ms:.1f}%",
                ]
            )
        rows.sort(key=lambda row: row[5])
        print_table(
            ["T", "gate_up block_n", "down block_n", "block_k", "stages", "ms", "% of floor"], rows
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time decode tile candidates")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe: needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    all_weights = [make_weights(gen) for _ in range(LAYERS)]
    bandwidth_gbps = copy_bandwidth_gbps()
    print(
        f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth_gbps:.0f} GB/s, "
        f"H {HIDDEN} I {INTER} E {EXPERTS} top-{TOP_K} {DTYPE}, {LAYERS} layers per timed call"
    )
    main_table(all_weights, bandwidth_gbps, gen)
    if args.sweep:
        sweep(all_weights, bandwidth_gbps, gen)


if __name__ == "__main__":
    main()
