"""Benchmark routing (``routing_kernels.route``): Triton kernel vs torch reference vs the floor.

Legend: T tokens, E experts, K top_k.

    python examples/benchmarks/bench_route.py            # needs CUDA; prints Markdown
    python examples/benchmarks/bench_route.py --sweep    # also times BLOCK_T x num_warps

Cases: RENORMALIZE_NAIVE with E = 128, K = 8 (Qwen3-MoE shape) and DEEPSEEK_V3 with E = 256,
K = 8, a float32 correction bias, 8 groups of which 4 are kept and scaling 2.5 (DeepSeek-V3
shape), on bf16 logits (``--dtype``), for T in {1, 64, 4096, 65536}. Three timings: the Triton
launcher called eagerly (host-side checks and launch included, which dominate at small T), the
same call replayed from a CUDA graph (what the engine's decode runs: GPU time only), and the
torch reference on the same CUDA tensors.

The floor is the bytes routing must move over the measured copy bandwidth: logits read
(T * E * itemsize) + bias read (E * 4) + ids (int32) and weights (float32) written
(T * K * 8), + T * K bytes with ``--capture`` (a uint8 capture view written in the same launch).
"% of floor" is floor time / graphed time.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from common import copy_bandwidth_gbps, cuda_time_ms, print_table

from routing_kernels.route import route_reference, route_triton
from routing_kernels.routing_method import RoutingMethod

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (method, E, K, route keyword arguments besides the bias)
CASES = [
    (RoutingMethod.RENORMALIZE_NAIVE, 128, 8, {}),
    (
        RoutingMethod.DEEPSEEK_V3,
        256,
        8,
        {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
    ),
]
SWEEP_BLOCK_T = [1, 2, 4, 8, 16, 32, 64, 128]
SWEEP_NUM_WARPS = [1, 2, 4, 8]


def floor_bytes(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    logits_itemsize: int,
    *,
    has_bias: bool,
    capture: bool,
) -> int:
    """Minimum bytes routing moves (see the module docstring)."""
    logits_read = num_tokens * num_experts * logits_itemsize
    bias_read = num_experts * 4 if has_bias else 0
    outputs_written = num_tokens * top_k * (4 + 4 + (1 if capture else 0))
    return logits_read + bias_read + outputs_written


def sweep_configs(num_experts: int) -> list[tuple[int, int]]:
    """(BLOCK_T, num_warps) pairs giving each thread 8 to 64 logits of the tile."""
    block_e = 1 << (num_experts - 1).bit_length()
    return [
        (block_t, num_warps)
        for block_t in SWEEP_BLOCK_T
        for num_warps in SWEEP_NUM_WARPS
        if 8 <= block_t * block_e // (32 * num_warps) <= 64
    ]


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_inputs(method, num_tokens, num_experts, top_k, dtype, capture, gen):
    """Logits, the route keyword arguments (bias, capture view) for one case."""
    logits_TE = (3.0 * torch.randn(num_tokens, num_experts, device="cuda", generator=gen)).to(dtype)
    kwargs = {}
    if method is RoutingMethod.DEEPSEEK_V3:
        kwargs["correction_bias"] = 0.1 * torch.randn(num_experts, device="cuda", generator=gen)
    if capture:
        # A view of layer 0 of a [T, layers, K] buffer, as the engine passes it.
        buffer = torch.zeros(num_tokens, 2, top_k, dtype=torch.uint8, device="cuda")
        kwargs["capture_out"] = buffer[:, 0]
    return logits_TE, kwargs


def check_agreement(logits_TE, top_k, method, kwargs) -> None:
    """The kernel routes like the reference (sigmoid rounding may flip DeepSeek near-ties)."""
    weights_t, ids_t = route_triton(logits_TE, top_k, method, **kwargs)
    weights_r, ids_r = route_reference(logits_TE, top_k, method, **kwargs)
    same_T = (ids_t == ids_r).all(dim=1)
    if method is not RoutingMethod.DEEPSEEK_V3:
        assert bool(same_T.all()), "route_triton and route_reference chose different experts"
    assert same_T.float().mean().item() > 0.999, "route_triton disagrees with the reference"
    torch.testing.assert_close(weights_t[same_T], weights_r[same_T], rtol=1e-4, atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 65536])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--capture", action="store_true", help="also write a uint8 capture view")
    parser.add_argument("--sweep", action="store_true", help="time BLOCK_T x num_warps at max T")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_route needs a CUDA device")

    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    bandwidth_gbps = copy_bandwidth_gbps()
    print(
        f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth_gbps:.0f} GB/s, "
        f"logits {args.dtype}, capture {'on' if args.capture else 'off'}\n"
    )
    timing = {"warmup": args.warmup, "iters": args.iters}
    rows, sweep_rows = [], []
    for method, num_experts, top_k, extra in CASES:
        for num_tokens in args.tokens:
            logits_TE, kwargs = make_inputs(
                method, num_tokens, num_experts, top_k, dtype, args.capture, gen
            )
            kwargs.update(extra)
            check_agreement(logits_TE, top_k, method, kwargs)

            triton_call = functools.partial(route_triton, logits_TE, top_k, method, **kwargs)
            reference_call = functools.partial(route_reference, logits_TE, top_k, method, **kwargs)
            eager_ms = cuda_time_ms(triton_call, **timing)
            graphed_ms = cuda_time_ms(graphed(triton_call), **timing)
            reference_ms = cuda_time_ms(reference_call, **timing)
            nbytes = floor_bytes(
                num_tokens, num_experts, top_k, logits_TE.element_size(),
                has_bias="correction_bias" in kwargs, capture=args.capture,
            )  # fmt: skip
            floor_ms = nbytes / (bandwidth_gbps * 1e9) * 1e3
            rows.append([
                method.name, num_experts, top_k, num_tokens,
                1e3 * eager_ms, 1e3 * graphed_ms, 1e3 * reference_ms, 1e3 * floor_ms,
                f"{100 * floor_ms / graphed_ms:.1f}%", f"{reference_ms / eager_ms:.1f}x",
            ])  # fmt: skip
            if args.sweep and num_tokens == max(args.tokens):
                for block_t, num_warps in sweep_configs(num_experts):
                    tuned = functools.partial(triton_call, block_t=block_t, num_warps=num_warps)
                    ms = cuda_time_ms(graphed(tuned), **timing)
                    sweep_rows.append([
                        method.name, num_tokens, block_t, num_warps,
                        1e3 * ms, f"{100 * floor_ms / ms:.1f}%",
                    ])  # fmt: skip
    print_table(
        [
            "method", "E", "k", "T",
            "triton eager (us)", "triton graphed (us)", "reference (us)", "floor (us)",
            "graphed % of floor", "eager vs reference",
        ],
        rows,
    )  # fmt: skip
    if sweep_rows:
        print()
        print_table(
            ["method", "T", "BLOCK_T", "num_warps", "graphed (us)", "% of floor"], sweep_rows
        )


if __name__ == "__main__":
    main()
