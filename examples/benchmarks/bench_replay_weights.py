"""Benchmark replay gate weights, forward + backward: Triton vs the torch reference vs the floor.

Legend: T tokens, E experts, K replayed ids per row.

    python examples/benchmarks/bench_replay_weights.py            # needs CUDA; prints Markdown

One timed step is what training does per MoE layer: ``replay_weights`` on bf16 router logits
and uint8 trace ids, then the gradient w.r.t. the logits (``torch.autograd.grad``, so no
accumulation into ``.grad`` is timed). Three Triton columns: eager with the id check (one host
synchronization), eager without it (what the replay controller runs: trace ids are validated
when the trace is built), and the unchecked step replayed from CUDA graphs
(``torch.cuda.make_graphed_callables``), which removes the host's launch cost and leaves the
GPU time that the floor bounds.

The floor is the bytes the step must move at minimum over the measured copy bandwidth:
logits read (the whole [T, E] row for DEFAULT; only the K logits at the ids for the gathered
methods, which never need the rest of the row) + ids read + weights written (fp32) +
grad_weights read (fp32) + grad_logits written (the whole [T, E] in the logits' dtype).
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth_gbps, cuda_time_ms, print_table

from routing_kernels.replay_weights import replay_weights_reference, replay_weights_triton
from routing_kernels.routing_method import RoutingMethod

CASES = [
    (RoutingMethod.RENORMALIZE_NAIVE, 128, 8, 1.0),
    (RoutingMethod.DEEPSEEK_V3, 256, 8, 2.5),
]


def floor_bytes(
    method: RoutingMethod, num_tokens: int, num_experts: int, top_k: int, logits_itemsize: int
) -> int:
    """Minimum bytes moved by forward + backward (see the module docstring)."""
    logits_read = num_tokens * (num_experts if method is RoutingMethod.DEFAULT else top_k)
    ids_read = num_tokens * top_k  # uint8 trace ids
    weights_written = grad_weights_read = num_tokens * top_k * 4
    grad_logits_written = num_tokens * num_experts * logits_itemsize
    return (
        logits_read * logits_itemsize
        + ids_read
        + weights_written
        + grad_weights_read
        + grad_logits_written
    )


def make_step(fn, logits_TE, ids_TK, grad_TK, method, scale, check_ids=True):
    """One forward + backward of ``fn``; returns the gradient w.r.t. the logits."""

    def step() -> torch.Tensor:
        weights_TK = fn(logits_TE, ids_TK, method, routed_scaling_factor=scale, check_ids=check_ids)
        (grad_logits_TE,) = torch.autograd.grad(weights_TK, logits_TE, grad_TK)
        return grad_logits_TE

    return step


def make_graphed_step(logits_TE, ids_TK, grad_TK, method, scale):
    """The unchecked Triton forward + backward captured in CUDA graphs."""

    def forward(x_TE: torch.Tensor) -> torch.Tensor:
        return replay_weights_triton(
            x_TE, ids_TK, method, routed_scaling_factor=scale, check_ids=False
        )

    graphed = torch.cuda.make_graphed_callables(forward, (logits_TE,))

    def step() -> torch.Tensor:
        (grad_logits_TE,) = torch.autograd.grad(graphed(logits_TE), logits_TE, grad_TK)
        return grad_logits_TE

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 65536])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_replay_weights needs a CUDA device")

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    bandwidth_gbps = copy_bandwidth_gbps()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth_gbps:.0f} GB/s\n")
    rows = []
    for method, num_experts, top_k, scale in CASES:
        for num_tokens in args.tokens:
            logits_TE = (
                torch.randn(num_tokens, num_experts, device="cuda", generator=gen)
                .bfloat16()
                .requires_grad_()
            )
            ids_TK = (
                torch.rand(num_tokens, num_experts, device="cuda", generator=gen)
                .argsort(dim=1)[:, :top_k]
                .to(torch.uint8)
            )
            grad_TK = torch.randn(num_tokens, top_k, device="cuda", generator=gen)
            triton_step = make_step(
                replay_weights_triton, logits_TE, ids_TK, grad_TK, method, scale
            )
            reference_step = make_step(
                replay_weights_reference, logits_TE, ids_TK, grad_TK, method, scale
            )
            # Both results are rounded to bf16 from float32 gradients: equal up to one ulp.
            torch.testing.assert_close(triton_step(), reference_step(), rtol=1e-2, atol=1e-2)

            unchecked_step = make_step(
                replay_weights_triton, logits_TE, ids_TK, grad_TK, method, scale, check_ids=False
            )
            graphed_step = make_graphed_step(logits_TE, ids_TK, grad_TK, method, scale)
            torch.testing.assert_close(graphed_step(), reference_step(), rtol=1e-2, atol=1e-2)

            triton_ms = cuda_time_ms(triton_step, warmup=args.warmup, iters=args.iters)
            unchecked_ms = cuda_time_ms(unchecked_step, warmup=args.warmup, iters=args.iters)
            graphed_ms = cuda_time_ms(graphed_step, warmup=args.warmup, iters=args.iters)
            reference_ms = cuda_time_ms(reference_step, warmup=args.warmup, iters=args.iters)
            nbytes = floor_bytes(method, num_tokens, num_experts, top_k, logits_TE.element_size())
            floor_ms = nbytes / (bandwidth_gbps * 1e9) * 1e3
            rows.append([
                method.name, num_experts, top_k, num_tokens,
                triton_ms, unchecked_ms, graphed_ms, reference_ms, floor_ms,
                f"{100 * floor_ms / graphed_ms:.1f}%", f"{reference_ms / unchecked_ms:.2f}x",
            ])  # fmt: skip
    print_table(
        [
            "method", "E", "k", "T",
            "triton checked (ms)", "triton unchecked (ms)", "triton graphed (ms)",
            "reference (ms)", "floor (ms)", "graphed % of floor", "unchecked vs reference",
        ],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
