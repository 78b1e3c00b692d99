"""Batch-invariant operations: the numerics of ``rollout.LLM(deterministic=True)`` and of the
policy ``rollout.load_policy`` returns, so that the two compute the same bits by construction.

An operation is batch-invariant when the bits of one row's result (a token's) depend on that
row's inputs only: not on how many rows share the call, where the row sits, how a prefill was
chunked, or whether attention reads keys from a KV cache or from the same forward. Each op
here has a portable implementation built from exactly rounded torch operations and fixed-shape
reduction trees (any device; the CPU path and the reference of the CUDA kernels) and is
differentiable, with torch's ordinary formula as the backward (only the forward has to match
the engine bit for bit).

- ``elementwise``: exp, log, sigmoid, silu, cos, sin.
- ``rows``: ``tree_sum``, ``softmax``, ``logsumexp`` along the last axis.
- ``matmul``: ``linear``; ``norm``: ``rms_norm``; ``log_softmax``: ``token_logprobs``.
- ``causal_attention``: ``attention`` of one sequence, keys aligned to position 0, and
  ``paged_attention`` of a whole step over paged keys and values.
- ``moe``: ``experts``, the routed experts of an MoE layer, combined in slot order.
"""

from routing_kernels.batch_invariant.causal_attention import attention, paged_attention
from routing_kernels.batch_invariant.elementwise import cos, exp, log, sigmoid, silu, sin
from routing_kernels.batch_invariant.moe import experts
from routing_kernels.batch_invariant.log_softmax import token_logprobs
from routing_kernels.batch_invariant.matmul import linear
from routing_kernels.batch_invariant.norm import rms_norm
from routing_kernels.batch_invariant.rows import logsumexp, softmax, tree_sum

__all__ = [
    "attention",
    "cos",
    "exp",
    "experts",
    "linear",
    "log",
    "logsumexp",
    "paged_attention",
    "rms_norm",
    "sigmoid",
    "silu",
    "sin",
    "softmax",
    "token_logprobs",
    "tree_sum",
]
