"""Replay gate weights: the router's weights at replayed expert ids, recomputed from current logits.

Legend: T tokens (rows), E experts, K replayed ids per row (top-k); ``_TE`` / ``_TK`` suffixes.

Under Rollout Routing Replay the trainer does not select experts: the ids come from the rollout
trace. The gate weights must still come from the trainer's *current* router logits, with the
model's own routing method, so that the router keeps its gradient (DESIGN.md, "Replay gate
weights"). The correction bias of DEEPSEEK_V3 only biases selection, never weights, so it has
no place here.

``replay_weights`` dispatches CUDA tensors to ``replay_weights_triton`` (a Triton forward and a
Triton backward kernel under one ``torch.autograd.Function``) and CPU tensors to
``replay_weights_reference`` (plain torch, differentiated by autograd). Both compute in float32
whatever the logits' dtype, except float64 logits, which are computed and returned in float64
so that ``torch.autograd.gradcheck`` can check the math. The gradient has the logits' dtype.

``replay_topk`` is what a replaying MoE layer hands its experts: on the rows a trace replays,
the trace's ids with ``replay_weights`` at them; on the other rows (no trace row, invalid rows)
the router's native ids and weights, untouched. On CUDA the merge is fused into the same two
kernels (one launch forward, one backward), instead of a ``torch.where`` per output and a cast.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from routing_kernels import batch_invariant
from routing_kernels.routing_method import RoutingMethod

__all__ = [
    "replay_topk",
    "replay_topk_reference",
    "replay_topk_triton",
    "replay_weights",
    "replay_weights_reference",
    "replay_weights_triton",
]

# HF DeepSeek-V3 / GLM4-MoE `route_tokens_to_experts` add this to the normalizing denominator.
_DEEPSEEK_DENOM_EPS = 1e-20
_DEEPSEEK_DENOM_EPS_K = tl.constexpr(_DEEPSEEK_DENOM_EPS)  # the same, readable inside kernels
_LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Kernel-side method codes; RENORMALIZE and RENORMALIZE_NAIVE share the softmax over the k.
_FULL_SOFTMAX = tl.constexpr(0)
_SOFTMAX_K = tl.constexpr(1)
_SIGMOID_NORM = tl.constexpr(2)
_SIGMOID = tl.constexpr(3)
_KERNEL_METHOD = {
    RoutingMethod.DEFAULT: _FULL_SOFTMAX.value,
    RoutingMethod.RENORMALIZE: _SOFTMAX_K.value,
    RoutingMethod.RENORMALIZE_NAIVE: _SOFTMAX_K.value,
    RoutingMethod.DEEPSEEK_V3: _SIGMOID_NORM.value,
    RoutingMethod.LLAMA4: _SIGMOID.value,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def replay_weights(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
    check_ids: bool = True,
) -> torch.Tensor:
    """Gate weights at the replayed ``ids_TK`` recomputed from ``logits_TE``, differentiable.

    Args:
        logits_TE: router logits [T, E], float16 / bfloat16 / float32 / float64.
        ids_TK: replayed expert ids [T, K], any integer dtype (traces store uint8 / int16),
            values in [0, E), distinct within a row.
        method: the model's ``RoutingMethod`` (or its lower-case name):
            DEFAULT: softmax over all E, gathered at the ids;
            RENORMALIZE, RENORMALIZE_NAIVE: softmax over the K gathered logits;
            DEEPSEEK_V3: sigmoid at the ids, divided by (their sum + 1e-20) as in HF,
            times ``routed_scaling_factor``;
            LLAMA4: sigmoid at the id (K must be 1).
        routed_scaling_factor: finite and > 0; must be 1.0 for methods other than DEEPSEEK_V3.
        check_ids: verify that the ids are in range and distinct within each row. On CUDA this
            costs one host synchronization per call; callers whose ids were already validated
            (a ``RoutedExperts`` trace validates at construction) pass False so that a training
            forward never waits on the host. Unchecked out-of-range ids never read out of
            bounds; their weights are unspecified.

    Returns:
        weights [T, K], float32 (float64 for float64 logits). Its gradient flows to
        ``logits_TE`` only, in the logits' dtype.

    Raises:
        TypeError: a non-tensor input or a non-numeric scaling factor.
        ValueError: bad shape, dtype, device, id range, duplicate ids, K != 1 for LLAMA4, or
            scaling factor; the message names the field, the expected and the actual value.

    CUDA tensors run the Triton kernels (``replay_weights_triton``), CPU tensors the plain-torch
    reference. Non-finite logits are not checked (that would cost a full read of the logits)
    and propagate to the weights as they would through the torch ops.
    """
    if isinstance(logits_TE, torch.Tensor) and logits_TE.is_cuda:
        return replay_weights_triton(
            logits_TE,
            ids_TK,
            method,
            routed_scaling_factor=routed_scaling_factor,
            check_ids=check_ids,
        )
    return replay_weights_reference(
        logits_TE,
        ids_TK,
        method,
        routed_scaling_factor=routed_scaling_factor,
        check_ids=check_ids,
    )


def replay_weights_reference(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
    check_ids: bool = True,
) -> torch.Tensor:
    """Plain-torch ``replay_weights`` (the CPU path and the oracle); autograd gives the gradient.

    Batch-invariant: softmax, sigmoid and sums are ``routing_kernels.batch_invariant``'s, so a
    row's weights depend on that row alone (the rollout engine's deterministic mode computes
    its gate weights with this very function).

    Same arguments, semantics and errors as ``replay_weights``; runs on any device.
    """
    method = _check_inputs(logits_TE, ids_TK, method, routed_scaling_factor)
    problem = _ids_problem(ids_TK, logits_TE.shape[1]) if check_ids else None
    if problem is not None:
        raise ValueError(problem)
    return _weights_reference(logits_TE, ids_TK, method, routed_scaling_factor)


def replay_weights_triton(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
    check_ids: bool = True,
) -> torch.Tensor:
    """``replay_weights`` through the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    The forward kernel also checks the ids (range and duplicates) and raises a flag; the host
    reads that flag once (one synchronization, skipped when ``check_ids`` is False) and, only
    if it is set, diagnoses the ids with
    torch to raise the detailed ValueError. The backward kernel writes whole dL/dlogits rows:
    zeros outside the ids for the gathered methods, the dense softmax Jacobian row for DEFAULT.
    """
    method = _check_inputs(logits_TE, ids_TK, method, routed_scaling_factor)
    return _ReplayWeights.apply(logits_TE, ids_TK, method, float(routed_scaling_factor), check_ids)


def replay_topk(
    logits_TE: torch.Tensor,
    native_weights_TK: torch.Tensor,
    native_ids_TK: torch.Tensor,
    trace_ids_TK: torch.Tensor,
    replay_T: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weights, ids) a replaying MoE layer hands its experts, differentiable.

    Where ``replay_T`` is True: ``trace_ids_TK`` and ``replay_weights`` of ``logits_TE`` at
    them, cast to ``native_weights_TK``'s dtype. Elsewhere: ``native_ids_TK`` and
    ``native_weights_TK`` unchanged (bit for bit, gradient passed through).

    Args:
        logits_TE: the router's logits [T, E] (dtypes as for ``replay_weights``).
        native_weights_TK: the router's own weights [T, K], floating point.
        native_ids_TK: the router's own ids [T, K], integer; the returned ids have its dtype.
        trace_ids_TK: replayed ids [T, K], any integer dtype, read only where ``replay_T``.
            They are not checked (no host synchronization): pass ids validated upstream (a
            ``RoutedExperts`` validates at construction). Out-of-range ids are never read.
        replay_T: bool [T], which rows replay.
        method, routed_scaling_factor: as for ``replay_weights``.

    Returns:
        weights [T, K] in ``native_weights_TK``'s dtype, differentiable with respect to
        ``logits_TE`` (replayed rows) and ``native_weights_TK`` (the other rows); ids [T, K].

    Raises:
        TypeError, ValueError: as ``replay_weights``, and for shapes, dtypes or devices of the
        native outputs, trace ids or mask that do not match the logits.

    CUDA tensors run the fused Triton kernels (``replay_topk_triton``), CPU tensors the
    plain-torch reference.
    """
    if isinstance(logits_TE, torch.Tensor) and logits_TE.is_cuda:
        return replay_topk_triton(
            logits_TE, native_weights_TK, native_ids_TK, trace_ids_TK, replay_T, method,
            routed_scaling_factor=routed_scaling_factor,
        )  # fmt: skip
    return replay_topk_reference(
        logits_TE, native_weights_TK, native_ids_TK, trace_ids_TK, replay_T, method,
        routed_scaling_factor=routed_scaling_factor,
    )  # fmt: skip


def replay_topk_reference(
    logits_TE: torch.Tensor,
    native_weights_TK: torch.Tensor,
    native_ids_TK: torch.Tensor,
    trace_ids_TK: torch.Tensor,
    replay_T: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``replay_topk`` (the CPU path and the oracle): two ``torch.where``.

    Same arguments, semantics and errors as ``replay_topk``; runs on any device.
    """
    method = _check_topk_inputs(
        logits_TE, native_weights_TK, native_ids_TK, trace_ids_TK, replay_T, method,
        routed_scaling_factor,
    )  # fmt: skip
    replay_T1 = replay_T[:, None]
    ids_TK = torch.where(replay_T1, trace_ids_TK, native_ids_TK).to(native_ids_TK.dtype)
    replayed_TK = _weights_reference(logits_TE, ids_TK, method, routed_scaling_factor)
    weights_TK = torch.where(replay_T1, replayed_TK.to(native_weights_TK.dtype), native_weights_TK)
    return weights_TK, ids_TK


def _weights_reference(
    logits_TE: torch.Tensor, ids_TK: torch.Tensor, method: RoutingMethod, scale: float
) -> torch.Tensor:
    """The reference math on checked inputs (out-of-range ids would raise in ``gather``)."""
    x_TE = logits_TE.to(_compute_dtype(logits_TE))
    index_TK = ids_TK.long()
    if method is RoutingMethod.DEFAULT:
        return batch_invariant.softmax(x_TE).gather(1, index_TK)
    x_TK = x_TE.gather(1, index_TK)
    if method in (RoutingMethod.RENORMALIZE, RoutingMethod.RENORMALIZE_NAIVE):
        # Softmax over all E then renormalizing over the k equals the softmax over the k.
        return batch_invariant.softmax(x_TK)
    s_TK = batch_invariant.sigmoid(x_TK)
    if method is RoutingMethod.DEEPSEEK_V3:
        denom_T1 = batch_invariant.tree_sum(s_TK)[:, None] + _DEEPSEEK_DENOM_EPS
        return s_TK / denom_T1 * scale
    return s_TK


def replay_topk_triton(
    logits_TE: torch.Tensor,
    native_weights_TK: torch.Tensor,
    native_ids_TK: torch.Tensor,
    trace_ids_TK: torch.Tensor,
    replay_T: torch.Tensor,
    method: RoutingMethod | str,
    *,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``replay_topk`` through the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``):
    one forward launch writes both outputs, one backward launch writes dL/dlogits (zero rows
    where not replayed) and dL/dnative_weights (zero rows where replayed)."""
    method = _check_topk_inputs(
        logits_TE, native_weights_TK, native_ids_TK, trace_ids_TK, replay_T, method,
        routed_scaling_factor,
    )  # fmt: skip
    return _ReplayTopK.apply(
        logits_TE, native_weights_TK, native_ids_TK, trace_ids_TK, replay_T, method,
        float(routed_scaling_factor),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_inputs(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod | str,
    routed_scaling_factor: float,
) -> RoutingMethod:
    """Host-side checks (no device synchronization); returns the parsed method."""
    if not isinstance(logits_TE, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits_TE).__name__}")
    if not isinstance(ids_TK, torch.Tensor):
        raise TypeError(f"ids: expected a torch.Tensor, got {type(ids_TK).__name__}")
    method = RoutingMethod.parse(method)
    if logits_TE.dtype not in _LOGITS_DTYPES:
        raise ValueError(
            f"logits: expected dtype float16, bfloat16, float32 or float64, got {logits_TE.dtype}"
        )
    if logits_TE.dim() != 2 or logits_TE.shape[1] == 0:
        raise ValueError(
            f"logits: expected a 2-D tensor [T, E] with E >= 1, got shape {tuple(logits_TE.shape)}"
        )
    if ids_TK.dtype.is_floating_point or ids_TK.dtype.is_complex or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids: expected an integer dtype, got {ids_TK.dtype}")
    if ids_TK.dim() != 2 or ids_TK.shape[1] == 0:
        raise ValueError(
            f"ids: expected a 2-D tensor [T, K] with K >= 1, got shape {tuple(ids_TK.shape)}"
        )
    num_tokens, num_experts = logits_TE.shape
    top_k = ids_TK.shape[1]
    if ids_TK.shape[0] != num_tokens:
        raise ValueError(
            f"ids: expected {num_tokens} rows (logits.shape[0]), got {ids_TK.shape[0]}"
        )
    if ids_TK.device != logits_TE.device:
        raise ValueError(f"ids: expected device {logits_TE.device} (logits'), got {ids_TK.device}")
    if top_k > num_experts:
        raise ValueError(
            f"ids: expected K <= E = {num_experts} distinct ids per row, got K = {top_k}"
        )
    if method is RoutingMethod.LLAMA4 and top_k != 1:
        raise ValueError(f"ids: expected K == 1 for LLAMA4, got K = {top_k}")
    scale = routed_scaling_factor
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"routed_scaling_factor: expected a finite value > 0, got {scale}")
    if method is not RoutingMethod.DEEPSEEK_V3 and scale != 1.0:
        # Only DEEPSEEK_V3 scales its weights; accepting a factor that is then ignored would
        # hide a configuration mistake.
        raise ValueError(
            f"routed_scaling_factor: expected 1.0 for {method.name} (only DEEPSEEK_V3 uses it), "
            f"got {scale}"
        )
    return method


def _check_topk_inputs(
    logits_TE: torch.Tensor,
    native_weights_TK: torch.Tensor,
    native_ids_TK: torch.Tensor,
    trace_ids_TK: torch.Tensor,
    replay_T: torch.Tensor,
    method: RoutingMethod | str,
    routed_scaling_factor: float,
) -> RoutingMethod:
    """Host-side checks of ``replay_topk`` (no device synchronization); the parsed method."""
    method = _check_inputs(logits_TE, trace_ids_TK, method, routed_scaling_factor)
    expected = tuple(trace_ids_TK.shape)
    for name, tensor in (
        ("native_weights", native_weights_TK),
        ("native_ids", native_ids_TK),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{name}: expected shape {expected} (the trace ids'), got {tuple(tensor.shape)}"
            )
        if tensor.device != logits_TE.device:
            raise ValueError(
                f"{name}: expected device {logits_TE.device} (logits'), got {tensor.device}"
            )
    if not native_weights_TK.dtype.is_floating_point:
        raise ValueError(
            f"native_weights: expected a floating-point dtype, got {native_weights_TK.dtype}"
        )
    if native_ids_TK.dtype.is_floating_point or native_ids_TK.dtype == torch.bool:
        raise ValueError(f"native_ids: expected an integer dtype, got {native_ids_TK.dtype}")
    if not isinstance(replay_T, torch.Tensor):
        raise TypeError(f"replay: expected a torch.Tensor, got {type(replay_T).__name__}")
    if replay_T.dtype != torch.bool or tuple(replay_T.shape) != expected[:1]:
        raise ValueError(
            f"replay: expected a bool tensor of shape {expected[:1]}, got {replay_T.dtype} "
            f"{tuple(replay_T.shape)}"
        )
    if replay_T.device != logits_TE.device:
        raise ValueError(
            f"replay: expected device {logits_TE.device} (logits'), got {replay_T.device}"
        )
    return method


def _ids_problem(ids_TK: torch.Tensor, num_experts: int) -> str | None:
    """The first problem with the ids' values as an error message, or None (one sync)."""
    if ids_TK.shape[0] == 0:
        return None
    sorted_TK = ids_TK.long().sort(dim=1).values
    out_of_range_T = (sorted_TK[:, 0] < 0) | (sorted_TK[:, -1] >= num_experts)
    duplicate_T = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(dim=1)
    if not bool((out_of_range_T | duplicate_T).any()):
        return None
    # Error path only: more synchronizations are fine here.
    if bool(out_of_range_T.any()):
        lo, hi = int(sorted_TK[:, 0].min()), int(sorted_TK[:, -1].max())
        return f"ids: expected values in [0, {num_experts}), got min {lo} max {hi}"
    row = int(duplicate_T.nonzero()[0, 0])
    return (
        f"ids: expected distinct ids within a row, got row {row} = {ids_TK[row].tolist()} "
        f"({int(duplicate_T.sum())} rows with duplicates)"
    )


def _compute_dtype(logits_TE: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits_TE.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Autograd functions and launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Merge:
    """``replay_topk``'s extra inputs: which rows replay, and the router's own outputs."""

    replay_T: torch.Tensor
    native_ids_TK: torch.Tensor
    native_weights_TK: torch.Tensor


class _ReplayWeights(torch.autograd.Function):
    """Triton forward/backward; saves logits, ids and (DEFAULT only) the row log-sum-exp."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits_TE: torch.Tensor,
        ids_TK: torch.Tensor,
        method: RoutingMethod,
        scale: float,
        check_ids: bool,
    ) -> torch.Tensor:
        weights_TK, _, lse_T = _launch_forward(logits_TE, ids_TK, method, scale, check_ids, None)
        ctx.save_for_backward(logits_TE, ids_TK, lse_T)
        ctx.method, ctx.scale = method, scale
        return weights_TK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_weights_TK: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        logits_TE, ids_TK, lse_T = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_logits_TE, _ = _launch_backward(
            logits_TE, ids_TK, lse_T, grad_weights_TK, ctx.method, ctx.scale, None
        )
        return grad_logits_TE, None, None, None, None


class _ReplayTopK(torch.autograd.Function):
    """Fused ``replay_topk``: saves logits, merged ids, the replay mask and (DEFAULT) the lse."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits_TE: torch.Tensor,
        native_weights_TK: torch.Tensor,
        native_ids_TK: torch.Tensor,
        trace_ids_TK: torch.Tensor,
        replay_T: torch.Tensor,
        method: RoutingMethod,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        merge = _Merge(replay_T, native_ids_TK, native_weights_TK)
        weights_TK, ids_TK, lse_T = _launch_forward(
            logits_TE, trace_ids_TK, method, scale, False, merge
        )
        assert ids_TK is not None, "the merged launch writes ids"
        ctx.save_for_backward(logits_TE, ids_TK, lse_T, replay_T)
        ctx.method, ctx.scale = method, scale
        ctx.native_dtype = native_weights_TK.dtype
        ctx.mark_non_differentiable(ids_TK)
        # The ids get no gradient; without this autograd would fill a zero tensor for them.
        ctx.set_materialize_grads(False)
        return weights_TK, ids_TK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_weights_TK: torch.Tensor,
        _grad_ids_TK: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        logits_TE, ids_TK, lse_T, replay_T = ctx.saved_tensors
        if grad_weights_TK is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None, None
        grad_logits_TE, grad_native_TK = _launch_backward(
            logits_TE, ids_TK, lse_T, grad_weights_TK, ctx.method, ctx.scale,
            (replay_T, ctx.native_dtype),
        )  # fmt: skip
        return (
            grad_logits_TE if ctx.needs_input_grad[0] else None,
            grad_native_TK if ctx.needs_input_grad[1] else None,
            None, None, None, None, None,
        )  # fmt: skip


def _block_rows(per_row: int, budget: int, cap: int) -> int:
    """Rows per program: ``budget`` live elements per program, at most ``cap``. Not chosen by
    the number of rows: the tile's shape decides how a row's reductions (its softmax over E or
    K) are ordered, so a row's weights are the same bits in a decode step of one token and in
    a training batch (batch invariance, which ``rollout.LLM(deterministic=True)`` relies on)."""
    return max(2, min(cap, budget // per_row))


def _launch_forward(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    method: RoutingMethod,
    scale: float,
    check_ids: bool,
    merge: _Merge | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weights, merged ids or None, lse). Without ``merge``: float32 (float64) weights at
    ``ids_TK``; with it: ``replay_topk``'s weights (the native dtype) and ids."""
    num_tokens, num_experts = logits_TE.shape
    top_k = ids_TK.shape[1]
    device = logits_TE.device
    cdtype = _compute_dtype(logits_TE)
    lse_rows = num_tokens if method is RoutingMethod.DEFAULT else 0
    lse_T = torch.empty((lse_rows,), dtype=cdtype, device=device)
    if merge is None:
        weights_TK = torch.empty((num_tokens, top_k), dtype=cdtype, device=device)
        ids_out_TK = None
    else:
        contiguous = torch.contiguous_format
        weights_TK = torch.empty_like(merge.native_weights_TK, memory_format=contiguous)
        ids_out_TK = torch.empty_like(merge.native_ids_TK, memory_format=contiguous)
    if num_tokens == 0:
        return weights_TK, ids_out_TK, lse_T
    # Pointers a launch never touches still get real (non-null) tensors: the lse outside
    # DEFAULT, the id check's flag when unchecked (the check is compiled out), the merge inputs
    # without merge.
    lse_arg = lse_T if method is RoutingMethod.DEFAULT else weights_TK
    bad_flag = torch.zeros((1,), dtype=torch.int32, device=device) if check_ids else weights_TK
    native_ids_TK = ids_TK if merge is None else merge.native_ids_TK
    native_w_TK = weights_TK if merge is None else merge.native_weights_TK
    replay_T = ids_TK if merge is None else merge.replay_T.view(torch.uint8)
    ids_out_arg = ids_TK if ids_out_TK is None else ids_out_TK
    block_k = max(2, triton.next_power_of_2(top_k))
    block_e = min(max(2, triton.next_power_of_2(num_experts)), 512)
    # The duplicate check holds a [rows, K, K] tile; DEFAULT also a [rows, E-chunk] tile.
    per_row = max(block_k * block_k, block_e if method is RoutingMethod.DEFAULT else 0)
    block_t = _block_rows(per_row, budget=4096, cap=128)
    _replay_weights_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, ids_TK, weights_TK, lse_arg, bad_flag,
        replay_T, native_ids_TK, native_w_TK, ids_out_arg,
        num_tokens, num_experts, top_k,
        logits_TE.stride(0), logits_TE.stride(1), ids_TK.stride(0), ids_TK.stride(1),
        native_ids_TK.stride(0), native_ids_TK.stride(1),
        native_w_TK.stride(0), native_w_TK.stride(1),
        scale,
        METHOD=_KERNEL_METHOD[method], COMPUTE_F64=cdtype == torch.float64, CHECK=check_ids,
        MERGE=merge is not None, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e,
    )  # fmt: skip
    if check_ids and bool(bad_flag.item()):
        problem = _ids_problem(ids_TK, num_experts)
        assert problem is not None, "the kernel flagged ids that the torch check accepts"
        raise ValueError(problem)
    return weights_TK, ids_out_TK, lse_T


def _launch_backward(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    lse_T: torch.Tensor,
    grad_weights_TK: torch.Tensor,
    method: RoutingMethod,
    scale: float,
    merge: tuple[torch.Tensor, torch.dtype] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dL/dlogits, dL/dnative_weights or None); ``merge`` is (replay mask, native dtype)."""
    num_tokens, num_experts = logits_TE.shape
    top_k = ids_TK.shape[1]
    device = logits_TE.device
    grad_logits_TE = torch.empty((num_tokens, num_experts), dtype=logits_TE.dtype, device=device)
    grad_native_TK = (
        None if merge is None else torch.empty((num_tokens, top_k), dtype=merge[1], device=device)
    )
    if num_tokens == 0:
        return grad_logits_TE, grad_native_TK
    # Autograd hands back the output's dtype (the native one under replay_topk), possibly with
    # zero strides (e.g. after .sum()): the kernel reads it by strides and converts as it loads.
    cdtype = _compute_dtype(logits_TE)
    block_k = max(2, triton.next_power_of_2(top_k))
    block_e = min(max(2, triton.next_power_of_2(num_experts)), 512)
    block_t = _block_rows(max(block_e, block_k), budget=4096, cap=64)
    lse_arg = lse_T if method is RoutingMethod.DEFAULT else grad_logits_TE
    replay_T = ids_TK if merge is None else merge[0].view(torch.uint8)
    grad_native_arg = grad_weights_TK if grad_native_TK is None else grad_native_TK
    _replay_weights_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, ids_TK, grad_weights_TK, lse_arg, grad_logits_TE, replay_T, grad_native_arg,
        num_tokens, num_experts, top_k,
        logits_TE.stride(0), logits_TE.stride(1), ids_TK.stride(0), ids_TK.stride(1),
        grad_weights_TK.stride(0), grad_weights_TK.stride(1), grad_logits_TE.stride(0),
        scale,
        METHOD=_KERNEL_METHOD[method], COMPUTE_F64=cdtype == torch.float64,
        MERGE=merge is not None, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_E=block_e,
    )  # fmt: skip
    return grad_logits_TE, grad_native_TK


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softmax_over_k(x_TK):
    # Padded lanes hold -inf and get weight 0.
    m_T = tl.max(x_TK, axis=1)
    e_TK = tl.exp(x_TK - m_T[:, None])
    return e_TK / tl.sum(e_TK, axis=1)[:, None]


@triton.jit
def _row_lse(
    logits_ptr, safe_T, E, stride_lt, stride_le,
    cdtype: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """log(sum(exp(row))) of each row, streaming over E in chunks (online max)."""
    m_T = tl.full([BLOCK_T], float("-inf"), cdtype)
    l_T = tl.zeros([BLOCK_T], cdtype)
    for e0 in range(0, E, BLOCK_E):
        cols_E = e0 + tl.arange(0, BLOCK_E)
        x_TE = tl.load(
            logits_ptr + safe_T[:, None] * stride_lt + cols_E[None, :] * stride_le,
            mask=tl.broadcast_to(cols_E[None, :] < E, (BLOCK_T, BLOCK_E)),
            other=float("-inf"),
        ).to(cdtype)
        m_new_T = tl.maximum(m_T, tl.max(x_TE, axis=1))
        l_T = l_T * tl.exp(m_T - m_new_T) + tl.sum(tl.exp(x_TE - m_new_T[:, None]), axis=1)
        m_T = m_new_T
    return m_T + tl.log(l_T)


@triton.jit
def _replay_weights_fwd_kernel(
    logits_ptr, ids_ptr, weights_ptr, lse_ptr, bad_ptr,
    replay_ptr, native_ids_ptr, native_w_ptr, ids_out_ptr,
    T, E, K,
    stride_lt, stride_le, stride_it, stride_ik, stride_nit, stride_nik, stride_nwt, stride_nwk,
    scale,
    METHOD: tl.constexpr, COMPUTE_F64: tl.constexpr, CHECK: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    if COMPUTE_F64:
        cdtype = tl.float64
    else:
        cdtype = tl.float32
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok_T = rows_T < T
    # Rows past T re-read row T-1, so every loaded row is real data; their stores are masked.
    safe_T = tl.minimum(rows_T, T - 1).to(tl.int64)
    k_K = tl.arange(0, BLOCK_K)
    lane_ok_TK = tl.broadcast_to(k_K[None, :] < K, (BLOCK_T, BLOCK_K))
    store_ok_TK = row_ok_T[:, None] & (k_K[None, :] < K)
    out_TK = rows_T[:, None].to(tl.int64) * K + k_K[None, :]
    ids_TK = tl.load(
        ids_ptr + safe_T[:, None] * stride_it + k_K[None, :] * stride_ik,
        mask=lane_ok_TK,
        other=0,
    ).to(tl.int64)
    if MERGE:
        # replay_topk: trace ids on replayed rows, the router's own ids elsewhere.
        replay_T = tl.load(replay_ptr + safe_T) != 0
        native_TK = tl.load(
            native_ids_ptr + safe_T[:, None] * stride_nit + k_K[None, :] * stride_nik,
            mask=lane_ok_TK,
            other=0,
        ).to(tl.int64)
        ids_TK = tl.where(replay_T[:, None], ids_TK, native_TK)
        tl.store(
            ids_out_ptr + out_TK,
            ids_TK.to(ids_out_ptr.dtype.element_ty),
            mask=store_ok_TK,
        )

    in_range_TK = (ids_TK >= 0) & (ids_TK < E)
    idx_TK = tl.where(in_range_TK, ids_TK, 0).to(tl.int32)
    if CHECK:
        # Fused id check: out of [0, E) or repeated within the row. Bad ids are never
        # dereferenced. The duplicate test runs on int32: a wrapped out-of-range id can only
        # flag a row that the range test already flags.
        pair_KK = k_K[:, None] < k_K[None, :]
        dup_TKK = (
            (idx_TK[:, :, None] == idx_TK[:, None, :])
            & pair_KK[None, :, :]
            & lane_ok_TK[:, :, None]
            & lane_ok_TK[:, None, :]
        )
        bad_TK = (lane_ok_TK & ~in_range_TK) | (tl.max(dup_TKK.to(tl.int32), axis=2) > 0)
        num_bad = tl.sum(tl.sum(bad_TK.to(tl.int32), axis=1), axis=0)
        tl.store(bad_ptr, 1, mask=num_bad > 0)

    x_TK = tl.load(
        logits_ptr + safe_T[:, None] * stride_lt + idx_TK * stride_le,
        mask=lane_ok_TK & in_range_TK,
        other=float("-inf"),
    ).to(cdtype)
    if METHOD == _FULL_SOFTMAX:
        lse_T = _row_lse(logits_ptr, safe_T, E, stride_lt, stride_le, cdtype, BLOCK_T, BLOCK_E)
        tl.store(lse_ptr + rows_T, lse_T, mask=row_ok_T)
        w_TK = tl.exp(x_TK - lse_T[:, None])
    elif METHOD == _SOFTMAX_K:
        w_TK = _softmax_over_k(x_TK)
    elif METHOD == _SIGMOID_NORM:
        s_TK = _sigmoid(x_TK)
        w_TK = s_TK / (tl.sum(s_TK, axis=1) + _DEEPSEEK_DENOM_EPS_K)[:, None] * scale
    else:  # _SIGMOID
        w_TK = _sigmoid(x_TK)
    if MERGE:
        # Cast first, then select: native weights pass through bit for bit.
        out_dtype = weights_ptr.dtype.element_ty
        native_w_TK = tl.load(
            native_w_ptr + safe_T[:, None] * stride_nwt + k_K[None, :] * stride_nwk,
            mask=lane_ok_TK,
            other=0.0,
        )
        w_TK = tl.where(replay_T[:, None], w_TK.to(out_dtype), native_w_TK.to(out_dtype))
    tl.store(weights_ptr + out_TK, w_TK, mask=store_ok_TK)


@triton.jit
def _replay_weights_bwd_kernel(
    logits_ptr, ids_ptr, grad_w_ptr, lse_ptr, grad_logits_ptr, replay_ptr, grad_native_ptr,
    T, E, K,
    stride_lt, stride_le, stride_it, stride_ik, stride_gwt, stride_gwk, stride_gt,
    scale,
    METHOD: tl.constexpr, COMPUTE_F64: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    if COMPUTE_F64:
        cdtype = tl.float64
    else:
        cdtype = tl.float32
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok_T = rows_T < T
    safe_T = tl.minimum(rows_T, T - 1).to(tl.int64)
    k_K = tl.arange(0, BLOCK_K)
    lane_ok_TK = tl.broadcast_to(k_K[None, :] < K, (BLOCK_T, BLOCK_K))
    ids_TK = tl.load(
        ids_ptr + safe_T[:, None] * stride_it + k_K[None, :] * stride_ik,
        mask=lane_ok_TK,
        other=0,
    ).to(tl.int32)
    # With check_ids=False nobody validated the ids: an out-of-range id is never read here and
    # matches no column below, so it scatters nothing.
    x_TK = tl.load(
        logits_ptr + safe_T[:, None] * stride_lt + ids_TK * stride_le,
        mask=lane_ok_TK & (ids_TK >= 0) & (ids_TK < E),
        other=float("-inf"),
    ).to(cdtype)
    g_TK = tl.load(
        grad_w_ptr + safe_T[:, None] * stride_gwt + k_K[None, :] * stride_gwk,
        mask=lane_ok_TK,
        other=0.0,
    ).to(cdtype)
    if MERGE:
        # Rows not replayed pass their gradient to the native weights and none to the logits
        # (every method's logits gradient below is linear in g, so g = 0 gives zero rows).
        replay_T1 = (tl.load(replay_ptr + safe_T) != 0)[:, None]
        tl.store(
            grad_native_ptr + rows_T[:, None].to(tl.int64) * K + k_K[None, :],
            tl.where(replay_T1, 0.0, g_TK).to(grad_native_ptr.dtype.element_ty),
            mask=row_ok_T[:, None] & (k_K[None, :] < K),
        )
        g_TK = tl.where(replay_T1, g_TK, 0.0)

    # c_TK: what each replayed id scatters into its logit's gradient. For DEFAULT the dense row
    # is p_e * (c scattered to e - dot), p = softmax of the full row.
    if METHOD == _FULL_SOFTMAX:
        lse_T = tl.load(lse_ptr + safe_T)
        w_TK = tl.exp(x_TK - lse_T[:, None])
        dot_T = tl.sum(g_TK * w_TK, axis=1)
        c_TK = g_TK
    elif METHOD == _SOFTMAX_K:
        w_TK = _softmax_over_k(x_TK)
        c_TK = w_TK * (g_TK - tl.sum(g_TK * w_TK, axis=1)[:, None])
    elif METHOD == _SIGMOID_NORM:
        # w = scale * s / d with d = sum(s) + eps: dL/ds_i = (scale * g_i - sum_j g_j w_j) / d.
        s_TK = _sigmoid(x_TK)
        d_T = tl.sum(s_TK, axis=1) + _DEEPSEEK_DENOM_EPS_K
        w_TK = s_TK / d_T[:, None] * scale
        dl_ds_TK = (g_TK * scale - tl.sum(g_TK * w_TK, axis=1)[:, None]) / d_T[:, None]
        c_TK = dl_ds_TK * s_TK * (1.0 - s_TK)
    else:  # _SIGMOID
        s_TK = _sigmoid(x_TK)
        c_TK = g_TK * s_TK * (1.0 - s_TK)

    out_row_T = rows_T.to(tl.int64) * stride_gt
    for e0 in range(0, E, BLOCK_E):
        cols_E = e0 + tl.arange(0, BLOCK_E)
        acc_TE = tl.zeros([BLOCK_T, BLOCK_E], cdtype)
        for j in range(K):
            # Column j of the [T, K] tiles, as a [T] vector (Triton has no register indexing).
            pick_K = k_K[None, :] == j
            id_T = tl.sum(tl.where(pick_K, ids_TK, 0), axis=1)
            c_T = tl.sum(tl.where(pick_K, c_TK, 0.0), axis=1)
            acc_TE += tl.where(cols_E[None, :] == id_T[:, None], c_T[:, None], 0.0)
        if METHOD == _FULL_SOFTMAX:
            x_TE = tl.load(
                logits_ptr + safe_T[:, None] * stride_lt + cols_E[None, :] * stride_le,
                mask=tl.broadcast_to(cols_E[None, :] < E, (BLOCK_T, BLOCK_E)),
                other=float("-inf"),
            ).to(cdtype)
            acc_TE = tl.exp(x_TE - lse_T[:, None]) * (acc_TE - dot_T[:, None])
        tl.store(
            grad_logits_ptr + out_row_T[:, None] + cols_E[None, :],
            acc_TE.to(grad_logits_ptr.dtype.element_ty),
            mask=row_ok_T[:, None] & (cols_E[None, :] < E),
        )
