"""``cuda_compiled``: run a small elementwise function through ``torch.compile`` on CUDA.

A decode step launches every op of every layer; fusing the elementwise chains (RMSNorm with its
residual add, RoPE, SiLU-and-mul) into one Triton kernel each cuts a layer's launches several
times over, as nano-vllm does. CPU tensors take the eager function (the reference numerics and
no compile time in tests).

The compiled kernels round to the activation dtype after every op as eager PyTorch (and so HF
transformers) does (inductor's ``emulate_precision_casts``), instead of keeping fp32 across a
fused chain. Compiled with ``dynamic=True`` so that one compilation serves every token count;
sizes 0 and 1 are still specialised, so each CUDA-graph batch size must run once before its
capture (the runner's warm-up does) and nothing compiles inside a capture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["cuda_compiled"]

F = TypeVar("F", bound=Callable[..., Any])


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch._inductor.config as inductor_config

    options = {}
    if hasattr(inductor_config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return torch.compile(fn, dynamic=True, options=options)


def cuda_compiled(fn: F) -> F:
    """``fn`` eager for CPU inputs, compiled for CUDA inputs (the first argument decides),
    compiled on first CUDA use."""
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args: Any) -> Any:
        if not x.is_cuda:
            return fn(x, *args)
        if not compiled:
            compiled.append(_compile(fn))
        return compiled[0](x, *args)

    return dispatch  # type: ignore[return-value]
