"""Batch-invariant token log-probabilities: ``log_softmax(logits)[token]`` row by row.

Legend: R rows (positions), V vocabulary.

The rollout engine's sampler and the trainer take a token's log-probability from the same
float32 logits row with this one function, so equal rows give equal bits:
``logits[token] - (m + log(sum(exp(logits - m))))`` with ``m`` the row's maximum, the sum in
the fixed order of ``rows.tree_sum`` and the portable ``exp`` / ``log``
(``token_logprobs_reference``; any device, the CPU path). The gradient is torch's
(``gather - logsumexp``).
"""

from __future__ import annotations

import torch

from routing_kernels.batch_invariant.autograd import with_reference_backward
from routing_kernels.batch_invariant.rows import logsumexp

__all__ = ["token_logprobs", "token_logprobs_reference"]


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
    return with_reference_backward(
        token_logprobs_reference, _torch_token_logprobs, logits_RV, ids_R
    )
