"""Fused Mixture-of-Experts experts: grouped GEMMs over (token, slot) pairs sorted by expert.

Legend: T tokens, H hidden size, E experts, I expert intermediate size, F = 2*I fused gate/up
rows, K experts per token, P = T*K (token, slot) pairs; ``_TH`` / ``_EFH`` / ``_TK`` suffixes.

Weights use HF transformers v5's layout (``Qwen3MoeExperts`` and kin): ``gate_up_proj_EFH``
holds each expert's gate rows then its up rows, ``down_proj_EHI`` its down projection. Token
``t`` gets ``sum_s topk_weights_TK[t, s] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over its
``e = topk_ids_TK[t, s]``.

``fused_experts`` sends CUDA tensors to ``fused_experts_triton`` and CPU tensors to
``fused_experts_reference``. The Triton path, vLLM-style:

1. ``routing_kernels.moe_align`` sorts the pairs by expert into ``block_m``-row blocks (no host
   sync, worst-case-sized buffers: it runs inside CUDA graphs);
2. grouped GEMM 1, per block and column tile: the block's tokens times their expert's gate and
   up tiles, two fp32 accumulators, ``silu(gate) * up`` in the epilogue -> ``[P, I]``;
3. grouped GEMM 2: that times the expert's down tile, times the routing weight -> ``[P, H]``;
4. a sum over the K slots of each token (``torch.sum`` over a ``[T, K, H]`` view; fp32
   accumulation), skipped when K is 1.

Blocks past the used part of the layout exit at once. Tiles depend on the number of pairs per
expert (``default_config``): decode uses 16-row blocks and narrow column tiles so that many
programs stream the few selected experts' weights at once; prefill uses large tiles. GEMMs
accumulate in fp32 (fp32 inputs in true fp32, not TF32); the intermediate and the weighted
per-pair outputs are stored in the activation dtype, like HF's, and summed in fp32.

Ids are expected in ``[0, E)``: they come from ``routing_kernels.route``. The reference checks them;
the Triton path does not (that would need a host sync) and leaves an out-of-range pair out,
so its token's output is unspecified.

Expert parallelism (``masked=True``): the weights hold a contiguous slice of the experts and
a pair whose expert lives elsewhere carries the id ``MASKED_ID`` (-1). Such a pair contributes
nothing: the reference skips it, and in the Triton path ``moe_align`` leaves it out of the
layout while its per-pair output row starts at zero (one memset, only in this mode), so each
token gets the sum over its local experts, and the sum of the outputs over all slices is the
unsharded result.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from routing_kernels.moe_align import MoeAlignment, moe_align

__all__ = [
    "INVARIANT_CONFIGS",
    "MASKED_ID",
    "FusedMoeConfig",
    "GemmTiles",
    "default_config",
    "fused_experts",
    "fused_experts_reference",
    "fused_experts_triton",
]

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The id of a pair whose expert is not among the given weights (``masked=True``).
MASKED_ID = -1


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class GemmTiles:
    """Tile shape and launch parameters of one grouped GEMM (its rows are ``block_m``).

    ``block_n`` columns of output per program (for the gate/up GEMM: of gate and of up each),
    ``block_k`` reduction step, ``group_m`` row blocks swept per column tile before moving on
    (L2 reuse of weight tiles when an expert spans several blocks).
    """

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < 16:
                raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
        if self.group_m < 1:
            raise ValueError(f"group_m: expected >= 1, got {self.group_m}")
        if not _is_power_of_two(self.num_warps):
            raise ValueError(f"num_warps: expected a power of two, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: expected >= 1, got {self.num_stages}")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class FusedMoeConfig:
    """Tiles of the two grouped GEMMs; both walk the same ``block_m``-row blocks of sorted pairs."""

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.block_m) or self.block_m < 16:
            raise ValueError(f"block_m: expected a power of two >= 16, got {self.block_m}")


def default_config(
    num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype
) -> FusedMoeConfig:
    """Tiles for ``num_tokens`` tokens, after vLLM's H100 tuning of the Qwen3-30B-A3B shape.

    ``block_m`` follows the expected pairs per expert so that padding stays small. The gate/up
    GEMM carries two accumulators, so its ``block_n`` is half of what one would give a plain
    GEMM. fp32 halves ``block_k`` to keep the shared-memory stages within budget.
    """
    pairs_per_expert = num_tokens * top_k / num_experts
    if pairs_per_expert <= 2:  # decode of a few sequences: stream a few experts' weights
        config = FusedMoeConfig(
            block_m=16,
            gate_up=GemmTiles(block_n=32, block_k=128, num_warps=4, num_stages=4),
            down=GemmTiles(block_n=32, block_k=128, num_warps=4, num_stages=4),
        )
    elif pairs_per_expert <= 16:
        config = FusedMoeConfig(
            block_m=16 if pairs_per_expert <= 8 else 32,
            gate_up=GemmTiles(block_n=128, block_k=128, num_warps=8, num_stages=3),
            down=GemmTiles(block_n=256, block_k=128, num_warps=8, num_stages=3),
        )
    elif pairs_per_expert <= 64:
        config = FusedMoeConfig(
            block_m=64,
            gate_up=GemmTiles(block_n=64, block_k=64, num_warps=4, num_stages=3),
            down=GemmTiles(block_n=128, block_k=64, num_warps=4, num_stages=3),
        )
    else:
        config = FusedMoeConfig(
            block_m=128,
            gate_up=GemmTiles(block_n=128, block_k=64, num_warps=8, num_stages=3),
            down=GemmTiles(block_n=256, block_k=64, num_warps=8, num_stages=4),
        )
    if dtype == torch.float32:
        config = dataclasses.replace(
            config,
            gate_up=dataclasses.replace(
                config.gate_up, block_k=max(16, config.gate_up.block_k // 2)
            ),
            down=dataclasses.replace(config.down, block_k=max(16, config.down.block_k // 2)),
        )
    return config


# Batch-invariant mode (``fused_experts_triton(..., invariant=True)``): one tile shape for every
# token count, so a (token, slot) pair's output is reduced in the same order whichever other
# pairs share its expert's blocks, and the K slots are then added in slot order.
INVARIANT_CONFIGS = {
    dtype: FusedMoeConfig(
        block_m=16,
        gate_up=GemmTiles(block_n=64, block_k=block_k),
        down=GemmTiles(block_n=64, block_k=block_k),
    )
    for dtype, block_k in ((torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 32))
}


def fused_experts(
    hidden_TH: torch.Tensor,
    gate_up_proj_EFH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    masked: bool = False,
) -> torch.Tensor:
    """The routed experts' weighted sum per token, ``[T, H]`` in ``hidden_TH``'s dtype.

    Args:
        hidden_TH: token activations, float16 / bfloat16 / float32.
        gate_up_proj_EFH: ``[E, 2*I, H]``, gate rows then up rows, ``hidden_TH``'s dtype.
        down_proj_EHI: ``[E, H, I]``, ``hidden_TH``'s dtype.
        topk_weights_TK: routing weights (float32 from ``routing_kernels.route``; any float dtype).
        topk_ids_TK: expert ids in ``[0, E)``, any integer dtype.
        masked: ids may also be ``MASKED_ID``: pairs whose expert is not among these weights
            (expert parallelism), which contribute nothing.

    CUDA tensors run ``fused_experts_triton`` (no host sync, CUDA-graph safe); others run
    ``fused_experts_reference``.
    """
    if isinstance(hidden_TH, torch.Tensor) and hidden_TH.is_cuda:
        return fused_experts_triton(
            hidden_TH,
            gate_up_proj_EFH,
            down_proj_EHI,
            topk_weights_TK,
            topk_ids_TK,
            masked=masked,
        )
    return fused_experts_reference(
        hidden_TH,
        gate_up_proj_EFH,
        down_proj_EHI,
        topk_weights_TK,
        topk_ids_TK,
        masked=masked,
    )


def fused_experts_reference(
    hidden_TH: torch.Tensor,
    gate_up_proj_EFH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    masked: bool = False,
) -> torch.Tensor:
    """``fused_experts`` in plain torch, computed as HF's ``Qwen3MoeExperts.forward``.

    Same expert order, same pair order within an expert and the same ops as HF, so float32
    results agree with HF's to rounding; the only difference is that contributions accumulate
    in float32 (HF adds them in the activation dtype). Checks that ids lie in ``[0, E)`` (or
    are ``MASKED_ID`` when ``masked``), which syncs with the host: this is the CPU path and the
    test oracle's structure.
    """
    num_tokens, hidden, num_experts, _, _ = _check_inputs(
        hidden_TH, gate_up_proj_EFH, down_proj_EHI, topk_weights_TK, topk_ids_TK
    )
    ids_TK = topk_ids_TK.long()
    lowest = MASKED_ID if masked else 0
    if ids_TK.numel():
        low, high = int(ids_TK.min()), int(ids_TK.max())
        if low < lowest or high >= num_experts:
            raise ValueError(
                f"topk_ids_TK: expected values in [{lowest}, {num_experts}), got min {low} and "
                f"max {high}"
            )
    out_TH = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=hidden_TH.device)
    # HF walks the hit experts in increasing order and, within one, the pairs slot-major.
    ids_KT = ids_TK.T
    for expert in torch.unique(ids_KT).tolist():
        if expert == MASKED_ID:
            continue
        slot_N, token_N = torch.where(ids_KT == expert)
        gate_NI, up_NI = F.linear(hidden_TH[token_N], gate_up_proj_EFH[expert]).chunk(2, dim=-1)
        down_NH = F.linear(F.silu(gate_NI) * up_NI, down_proj_EHI[expert])
        weighted_NH = down_NH * topk_weights_TK[token_N, slot_N, None]
        out_TH.index_add_(0, token_N, weighted_NH.float())
    return out_TH.to(hidden_TH.dtype)


def fused_experts_triton(
    hidden_TH: torch.Tensor,
    gate_up_proj_EFH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    *,
    config: FusedMoeConfig | None = None,
    masked: bool = False,
    invariant: bool = False,
) -> torch.Tensor:
    """``fused_experts`` through the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``config`` overrides ``default_config`` (benchmarks, tests of other tile shapes); ``masked``
    as for ``fused_experts``. No host sync and fixed-size buffers for a fixed ``T``: safe to
    capture in a CUDA graph. ``invariant``: batch-invariant (``INVARIANT_CONFIGS``' tiles
    whatever ``T``, the slots summed in slot order in fp32), the CUDA path of
    ``routing_kernels.batch_invariant.experts``.
    """
    num_tokens, hidden, num_experts, inter, top_k = _check_inputs(
        hidden_TH, gate_up_proj_EFH, down_proj_EHI, topk_weights_TK, topk_ids_TK
    )
    if config is None:
        config = (
            INVARIANT_CONFIGS[hidden_TH.dtype]
            if invariant
            else default_config(num_tokens, top_k, num_experts, hidden_TH.dtype)
        )
    elif not isinstance(config, FusedMoeConfig):
        raise TypeError(f"config: expected a FusedMoeConfig or None, got {type(config).__name__}")
    if num_tokens == 0:
        return hidden_TH.new_empty((0, hidden))
    num_pairs = num_tokens * top_k
    alignment = moe_align(topk_ids_TK, num_experts, config.block_m)
    weights_P = topk_weights_TK.reshape(-1)
    if not weights_P.is_contiguous():
        weights_P = weights_P.contiguous()

    act_PI = hidden_TH.new_empty((num_pairs, inter))
    _grouped_gemm(
        hidden_TH,
        gate_up_proj_EFH,
        act_PI,
        weights_P,
        alignment,
        config.gate_up,
        n=inter,
        k=hidden,
        rows_per_a_row=top_k,
        gated=True,
    )
    # Masked pairs get no GEMM program: their output rows must read as zeros in the sum.
    allocate = hidden_TH.new_zeros if masked else hidden_TH.new_empty
    out_TH = allocate((num_tokens, hidden))
    # With one slot per token the weighted pair outputs are the result already.
    out_PH = out_TH if top_k == 1 else allocate((num_pairs, hidden))
    _grouped_gemm(
        act_PI,
        down_proj_EHI,
        out_PH,
        weights_P,
        alignment,
        config.down,
        n=hidden,
        k=inter,
        rows_per_a_row=1,
        gated=False,
    )
    if top_k > 1 and invariant:
        out_TKH = out_PH.view(num_tokens, top_k, hidden)
        acc_TH = out_TKH[:, 0].float()
        for slot in range(1, top_k):
            acc_TH = acc_TH + out_TKH[:, slot].float()
        out_TH.copy_(acc_TH)
    elif top_k > 1:
        # torch reductions of half types accumulate in fp32 before the one final rounding.
        torch.sum(out_PH.view(num_tokens, top_k, hidden), dim=1, out=out_TH)
    return out_TH


def _check_inputs(
    hidden_TH: torch.Tensor,
    gate_up_proj_EFH: torch.Tensor,
    down_proj_EHI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices (no data-dependent check); return T, H, E, I, K."""
    tensors = {
        "hidden_TH": hidden_TH,
        "gate_up_proj_EFH": gate_up_proj_EFH,
        "down_proj_EHI": down_proj_EHI,
        "topk_weights_TK": topk_weights_TK,
        "topk_ids_TK": topk_ids_TK,
    }
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    for name, ndim, dims in (
        ("hidden_TH", 2, "[T, H]"),
        ("gate_up_proj_EFH", 3, "[E, 2*I, H]"),
        ("down_proj_EHI", 3, "[E, H, I]"),
        ("topk_weights_TK", 2, "[T, K]"),
        ("topk_ids_TK", 2, "[T, K]"),
    ):
        if tensors[name].ndim != ndim:
            raise ValueError(
                f"{name}: expected {ndim} dims {dims}, got shape {tuple(tensors[name].shape)}"
            )
    num_tokens, hidden = hidden_TH.shape
    num_experts, fused, gate_up_hidden = gate_up_proj_EFH.shape
    if hidden < 1:
        raise ValueError(
            f"hidden_TH: expected a hidden size >= 1, got shape {tuple(hidden_TH.shape)}"
        )
    if num_experts < 1 or fused < 2 or fused % 2:
        raise ValueError(
            f"gate_up_proj_EFH: expected E >= 1 experts and an even 2*I >= 2 rows, "
            f"got shape {tuple(gate_up_proj_EFH.shape)}"
        )
    if gate_up_hidden != hidden:
        raise ValueError(
            f"gate_up_proj_EFH: expected last dim {hidden} (hidden_TH's H), got shape "
            f"{tuple(gate_up_proj_EFH.shape)}"
        )
    inter = fused // 2
    if tuple(down_proj_EHI.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"down_proj_EHI: expected shape {(num_experts, hidden, inter)} [E, H, I], got "
            f"{tuple(down_proj_EHI.shape)}"
        )
    if topk_ids_TK.shape[0] != num_tokens or topk_ids_TK.shape[1] < 1:
        raise ValueError(
            f"topk_ids_TK: expected shape [{num_tokens}, K] with K >= 1, "
            f"got {tuple(topk_ids_TK.shape)}"
        )
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(
            f"topk_weights_TK: expected shape {tuple(topk_ids_TK.shape)} (topk_ids_TK's), got "
            f"{tuple(topk_weights_TK.shape)}"
        )
    if hidden_TH.dtype not in _ACTIVATION_DTYPES:
        raise ValueError(
            f"hidden_TH: expected dtype float16, bfloat16 or float32, got {hidden_TH.dtype}"
        )
    for name in ("gate_up_proj_EFH", "down_proj_EHI"):
        if tensors[name].dtype != hidden_TH.dtype:
            raise ValueError(
                f"{name}: expected dtype {hidden_TH.dtype} (hidden_TH's), got {tensors[name].dtype}"
            )
    if not topk_weights_TK.dtype.is_floating_point:
        raise ValueError(f"topk_weights_TK: expected a floating dtype, got {topk_weights_TK.dtype}")
    if (
        topk_ids_TK.dtype.is_floating_point
        or topk_ids_TK.dtype.is_complex
        or topk_ids_TK.dtype == torch.bool
    ):
        raise ValueError(f"topk_ids_TK: expected an integer dtype, got {topk_ids_TK.dtype}")
    for name, tensor in tensors.items():
        if tensor.device != hidden_TH.device:
            raise ValueError(
                f"{name}: expected device {hidden_TH.device} (hidden_TH's), got {tensor.device}"
            )
    return num_tokens, hidden, num_experts, inter, topk_ids_TK.shape[1]


def _grouped_gemm(
    a: torch.Tensor,
    b_ENK: torch.Tensor,
    c_PN: torch.Tensor,
    weights_P: torch.Tensor,
    alignment: MoeAlignment,
    tiles: GemmTiles,
    *,
    n: int,
    k: int,
    rows_per_a_row: int,
    gated: bool,
) -> None:
    """Launch one grouped GEMM: ``c[p] = epilogue(a[p // rows_per_a_row] @ b[expert(p)].T)``.

    Gated (GEMM 1): ``b`` rows ``[0, n)`` are the gate, ``[n, 2n)`` the up projection and the
    epilogue is ``silu(gate) * up``. Otherwise (GEMM 2) the epilogue scales by the pair's weight.
    """
    num_blocks_m = alignment.expert_ids_B.numel()
    grid = (num_blocks_m * triton.cdiv(n, tiles.block_n),)
    _grouped_gemm_kernel[grid](
        a,
        b_ENK,
        c_PN,
        weights_P,
        alignment.sorted_pair_ids,
        alignment.expert_ids_B,
        alignment.num_post_padded,
        c_PN.shape[0],
        n,
        k,
        num_blocks_m,
        a.stride(0),
        a.stride(1),
        b_ENK.stride(0),
        b_ENK.stride(1),
        b_ENK.stride(2),
        c_PN.stride(0),
        c_PN.stride(1),
        A_ROW_DIV=rows_per_a_row,
        GATED=gated,
        EVEN_K=k % tiles.block_k == 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=alignment.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_pair_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    num_pairs,
    N,
    K,
    num_blocks_m,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share each column tile, and low program ids get the
    # low row blocks, which are the ones in use.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_blocks_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_ids = tl.load(sorted_pair_ids_ptr + offs_m)
    pair_mask = pair_ids < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped columns keep weight loads in bounds without a mask; their results are not stored.
    offs_bn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pair_ids // A_ROW_DIV).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        up_ptrs = b_ptrs + N * stride_bn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k_step in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=pair_mask[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k_step * BLOCK_K
            a = tl.load(a_ptrs, mask=pair_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            if EVEN_K:
                b_up = tl.load(up_ptrs)
            else:
                b_up = tl.load(up_ptrs, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            up_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        weights = tl.load(weights_ptr + pair_ids, mask=pair_mask, other=0.0).to(tl.float32)
        acc = acc * weights[:, None]
    c_ptrs = c_ptr + pair_ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = pair_mask[:, None] & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
