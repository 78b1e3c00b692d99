"""Transcendental elementwise functions whose result for an element depends on its value only.

Why: torch's CPU kernels compute the bulk of a tensor with SIMD code and the remainder with
scalar code, and for some functions (``sigmoid``, ``silu`` in torch 2.13) the two disagree in the
last bit. Which elements fall into the remainder depends on the tensor's size and the number of
threads, so the same value can round differently in a decode step and in a training batch.

How: the portable implementations here use only operations IEEE 754 rounds exactly (``+``,
``-``, ``*``, ``/``, ``sqrt``, ``floor``, comparisons, integer bit operations), each one torch
op, so no SIMD path, thread split or fused multiply-add can change a bit. ``exp`` reduces the
argument by ``ln 2`` and evaluates a degree-13 Taylor polynomial in float64; ``log`` splits off
the binary exponent and sums the ``atanh`` series in float64; ``cos`` / ``sin`` reduce by
``pi / 2`` (three-part Cody-Waite constants) and evaluate Taylor polynomials in float64. The
float64 result is rounded once to the input's dtype, so float32 results are within one unit in
the last place of the true value (and almost always correctly rounded).

CUDA tensors take torch's own op instead: a CUDA elementwise kernel evaluates the same function
for every element, whatever the tensor's size.

Inputs: float16, bfloat16, float32 or float64; the result has the input's dtype. NaN stays NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from routing_kernels.batch_invariant.autograd import with_reference_backward

__all__ = ["cos", "exp", "exp64", "log", "log64", "sigmoid", "silu", "sin"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# exp64 is evaluated on [-708, 709]: below, the result is 0 in every float format we return
# (and 2**n stays a normal float64); above, it is inf.
_EXP_LOW, _EXP_HIGH = -708.0, 709.0
_EXP_TERMS = [1.0 / math.factorial(k) for k in range(14)]  # degree 13: < 2e-18 on |r| <= ln2/2
# log: m in [sqrt(1/2), sqrt(2)) -> s = (m - 1) / (m + 1), |s| < 0.172; 2 * sum s^(2j+1)/(2j+1).
_LOG_TERMS = 12
_SQRT_HALF = 0.7071067811865476
# pi / 2 in three parts: the first two have 27 significant bits, so k * part is exact for the
# |k| < 2**26 quadrants of any angle RoPE produces (|x| < 1e7).
_PIO2_1 = 1.570796325802803
_PIO2_2 = 9.920935739593517e-10
_PIO2_3 = 5.721188726109832e-18
_TWO_OVER_PI = 0.6366197723675814
_SIN_TERMS = [(-1.0) ** j / math.factorial(2 * j + 1) for j in range(12)]  # |r| <= pi/4
_COS_TERMS = [(-1.0) ** j / math.factorial(2 * j) for j in range(12)]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}"
        )


def _horner(r: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """``sum_i coefficients[i] * r**i`` by Horner's rule (one mul and one add per degree)."""
    p = torch.full_like(r, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        p = p * r + c
    return p


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """``2.0 ** n`` as float64 for integral float64 ``n`` in [-1022, 1023], by its bit pattern."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def exp64(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of a float64 tensor in float64, from exactly rounded operations only."""
    xc = x.clamp(_EXP_LOW, _EXP_HIGH)
    n = torch.floor(xc * _LOG2E + 0.5)
    r = xc - n * _LN2
    y = _horner(r, _EXP_TERMS) * _pow2(n)
    y = torch.where(x > _EXP_HIGH, math.inf, y)
    y = torch.where(x < _EXP_LOW, 0.0, y)
    return torch.where(torch.isnan(x), x, y)


def log64(x: torch.Tensor) -> torch.Tensor:
    """Natural ``log`` of a float64 tensor in float64 (-inf at 0, NaN below), exact ops only."""
    m, e = torch.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = torch.where(small, m * 2.0, m)
    e = (e - small.to(e.dtype)).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)
    series = _horner(s * s, [1.0 / (2 * j + 1) for j in range(_LOG_TERMS)])
    y = e * _LN2 + 2.0 * s * series
    y = torch.where(x == 0, -math.inf, y)
    y = torch.where(x == math.inf, math.inf, y)
    return torch.where((x < 0) | torch.isnan(x), math.nan, y)


def _sin_cos64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of a float64 tensor, |x| < 1e7, by quadrant reduction and Taylor series."""
    k = torch.floor(x * _TWO_OVER_PI + 0.5)
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    r2 = r * r
    sin_r = r * _horner(r2, _SIN_TERMS)
    cos_r = _horner(r2, _COS_TERMS)
    quadrant = k.to(torch.int64) & 3
    sin_x = torch.where(quadrant == 0, sin_r, torch.where(quadrant == 1, cos_r, -sin_r))
    sin_x = torch.where(quadrant == 3, -cos_r, sin_x)
    cos_x = torch.where(quadrant == 0, cos_r, torch.where(quadrant == 1, -sin_r, -cos_r))
    cos_x = torch.where(quadrant == 3, sin_r, cos_x)
    return sin_x, cos_x


def _portable(
    name: str, x: torch.Tensor, of_float64: Callable[[torch.Tensor], torch.Tensor], native: Callable
) -> torch.Tensor:
    """``native(x)`` on CUDA; elsewhere ``of_float64`` of ``x`` in float64, rounded once to
    ``x``'s dtype, differentiable through ``native``."""
    _check(name, x)
    if x.is_cuda:
        return native(x)
    return with_reference_backward(lambda t: of_float64(t.double()).to(t.dtype), native, x)


def exp(x: torch.Tensor) -> torch.Tensor:
    """``e ** x`` elementwise, in ``x``'s dtype (see the module docstring)."""
    return _portable("x", x, exp64, torch.exp)


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural logarithm elementwise, in ``x``'s dtype (-inf at 0, NaN for negative values)."""
    return _portable("x", x, log64, torch.log)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + e ** -x)`` elementwise, in ``x``'s dtype."""
    return _portable("x", x, lambda xd: 1.0 / (1.0 + exp64(-xd)), torch.sigmoid)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` elementwise, in ``x``'s dtype."""
    return _portable("x", x, lambda xd: xd / (1.0 + exp64(-xd)), torch.nn.functional.silu)


def cos(x: torch.Tensor) -> torch.Tensor:
    """Cosine elementwise for |x| < 1e7 (RoPE angles), in ``x``'s dtype."""
    return _portable("x", x, lambda xd: _sin_cos64(xd)[1], torch.cos)


def sin(x: torch.Tensor) -> torch.Tensor:
    """Sine elementwise for |x| < 1e7 (RoPE angles), in ``x``'s dtype."""
    return _portable("x", x, lambda xd: _sin_cos64(xd)[0], torch.sin)
