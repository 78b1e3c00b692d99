"""Routing: router logits to top-k expert ids and gate weights, with optional in-kernel capture.

Legend: T tokens (rows), E experts (in the kernel: the lanes of a padded row), K top_k,
G groups (``n_group``), S experts per group, C chunks of a row (kernel); suffixes such as
``_TE`` / ``_TK`` name the axes of a tensor.

``route`` dispatches CUDA tensors to ``route_triton`` (one Triton kernel: scores, selection,
weights and, when ``capture_out`` is given, the capture write, in one launch) and CPU tensors to
``route_reference`` (plain torch). Both follow DESIGN.md's routing methods:

- Scores and weights are float32 whatever the logits' dtype.
- The K ids of a row are distinct and listed best first; ties go to the lower expert index.
- DEFAULT, RENORMALIZE, RENORMALIZE_NAIVE and LLAMA4 select on the logits themselves: softmax is
  strictly increasing, so the top-k of the softmax is the top-k of the logits, and selecting on
  the exact logits keeps ties exact (two logits that differ never tie after rounding).
- DEEPSEEK_V3 follows HF DeepSeek-V3 / GLM4-MoE ``route_tokens_to_experts`` with
  ``norm_topk_prob``: scores ``s = sigmoid(logits)``, selection on ``s + correction_bias``; with
  groups, a group's score is the sum of its two best biased scores, the ``topk_group`` best
  groups are kept and the top-k is taken among their experts; weights are
  ``s[ids] / (sum(s[ids]) + 1e-20) * routed_scaling_factor``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import triton
import triton.language as tl

from routing_kernels import batch_invariant
from routing_kernels.expert_ids import ID_DTYPE_CAPACITY
from routing_kernels.routing_method import RoutingMethod

__all__ = ["route", "route_reference", "route_triton"]

_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Capture dtypes and the largest num_experts whose ids (0 .. E-1) each can hold.
# HF DeepSeek-V3 / GLM4-MoE add this to the normalizing denominator.
_DEEPSEEK_DENOM_EPS = 1e-20

# Kernel-side method codes (a runtime argument: the logit-selecting methods share a kernel).
_DEFAULT = tl.constexpr(0)
_RENORMALIZE = tl.constexpr(1)
_RENORMALIZE_NAIVE = tl.constexpr(2)
_KERNEL_METHOD = {
    RoutingMethod.DEFAULT: 0,
    RoutingMethod.RENORMALIZE: 1,
    RoutingMethod.RENORMALIZE_NAIVE: 2,
    RoutingMethod.DEEPSEEK_V3: 3,
    RoutingMethod.LLAMA4: 4,
}
# Bits of a float32 that are zero when it was converted from bfloat16 / float16: the kernel
# stores the expert index there to make every selection key unique (see _route_kernel).
_FREE_LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}

# Selection keys: int32 with the order of the float32 values (see _ordered_key).
_REMOVED_KEY = tl.constexpr(-(2**31))  # below every real key, -inf's included
_NEG_INF_KEY = tl.constexpr(-0x7F800000)
_INF_BITS = tl.constexpr(0x7F800000)
_ABS_MASK = tl.constexpr(0x7FFFFFFF)

# Logits of the [rows, lanes] tile per thread that the launcher aims for (see _launch_config).
_ELEMENTS_PER_THREAD = 32
_MAX_BLOCK_T = 256
_SMALL_BATCH = 8


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    method: RoutingMethod | str,
    *,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    capture_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each row of ``logits_TE`` to its top-k experts.

    CUDA tensors run ``route_triton`` (one kernel launch, no host synchronization, so it can be
    captured in a CUDA graph); CPU tensors run ``route_reference``.

    Args:
        logits_TE: router logits [T, E], float32, float16 or bfloat16.
        top_k: experts per token, 1 <= top_k <= E (exactly 1 for LLAMA4).
        method: a ``RoutingMethod`` or its lower-case name.
        correction_bias: DEEPSEEK_V3 only: [E] added to the sigmoid scores for selection only.
        n_group: DEEPSEEK_V3 only, with ``topk_group``: E is split into ``n_group`` groups of at
            least two experts (a group's score sums its two best biased scores).
        topk_group: DEEPSEEK_V3 only: groups kept, 1 <= topk_group <= n_group, and the kept
            groups must hold at least top_k experts.
        routed_scaling_factor: DEEPSEEK_V3 weights are multiplied by it; finite and > 0, and
            1.0 for the other methods.
        capture_out: optional [T, top_k] view (uint8, int16 or int32, unit stride along K, any
            row stride, e.g. ``buffer[:T, layer]`` of a [max_tokens, layers, K] buffer) that
            receives the ids cast to its dtype. Nothing outside the view is written.

    Returns:
        ``(weights_TK, ids_TK)``: float32 [T, K] gate weights and int32 [T, K] expert ids, best
        first, ties to the lower expert index.

    Raises:
        TypeError: a non-tensor input or a non-integer / non-numeric parameter.
        ValueError: any other bad input; the message names the field, the expected and the
            actual value. The reference path also raises on NaN or inf logits or bias.
    """
    on_cuda = isinstance(logits_TE, torch.Tensor) and logits_TE.is_cuda
    route_fn = route_triton if on_cuda else route_reference
    return route_fn(
        logits_TE,
        top_k,
        method,
        correction_bias=correction_bias,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        capture_out=capture_out,
    )


def route_reference(
    logits_TE: torch.Tensor,
    top_k: int,
    method: RoutingMethod | str,
    *,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    capture_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``route`` in plain torch, float32 math, on any device: the CPU path and the kernel's model.

    Batch-invariant: sigmoid, softmax and sums are ``routing_kernels.batch_invariant``'s, so a
    row's ids and weights depend on that row alone (not on the rows beside it).

    Same arguments, results and errors as ``route``. It also checks the values: NaN or inf in
    ``logits_TE`` or ``correction_bias`` raise ValueError with their count (one host sync).
    """
    spec = _check_inputs(
        logits_TE,
        top_k,
        method,
        correction_bias,
        n_group,
        topk_group,
        routed_scaling_factor,
        capture_out,
    )
    _check_finite("logits", logits_TE)
    if correction_bias is not None:
        _check_finite("correction_bias", correction_bias)
    x_TE = logits_TE.float()
    if spec.method is RoutingMethod.DEEPSEEK_V3:
        s_TE = batch_invariant.sigmoid(x_TE)
        choice_TE = s_TE if correction_bias is None else s_TE + correction_bias.float()
        if spec.n_group > 1:
            choice_TE = _mask_groups(choice_TE, spec.n_group, spec.topk_group)
        ids_TK = _stable_topk(choice_TE, top_k)
        s_TK = s_TE.gather(1, ids_TK)
        weights_TK = s_TK / (batch_invariant.tree_sum(s_TK)[:, None] + _DEEPSEEK_DENOM_EPS)
        weights_TK = weights_TK * spec.routed_scaling_factor
    else:
        ids_TK = _stable_topk(x_TE, top_k)
        if spec.method is RoutingMethod.DEFAULT:
            weights_TK = batch_invariant.softmax(x_TE).gather(1, ids_TK)
        elif spec.method is RoutingMethod.RENORMALIZE:
            weights_TK = batch_invariant.softmax(x_TE.gather(1, ids_TK))
        elif spec.method is RoutingMethod.RENORMALIZE_NAIVE:
            p_TK = batch_invariant.softmax(x_TE).gather(1, ids_TK)
            weights_TK = p_TK / batch_invariant.tree_sum(p_TK)[:, None]
        else:
            assert spec.method is RoutingMethod.LLAMA4
            weights_TK = batch_invariant.sigmoid(x_TE.gather(1, ids_TK))
    ids_TK = ids_TK.to(torch.int32)
    if capture_out is not None:
        capture_out.copy_(ids_TK)
    return weights_TK, ids_TK


def route_triton(
    logits_TE: torch.Tensor,
    top_k: int,
    method: RoutingMethod | str,
    *,
    correction_bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    capture_out: torch.Tensor | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``route`` as one Triton kernel launch (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Same arguments, results and errors as ``route``, except that the values are not checked
    (that would need a host sync). ``block_t`` (rows per program, a power of two) and
    ``num_warps`` override the launch configuration, for tuning; by default they are derived
    from T, E and the logits' dtype.

    Non-finite logits, defined behaviour: the selection score of an expert (its logit; for
    DEEPSEEK_V3 its sigmoid score plus bias, so a -inf logit scores 0 + bias there) orders
    experts with +inf above every number and NaN ranked as -inf, ties to the lower index; so
    a row's ids are always K distinct ids in [0, E), written to ``capture_out`` too. Every
    weight of a row with any NaN, +inf or -inf logit is NaN. The correction bias is assumed
    finite.
    """
    spec = _check_inputs(
        logits_TE,
        top_k,
        method,
        correction_bias,
        n_group,
        topk_group,
        routed_scaling_factor,
        capture_out,
    )
    num_tokens, num_experts = logits_TE.shape
    weights_TK = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits_TE.device)
    ids_TK = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits_TE.device)
    if num_tokens == 0:
        return weights_TK, ids_TK

    # Selection on bf16/fp16 logits stores the expert index in the free low bits of the key,
    # which makes keys unique (see _route_kernel).
    index_bits = _FREE_LOW_BITS.get(logits_TE.dtype, 0)
    if spec.method is RoutingMethod.DEEPSEEK_V3 or num_experts > 2**index_bits:
        index_bits = 0
    # Keeping all groups is the same as not grouping: skip the group scores then.
    grouped = 1 < spec.n_group and spec.topk_group < spec.n_group
    group_size = num_experts // spec.n_group if grouped else num_experts
    block_g = triton.next_power_of_2(num_experts // group_size)
    # Selection works on chunks of one 16-byte load (see _select_top_k): a row has at least
    # one, and a DeepSeek-V3 group whole chunks.
    chunk = 16 // logits_TE.element_size()
    min_block_s = chunk if grouped else chunk // min(block_g, chunk)
    block_s = max(triton.next_power_of_2(group_size), min_block_s)
    default_block_t, default_num_warps = _launch_config(
        num_tokens, block_g * block_s, logits_TE.element_size()
    )
    block_t = default_block_t if block_t is None else block_t
    num_warps = default_num_warps if num_warps is None else num_warps
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t: expected a power of two >= 1, got {block_t}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {num_warps}")

    has_bias = correction_bias is not None
    has_capture = capture_out is not None
    grid = (triton.cdiv(num_tokens, block_t),)
    _route_kernel[grid](
        logits_TE,
        correction_bias if has_bias else logits_TE,
        weights_TK,
        ids_TK,
        capture_out if has_capture else ids_TK,
        num_tokens,
        logits_TE.stride(0),
        logits_TE.stride(1),
        correction_bias.stride(0) if has_bias else 0,
        capture_out.stride(0) if has_capture else 0,
        float(spec.routed_scaling_factor),
        _KERNEL_METHOD[spec.method],
        E=num_experts,
        K=top_k,
        DEEPSEEK=spec.method is RoutingMethod.DEEPSEEK_V3,
        GROUP_SIZE=group_size,
        GROUPED=grouped,
        TOPK_GROUP=spec.topk_group,
        BLOCK_T=block_t,
        BLOCK_G=block_g,
        BLOCK_S=block_s,
        BLOCK_K=triton.next_power_of_2(top_k),
        CHUNK=chunk,
        INDEX_BITS=index_bits,
        HAS_BIAS=has_bias,
        HAS_CAPTURE=has_capture,
        num_warps=num_warps,
    )
    return weights_TK, ids_TK


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class _RouteSpec:
    """The checked parameters; ``n_group == topk_group == 1`` when routing is not grouped."""

    method: RoutingMethod
    n_group: int
    topk_group: int
    routed_scaling_factor: float


def _check_inputs(
    logits_TE: torch.Tensor,
    top_k: int,
    method: RoutingMethod | str,
    correction_bias: torch.Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
    capture_out: torch.Tensor | None,
) -> _RouteSpec:
    """Host-side checks of shapes, dtypes, devices and parameters (no device synchronization)."""
    if not isinstance(logits_TE, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits_TE).__name__}")
    if logits_TE.dtype not in _LOGITS_DTYPES:
        raise ValueError(
            f"logits: expected dtype float32, float16 or bfloat16, got {logits_TE.dtype}"
        )
    if logits_TE.dim() != 2 or logits_TE.shape[1] == 0:
        raise ValueError(
            f"logits: expected a 2-D tensor [T, E] with E >= 1, got shape {tuple(logits_TE.shape)}"
        )
    num_tokens, num_experts = logits_TE.shape
    method = RoutingMethod.parse(method)
    _check_int("top_k", top_k)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= E = {num_experts}, got {top_k}")
    if method is RoutingMethod.LLAMA4 and top_k != 1:
        raise ValueError(f"top_k: expected 1 for LLAMA4, got {top_k}")

    scale = routed_scaling_factor
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"routed_scaling_factor: expected a finite value > 0, got {scale}")

    is_deepseek = method is RoutingMethod.DEEPSEEK_V3
    if not is_deepseek:
        # Parameters a method ignores would hide a configuration mistake.
        unused = (
            ("correction_bias", "None", correction_bias is not None, "a tensor"),
            ("n_group", "None", n_group is not None, n_group),
            ("topk_group", "None", topk_group is not None, topk_group),
            ("routed_scaling_factor", "1.0", scale != 1.0, scale),
        )
        for field, expected, given, shown in unused:
            if given:
                raise ValueError(
                    f"{field}: expected {expected} for {method.name} (only DEEPSEEK_V3 uses it), "
                    f"got {shown}"
                )

    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor):
            raise TypeError(
                f"correction_bias: expected a torch.Tensor, got {type(correction_bias).__name__}"
            )
        if correction_bias.dtype not in _LOGITS_DTYPES:
            raise ValueError(
                "correction_bias: expected dtype float32, float16 or bfloat16, "
                f"got {correction_bias.dtype}"
            )
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(
                f"correction_bias: expected shape ({num_experts},) (E), "
                f"got {tuple(correction_bias.shape)}"
            )
        if correction_bias.device != logits_TE.device:
            raise ValueError(
                f"correction_bias: expected device {logits_TE.device} (logits'), "
                f"got {correction_bias.device}"
            )

    if (n_group is None) != (topk_group is None):
        raise ValueError(
            "n_group, topk_group: expected both or neither, "
            f"got n_group={n_group}, topk_group={topk_group}"
        )
    groups, kept = 1, 1
    if n_group is not None:
        _check_int("n_group", n_group)
        _check_int("topk_group", topk_group)
        if n_group < 1 or num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(
                f"n_group: expected a divisor of E = {num_experts} leaving >= 2 experts per "
                f"group (a group scores its two best experts), got {n_group}"
            )
        if not 1 <= topk_group <= n_group:
            raise ValueError(
                f"topk_group: expected 1 <= topk_group <= n_group = {n_group}, got {topk_group}"
            )
        if topk_group * (num_experts // n_group) < top_k:
            raise ValueError(
                f"topk_group: expected topk_group * E / n_group >= top_k = {top_k}, got "
                f"{topk_group} * {num_experts // n_group} = {topk_group * num_experts // n_group}"
            )
        groups, kept = n_group, topk_group

    if capture_out is not None:
        _check_capture(capture_out, logits_TE, num_tokens, num_experts, top_k)
    return _RouteSpec(
        method=method, n_group=groups, topk_group=kept, routed_scaling_factor=float(scale)
    )


def _check_int(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field}: expected an int, got {type(value).__name__}")


def _check_capture(
    capture_out: torch.Tensor,
    logits_TE: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    top_k: int,
) -> None:
    if not isinstance(capture_out, torch.Tensor):
        raise TypeError(f"capture_out: expected a torch.Tensor, got {type(capture_out).__name__}")
    max_experts = ID_DTYPE_CAPACITY.get(capture_out.dtype)
    if max_experts is None:
        raise ValueError(
            f"capture_out: expected dtype uint8, int16 or int32, got {capture_out.dtype}"
        )
    if num_experts > max_experts:
        raise ValueError(
            f"capture_out: expected a dtype holding ids up to E - 1 = {num_experts - 1} "
            f"(uint8 for E <= 256, int16 for E <= 32768), got {capture_out.dtype}"
        )
    if capture_out.device != logits_TE.device:
        raise ValueError(
            f"capture_out: expected device {logits_TE.device} (logits'), got {capture_out.device}"
        )
    if tuple(capture_out.shape) != (num_tokens, top_k):
        raise ValueError(
            f"capture_out: expected shape ({num_tokens}, {top_k}) (T, top_k), "
            f"got {tuple(capture_out.shape)}"
        )
    if top_k > 1 and capture_out.stride(1) != 1:
        raise ValueError(
            f"capture_out: expected stride 1 along top_k, got strides {capture_out.stride()}"
        )
    if num_tokens > 1 and capture_out.stride(0) < top_k:
        raise ValueError(
            f"capture_out: expected a row stride >= top_k = {top_k} (rows must not overlap), "
            f"got strides {capture_out.stride()}"
        )


def _check_finite(field: str, values: torch.Tensor) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(f"{field}: expected finite values, got {bad} NaN or inf")


# --------------------------------------------------------------------------------------------
# Reference helpers
# --------------------------------------------------------------------------------------------


def _stable_topk(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row, best first, ties to the lower index (int64 [T, k])."""
    return torch.sort(scores_TE, dim=1, descending=True, stable=True).indices[:, :k]


def _mask_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``choice_TE`` with the experts outside the ``topk_group`` best groups set to -inf."""
    num_tokens, num_experts = choice_TE.shape
    choice_TGS = choice_TE.view(num_tokens, n_group, num_experts // n_group)
    group_score_TG = choice_TGS.topk(2, dim=2).values.sum(dim=2)
    kept_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    kept_TG.scatter_(1, _stable_topk(group_score_TG, topk_group), True)
    return choice_TGS.masked_fill(~kept_TG[:, :, None], float("-inf")).view(num_tokens, num_experts)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


def _launch_config(num_tokens: int, block_e: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) for rows of ``block_e`` lanes.

    Triton lays a row over ``block_e / vector`` threads (16-byte vectors) and stacks rows over
    the warps. A row wider than a warp would span warps, and each of the K steps of the
    selection would then reduce through shared memory with a barrier: such rows get one warp
    per program (up to 1024 lanes). BLOCK_T gives each thread about 32 logits: enough to
    amortize the reductions, few enough registers for several programs per SM. Batches of at
    most 8 rows (decode) get at most 8 rows per program, for latency; there are only these two
    sizes, so few kernels get compiled.
    """
    lanes_per_row = block_e * element_size // 16
    if lanes_per_row <= 32:
        num_warps = 4
    else:
        num_warps = max(1, min(16, block_e // 1024))
    block_t = min(max(1, _ELEMENTS_PER_THREAD * 32 * num_warps // block_e), _MAX_BLOCK_T)
    if num_tokens <= _SMALL_BATCH:
        block_t = min(block_t, _SMALL_BATCH)
    return block_t, num_warps


@triton.jit
def _ordered_key(x):
    """int32 keys ordered like the float32 values ``x``.

    -0.0 and +0.0 get the same key (they tie), NaN gets the key of -inf; every key is above
    ``_REMOVED_KEY``. A float32 converted from bf16/fp16 has zero low mantissa bits, and so
    has its key.
    """
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & _ABS_MASK
    key = tl.where(bits < 0, -mag, mag)
    return tl.where(mag > _INF_BITS, _NEG_INF_KEY, key)


@triton.jit
def _key_value(key):
    """The float32 value of an ``_ordered_key`` (NaN comes back as -inf)."""
    mag = tl.abs(key).to(tl.float32, bitcast=True)
    return tl.where(key < 0, -mag, mag)


@triton.jit
def _compare_exchange(a, ia, b, ib, WITH_IDS: tl.constexpr):
    """(larger, its id, smaller, its id) of two key tiles, elementwise.

    WITH_IDS: keys may repeat and the ids ride along (the lower id comes first on a tie);
    else keys are unique and the ids are not used.
    """
    if WITH_IDS:
        a_first = (a > b) | ((a == b) & (ia < ib))
        return (
            tl.where(a_first, a, b),
            tl.where(a_first, ia, ib),
            tl.where(a_first, b, a),
            tl.where(a_first, ib, ia),
        )
    else:
        return tl.maximum(a, b), ia, tl.minimum(a, b), ib


@triton.jit
def _sort4(c0, c1, c2, c3, i0, i1, i2, i3, WITH_IDS: tl.constexpr):
    """Sort 4 key tiles elementwise, largest first (5 compare-exchanges)."""
    c0, i0, c1, i1 = _compare_exchange(c0, i0, c1, i1, WITH_IDS)
    c2, i2, c3, i3 = _compare_exchange(c2, i2, c3, i3, WITH_IDS)
    c0, i0, c2, i2 = _compare_exchange(c0, i0, c2, i2, WITH_IDS)
    c1, i1, c3, i3 = _compare_exchange(c1, i1, c3, i3, WITH_IDS)
    c1, i1, c2, i2 = _compare_exchange(c1, i1, c2, i2, WITH_IDS)
    return c0, c1, c2, c3, i0, i1, i2, i3


@triton.jit
def _sort_chunk(
    c0,
    c1,
    c2,
    c3,
    c4,
    c5,
    c6,
    c7,
    i0,
    i1,
    i2,
    i3,
    i4,
    i5,
    i6,
    i7,
    CHUNK: tl.constexpr,
    WITH_IDS: tl.constexpr,
):
    """Sort a chunk of CHUNK (4 or 8) key tiles elementwise, largest first, and their ids with
    them when WITH_IDS. For 8, Batcher's odd-even merge sort: two sorted 4s merged (19
    compare-exchanges); with 4 the last four tiles are padding and stay as they are."""
    c0, c1, c2, c3, i0, i1, i2, i3 = _sort4(c0, c1, c2, c3, i0, i1, i2, i3, WITH_IDS)
    if CHUNK == 8:
        c4, c5, c6, c7, i4, i5, i6, i7 = _sort4(c4, c5, c6, c7, i4, i5, i6, i7, WITH_IDS)
        c0, i0, c4, i4 = _compare_exchange(c0, i0, c4, i4, WITH_IDS)
        c1, i1, c5, i5 = _compare_exchange(c1, i1, c5, i5, WITH_IDS)
        c2, i2, c6, i6 = _compare_exchange(c2, i2, c6, i6, WITH_IDS)
        c3, i3, c7, i7 = _compare_exchange(c3, i3, c7, i7, WITH_IDS)
        c2, i2, c4, i4 = _compare_exchange(c2, i2, c4, i4, WITH_IDS)
        c3, i3, c5, i5 = _compare_exchange(c3, i3, c5, i5, WITH_IDS)
        c1, i1, c2, i2 = _compare_exchange(c1, i1, c2, i2, WITH_IDS)
        c3, i3, c4, i4 = _compare_exchange(c3, i3, c4, i4, WITH_IDS)
        c5, i5, c6, i6 = _compare_exchange(c5, i5, c6, i6, WITH_IDS)
    return c0, c1, c2, c3, c4, c5, c6, c7, i0, i1, i2, i3, i4, i5, i6, i7


@triton.jit
def _shift_where(taken, head, nxt, DEPTH: tl.constexpr, AT: tl.constexpr):
    """``nxt`` where ``taken`` at entry AT of a sorted chunk, if entry AT is read again."""
    if AT < DEPTH:
        head = tl.where(taken, nxt, head)
    return head


@triton.jit
def _pop(taken, c0, c1, c2, c3, c4, c5, c6, c7, DEPTH: tl.constexpr):
    """Drop the first entry of the sorted chunks where ``taken``. Only the first DEPTH entries
    are read again (DEPTH = steps left), so deeper entries are left as they are."""
    c0 = _shift_where(taken, c0, c1, DEPTH, 0)
    c1 = _shift_where(taken, c1, c2, DEPTH, 1)
    c2 = _shift_where(taken, c2, c3, DEPTH, 2)
    c3 = _shift_where(taken, c3, c4, DEPTH, 3)
    c4 = _shift_where(taken, c4, c5, DEPTH, 4)
    c5 = _shift_where(taken, c5, c6, DEPTH, 5)
    c6 = _shift_where(taken, c6, c7, DEPTH, 6)
    c7 = _shift_where(taken, c7, _REMOVED_KEY, DEPTH, 7)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split_chunk(x_TE, pad, BLOCK_T: tl.constexpr, N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr):
    """A [rows, lanes] tile cut into chunks of CHUNK (4 or 8) consecutive lanes, as 8
    [rows, chunks] tiles, one per position in the chunk (in any order: they are sorted next);
    with CHUNK = 4 the last four are ``pad``."""
    QUADS: tl.constexpr = N_CHUNKS * CHUNK // 4
    a, b = tl.split(tl.reshape(x_TE, [BLOCK_T, QUADS, 2, 2]))
    c0, c1 = tl.split(a)
    c2, c3 = tl.split(b)
    if CHUNK == 8:
        c0, c4 = tl.split(tl.reshape(c0, [BLOCK_T, N_CHUNKS, 2]))
        c1, c5 = tl.split(tl.reshape(c1, [BLOCK_T, N_CHUNKS, 2]))
        c2, c6 = tl.split(tl.reshape(c2, [BLOCK_T, N_CHUNKS, 2]))
        c3, c7 = tl.split(tl.reshape(c3, [BLOCK_T, N_CHUNKS, 2]))
    else:
        c4 = tl.full([BLOCK_T, N_CHUNKS], pad, tl.int32)
        c5 = c4
        c6 = c4
        c7 = c4
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _top2_combine(a_best, a_second, b_best, b_second):
    """The two largest of two (largest, second largest) pairs; repeats count twice."""
    best = tl.maximum(a_best, b_best)
    second = tl.maximum(tl.minimum(a_best, b_best), tl.maximum(a_second, b_second))
    return best, second


@triton.jit
def _top_groups(
    c0_TC,
    c1_TC,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CHUNKS_PER_GROUP: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
):
    """[T, BLOCK_G] mask of the TOPK_GROUP best groups, from the two best keys of each sorted
    chunk (exact keys). A group's score is the float32 sum of its two best biased scores (HF
    DeepSeek-V3; every group has >= 2 experts); ties between groups go to the lower group.
    """
    best_TG, second_TG = tl.reduce(
        (
            tl.reshape(c0_TC, [BLOCK_T, BLOCK_G, CHUNKS_PER_GROUP]),
            tl.reshape(c1_TC, [BLOCK_T, BLOCK_G, CHUNKS_PER_GROUP]),
        ),
        axis=2,
        combine_fn=_top2_combine,
    )
    group_key_TG = _ordered_key(_key_value(best_TG) + _key_value(second_TG))
    g_1G = tl.arange(0, BLOCK_G)[None, :]
    real_1G = g_1G < N_GROUP
    group_key_TG = tl.where(real_1G, group_key_TG, _REMOVED_KEY)
    for _ in tl.static_range(TOPK_GROUP):
        top_T = tl.max(group_key_TG, axis=1)
        top_at_T = tl.min(tl.where(group_key_TG == top_T[:, None], g_1G, BLOCK_G), axis=1)
        group_key_TG = tl.where(g_1G == top_at_T[:, None], _REMOVED_KEY, group_key_TG)
    # The kept groups are the real groups whose key was just removed.
    return (group_key_TG == _REMOVED_KEY) & real_1G


@triton.jit
def _select_top_k(
    key_TE,
    expert_1E,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    GROUPED: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
):
    """The experts of the K largest keys of each row, best first ([T, BLOCK_K] int32).

    The row is cut into chunks of CHUNK lanes, one 16-byte load of logits (8 in bf16/fp16, 4
    in float32), which Triton's layout keeps in one thread. Each chunk is sorted in
    registers, then every step takes the row's largest chunk head (the row maximum) and drops
    it from its chunk: a step costs a compare and a few selects per chunk, not a compare, a
    select and a max per lane. With INDEX_BITS > 0 the keys are unique and carry the inverted
    expert index in their low bits; else the expert ids are sorted along and a tie goes to
    the lower id. When GROUPED, each group is whole chunks and only the TOPK_GROUP best groups
    compete.
    """
    WITH_IDS: tl.constexpr = INDEX_BITS == 0
    INDEX_MASK: tl.constexpr = (1 << INDEX_BITS) - 1
    N_CHUNKS: tl.constexpr = BLOCK_G * BLOCK_S // CHUNK
    c0, c1, c2, c3, c4, c5, c6, c7 = _split_chunk(key_TE, _REMOVED_KEY, BLOCK_T, N_CHUNKS, CHUNK)
    if WITH_IDS:
        ids_TE = tl.broadcast_to(expert_1E, key_TE.shape)
        i0, i1, i2, i3, i4, i5, i6, i7 = _split_chunk(ids_TE, 0, BLOCK_T, N_CHUNKS, CHUNK)
    else:
        i0, i1, i2, i3, i4, i5, i6, i7 = c0, c1, c2, c3, c4, c5, c6, c7
    c0, c1, c2, c3, c4, c5, c6, c7, i0, i1, i2, i3, i4, i5, i6, i7 = _sort_chunk(
        c0, c1, c2, c3, c4, c5, c6, c7, i0, i1, i2, i3, i4, i5, i6, i7, CHUNK, WITH_IDS
    )
    if GROUPED:
        # A chunk that never leads is never popped: removing the heads of the dropped groups'
        # chunks removes those groups (the kept ones hold >= K experts).
        CHUNKS_PER_GROUP: tl.constexpr = BLOCK_S // CHUNK
        kept_TG = _top_groups(c0, c1, BLOCK_T, BLOCK_G, CHUNKS_PER_GROUP, N_GROUP, TOPK_GROUP)
        kept_TC = tl.reshape(
            tl.broadcast_to(kept_TG[:, :, None], [BLOCK_T, BLOCK_G, CHUNKS_PER_GROUP]),
            [BLOCK_T, N_CHUNKS],
        )
        c0 = tl.where(kept_TC, c0, _REMOVED_KEY)

    k_1K = tl.arange(0, BLOCK_K)[None, :]
    ids_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for i in tl.static_range(K):
        top_T = tl.max(c0, axis=1)
        if WITH_IDS:
            at_T = tl.min(tl.where(c0 == top_T[:, None], i0, BLOCK_G * BLOCK_S), axis=1)
            taken_TC = i0 == at_T[:, None]
            i0, i1, i2, i3, i4, i5, i6, i7 = _pop(
                taken_TC, i0, i1, i2, i3, i4, i5, i6, i7, K - 1 - i
            )
        else:
            at_T = INDEX_MASK - (top_T & INDEX_MASK)
            taken_TC = c0 == top_T[:, None]
        c0, c1, c2, c3, c4, c5, c6, c7 = _pop(taken_TC, c0, c1, c2, c3, c4, c5, c6, c7, K - 1 - i)
        ids_TK = tl.where(k_1K == i, at_T[:, None], ids_TK)
    return ids_TK


# T and the method vary from call to call: specializing on them would compile more kernels.
@triton.jit(do_not_specialize=["T", "method"])
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    capture_ptr,
    T,
    stride_logits_t,
    stride_logits_e,
    stride_bias,
    stride_capture_t,
    scaling,
    method,
    E: tl.constexpr,
    K: tl.constexpr,
    DEEPSEEK: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUPED: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CAPTURE: tl.constexpr,
):
    """Route BLOCK_T rows: one read of each logit, selection and weights in registers.

    A row is BLOCK_G * BLOCK_S lanes: lane g * BLOCK_S + s holds expert g * GROUP_SIZE + s,
    each group padded to a power of two (the DeepSeek-V3 groups when GROUPED, else one
    group). Selection works on int32 keys ordered like the float32 selection scores
    (``_ordered_key``): padding lanes and experts outside the kept groups hold
    ``_REMOVED_KEY``, strictly below the key of -inf, so they are never selected whatever the
    logits (no finite sentinel that all-negative logits could fall below). With INDEX_BITS > 0
    (bf16/fp16 logits selected on directly) the inverted expert index sits in the key's zero
    low bits, so keys are unique and the larger key is the lower expert on a tie.
    """
    pid = tl.program_id(0)
    N_GROUP: tl.constexpr = E // GROUP_SIZE
    BLOCK_E: tl.constexpr = BLOCK_G * BLOCK_S
    PADDED: tl.constexpr = BLOCK_E != E
    INDEX_MASK: tl.constexpr = (1 << INDEX_BITS) - 1

    rows_T = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    lane_E = tl.arange(0, BLOCK_E)
    if BLOCK_G == 1 or BLOCK_S == GROUP_SIZE:
        expert_E = lane_E  # kept as an arange, so Triton sees contiguous, vectorizable loads
    else:
        expert_E = (lane_E // BLOCK_S) * GROUP_SIZE + lane_E % BLOCK_S
    lane_ok_E = ((lane_E // BLOCK_S) < N_GROUP) & ((lane_E % BLOCK_S) < GROUP_SIZE)
    expert_1E = expert_E[None, :]
    lane_ok_1E = lane_ok_E[None, :]

    # Rows past T re-read row T - 1 (never stored): the loads need no row mask, and those rows
    # compute on real values.
    row_start_T = tl.minimum(rows_T, T - 1).to(tl.int64) * stride_logits_t
    logits_TE = logits_ptr + row_start_T[:, None] + expert_1E * stride_logits_e
    if PADDED:
        x_TE = tl.load(logits_TE, mask=lane_ok_1E, other=float("-inf")).to(tl.float32)
    else:
        x_TE = tl.load(logits_TE).to(tl.float32)

    # Rows with a non-finite logit get NaN weights (route_triton's docstring).
    mag_TE = x_TE.to(tl.int32, bitcast=True) & _ABS_MASK
    if PADDED:
        mag_TE = tl.where(lane_ok_1E, mag_TE, 0)
    nonfinite_T = tl.max(mag_TE, axis=1) >= _INF_BITS

    if DEEPSEEK:
        choice_TE = tl.sigmoid(x_TE)
        if HAS_BIAS:
            bias_E = tl.load(bias_ptr + expert_E * stride_bias, mask=lane_ok_E, other=0.0)
            choice_TE = choice_TE + bias_E.to(tl.float32)[None, :]
        key_TE = _ordered_key(choice_TE)
    else:
        # The full softmax's max and denominator (DEFAULT, RENORMALIZE_NAIVE), while the logits
        # are at hand; exp(-inf) = 0 for the padding lanes. Computed for every method: the
        # exponentials run on otherwise idle units, and a branch here costs registers.
        rowmax_T = tl.max(x_TE, axis=1)
        denom_T = tl.sum(tl.exp(x_TE - rowmax_T[:, None]), axis=1)
        key_TE = _ordered_key(x_TE)
        if INDEX_BITS > 0:
            key_TE = key_TE | (INDEX_MASK - expert_1E)
    if PADDED:
        key_TE = tl.where(lane_ok_1E, key_TE, _REMOVED_KEY)
    ids_TK = _select_top_k(
        key_TE,
        expert_1E,
        BLOCK_T,
        BLOCK_G,
        BLOCK_S,
        K,
        BLOCK_K,
        CHUNK,
        INDEX_BITS,
        GROUPED,
        N_GROUP,
        TOPK_GROUP,
    )

    k_K = tl.arange(0, BLOCK_K)
    k_ok_1K = k_K[None, :] < K
    # The selected logits, re-read (cache hits) rather than decoded from the keys: the load
    # gives the [T, K] tile a compact layout, where decoded keys would leave it replicated
    # over the lanes of a row and every weight computed once per lane.
    x_TK = tl.load(
        logits_ptr + row_start_T[:, None] + ids_TK * stride_logits_e,
        mask=k_ok_1K,
        other=float("-inf"),
    ).to(tl.float32)

    # Normalizers are inverted once per row and multiplied in (cheaper than K divisions).
    if DEEPSEEK:
        s_TK = tl.sigmoid(x_TK)
        weights_TK = s_TK * (scaling / (tl.sum(s_TK, axis=1) + 1e-20))[:, None]
    elif method == _DEFAULT:
        weights_TK = tl.exp(x_TK - rowmax_T[:, None]) * (1.0 / denom_T)[:, None]
    elif method == _RENORMALIZE_NAIVE:
        p_TK = tl.exp(x_TK - rowmax_T[:, None]) * (1.0 / denom_T)[:, None]
        weights_TK = p_TK * (1.0 / tl.sum(p_TK, axis=1))[:, None]
    elif method == _RENORMALIZE:
        e_TK = tl.exp(x_TK - tl.max(x_TK, axis=1)[:, None])
        weights_TK = e_TK * (1.0 / tl.sum(e_TK, axis=1))[:, None]
    else:  # LLAMA4
        weights_TK = tl.sigmoid(x_TK)
    weights_TK = tl.where(nonfinite_T[:, None], float("nan"), weights_TK)

    out_ok_TK = (rows_T < T)[:, None] & k_ok_1K
    out_TK = rows_T[:, None].to(tl.int64) * K + k_K[None, :]
    tl.store(weights_ptr + out_TK, weights_TK, mask=out_ok_TK)
    tl.store(ids_ptr + out_TK, ids_TK, mask=out_ok_TK)
    if HAS_CAPTURE:
        capture_TK = rows_T[:, None].to(tl.int64) * stride_capture_t + k_K[None, :]
        tl.store(
            capture_ptr + capture_TK,
            ids_TK.to(capture_ptr.dtype.element_ty),
            mask=out_ok_TK,
        )
