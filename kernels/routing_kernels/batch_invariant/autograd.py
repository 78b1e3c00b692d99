"""``with_reference_backward``: a batch-invariant forward with an ordinary torch backward.

Only the forward of a deterministic op has to reproduce the inference engine's bits; its
gradient may come from any mathematically equal computation. The backward here recomputes the
op with plain torch (the reference) under autograd and differentiates that, so an op needs no
hand-written gradient and autograd never records the invariant forward's intermediates (for a
matmul, the ``[rows, cols, K]`` products).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["with_reference_backward"]


def with_reference_backward(
    forward: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    *inputs: torch.Tensor | None,
) -> torch.Tensor:
    """``forward(*inputs)``, differentiable through ``reference(*inputs)`` (the same function
    computed by ordinary torch ops). ``inputs`` are tensors or None; without gradients to track
    this is a plain call of ``forward``."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not tracked:
        return forward(*inputs)
    return _ReferenceBackward.apply(forward, reference, *inputs)


class _ReferenceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, forward: Callable, reference: Callable, *inputs: Any) -> torch.Tensor:
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        return forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(need)
                for t, need in zip(inputs, needs, strict=True)
            ]
            out = ctx.reference(*leaves)
            wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        return (None, None, *(next(grads) if need else None for need in needs))
