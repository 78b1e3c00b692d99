"""Batch-invariant token log-probabilities: ``log_softmax(logits)[token]`` row by row.

Legend: R rows (positions), V vocabulary.

The rollout engine's sampler and the trainer take a token's log-probability from the same
float32 logits row with this one function, so equal rows give equal bits:
``logits[token] - (m + log(sum(exp(logits - m))))`` with ``m`` the row's maximum, the sum in
the fixed order of ``rows.tree_sum`` and the portable ``exp`` / ``log``
(``token_logprobs_reference``; any device, the CPU path). ``token_logprobs_triton`` (CUDA):
one program per row, an online maximum and sum over ``BLOCK_V``-wide chunks in increasing
order (the chunk width fixed, not chosen by the number of rows). The gradient is torch's
(``gather - logsumexp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import logsumexp

__all__ = ["token_logprobs", "token_logprobs_reference", "token_logprobs_triton"]

_BLOCK_V = 4096


def _check(logits_RV: torch.Tensor, ids_R: torch.Tensor) -> None:
    for name, t in (("logits", logits_RV), ("ids", ids_R)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not logits_RV.dtype.is_floating_point or logits_RV.dim() < 1:
        raise ValueError(
            f"logits: expected a floating-point tensor [..., V], got {logits_RV.dtype} "
            f"{tuple(logits_RV.shape)}"
        )
    if tuple(ids_R.shape) != tuple(logits_RV.shape[:-1]) or ids_R.dtype != torch.int64:
        raise ValueError(
            f"ids: expected int64 of shape {tuple(logits_RV.shape[:-1])} (logits' leading "
            f"dims), got {ids_R.dtype} {tuple(ids_R.shape)}"
        )
    if ids_R.device != logits_RV.device:
        raise ValueError(f"ids: expected device {logits_RV.device} (logits'), got {ids_R.device}")


def token_logprobs_reference(logits_RV: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
    """Float32 ``log_softmax(logits)[..., ids]`` [...] by the fixed-order reduction."""
    _check(logits_RV, ids_R)
    x_RV = logits_RV.float()
    return x_RV.gather(-1, ids_R[..., None])[..., 0] - logsumexp(x_RV)


@triton.jit
def _token_logprobs_kernel(logits_ptr, ids_ptr, out_ptr, V, stride_row, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols_V = v0 + tl.arange(0, BLOCK_V)
        x_V = tl.load(base + cols_V, mask=cols_V < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x_V, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x_V - m_new), axis=0)
        m = m_new
    picked = tl.load(base + tl.load(ids_ptr + row)).to(tl.float32)
    tl.store(out_ptr + row, picked - (m + tl.log(total)))


def token_logprobs_triton(logits_RV: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
    """``token_logprobs`` as one Triton program per row (CUDA, or CPU under
    ``TRITON_INTERPRET=1``)."""
    _check(logits_RV, ids_R)
    vocab = logits_RV.shape[-1]
    x_RV = logits_RV.reshape(-1, vocab)
    if x_RV.stride(-1) != 1:
        x_RV = x_RV.contiguous()
    ids = ids_R.reshape(-1).contiguous()
    out_R = torch.empty(ids.shape, dtype=torch.float32, device=logits_RV.device)
    if ids.numel():
        _token_logprobs_kernel[(ids.numel(),)](
            x_RV, ids, out_R, vocab, x_RV.stride(0), BLOCK_V=_BLOCK_V, num_warps=8
        )
    return out_R.reshape(ids_R.shape)


def _torch_token_logprobs(logits_RV: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
    x_RV = logits_RV.float()
    return x_RV.gather(-1, ids_R[..., None])[..., 0] - torch.logsumexp(x_RV, dim=-1)


def token_logprobs(logits_RV: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
    """Float32 log-probability of ``ids_R`` under ``softmax(logits_RV)`` [...], batch-invariant
    (module docstring); differentiable with respect to the logits.

    Args:
        logits_RV: [..., V] floating point.
        ids_R: int64 [...] (the logits' leading dims), values in [0, V).

    Raises:
        TypeError, ValueError: a non-tensor, a bad dtype, shape or device, naming it.
    """
    _check(logits_RV, ids_R)
    forward = token_logprobs_triton if logits_RV.is_cuda else token_logprobs_reference
    return with_reference_backward(forward, _torch_token_logprobs, logits_RV, ids_R)
