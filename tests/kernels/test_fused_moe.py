"""Tests of routing_kernels.fused_moe and routing_kernels.moe_align: float64 oracle, HF
Qwen3MoeExperts, errors.

Legend: T tokens, H hidden size, E experts, I expert intermediate size, K experts per token,
P = T*K (token, slot) pairs.

Plain ``python -m pytest tests/kernels/test_fused_moe.py`` runs the reference tests;
``TRITON_INTERPRET=1 python -m pytest tests/kernels/test_fused_moe.py`` adds the Triton
ones on CPU (they run on CUDA when there is a device, plus the bf16, larger and CUDA-graph cases).
"""

from __future__ import annotations

import pytest
import torch

from routing_kernels.fused_moe import (
    FusedMoeConfig,
    GemmTiles,
    default_config,
    fused_experts,
    fused_experts_reference,
    fused_experts_triton,
)
from routing_kernels.moe_align import max_padded_pairs, moe_align, moe_align_reference

# (T, E, K, H, I): T in {1, 5, 33}, E in {4, 8, 60}, K in {1, 2, 4}, H in {32, 64}, I in {16, 48}
# (48 is no multiple of the column tiles; H = 32 is short of one reduction step).
SHAPES = [
    (1, 4, 1, 32, 16),
    (5, 8, 2, 64, 48),
    (33, 60, 4, 32, 16),
    (33, 8, 4, 64, 48),
    (5, 60, 1, 64, 16),
]
ID_DTYPES = [torch.int32, torch.int64, torch.int16, torch.uint8]


def _random_ids(T: int, E: int, K: int, rng: torch.Generator, dtype=torch.int32) -> torch.Tensor:
    """Distinct random ids per row: the first K of a random permutation of the experts."""
    return torch.rand(T, E, generator=rng).argsort(dim=1)[:, :K].to(dtype)


def _random_problem(
    T: int, E: int, K: int, H: int, I: int, rng: torch.Generator, dtype=torch.float32
) -> tuple[torch.Tensor, ...]:
    """hidden, gate_up, down, weights, ids on CPU; weights scaled so activations stay O(1)."""
    hidden_TH = torch.randn(T, H, generator=rng).to(dtype)
    gate_up_EFH = (torch.randn(E, 2 * I, H, generator=rng) / H**0.5).to(dtype)
    down_EHI = (torch.randn(E, H, I, generator=rng) / I**0.5).to(dtype)
    weights_TK = torch.rand(T, K, generator=rng)
    ids_TK = _random_ids(T, E, K, rng)
    return hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK


def _oracle(
    hidden_TH: torch.Tensor,
    gate_up_EFH: torch.Tensor,
    down_EHI: torch.Tensor,
    weights_TK: torch.Tensor,
    ids_TK: torch.Tensor,
) -> torch.Tensor:
    """Each token's sum over its slots of weight * down(silu(gate x) * up x), in float64.

    Written out per (token, slot) pair, the pairs of one expert batched so that large CUDA
    cases stay cheap.
    """
    x_TH = hidden_TH.cpu().double()
    ids_TK = ids_TK.cpu().long()
    w_TK = weights_TK.cpu().double()
    gate_up_EFH, down_EHI = gate_up_EFH.cpu().double(), down_EHI.cpu().double()
    inter = down_EHI.shape[2]
    out_TH = torch.zeros_like(x_TH)
    for expert in range(gate_up_EFH.shape[0]):
        token_N, slot_N = torch.nonzero(ids_TK == expert, as_tuple=True)
        gate_up_NF = x_TH[token_N] @ gate_up_EFH[expert].T
        gate_NI, up_NI = gate_up_NF[:, :inter], gate_up_NF[:, inter:]
        act_NI = gate_NI / (1.0 + torch.exp(-gate_NI)) * up_NI
        out_NH = act_NI @ down_EHI[expert].T
        out_TH.index_add_(0, token_N, out_NH * w_TK[token_N, slot_N, None])
    return out_TH


def _to(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)


def _assert_matches_oracle(
    out_TH: torch.Tensor, oracle_TH: torch.Tensor, dtype: torch.dtype
) -> None:
    assert out_TH.shape == oracle_TH.shape
    assert out_TH.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = max(1.0, oracle_TH.abs().max().item())
    torch.testing.assert_close(out_TH.cpu().double(), oracle_TH, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------------------------
# Reference (CPU, always runs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_oracle(shape, dtype, rng):
    problem = _random_problem(*shape, rng, dtype)
    _assert_matches_oracle(fused_experts_reference(*problem), _oracle(*problem), dtype)


def test_cpu_dispatch_is_reference(rng):
    problem = _random_problem(5, 8, 2, 32, 16, rng)
    assert torch.equal(fused_experts(*problem), fused_experts_reference(*problem))


def _hf_experts(gate_up_EFH: torch.Tensor, down_EHI: torch.Tensor) -> torch.nn.Module:
    """transformers' own Qwen3MoeExperts (eager forward) holding the given weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    num_experts, fused, hidden = gate_up_EFH.shape
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=fused // 2,
        num_experts=num_experts,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    experts = Qwen3MoeExperts(config).to(gate_up_EFH.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_EFH)
        experts.down_proj.copy_(down_EHI)
    return experts


@pytest.mark.parametrize("shape", [(5, 8, 2, 32, 16), (33, 60, 4, 64, 48)])
def test_reference_matches_hf_qwen3_moe_experts(shape, rng):
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK = _random_problem(*shape, rng)
    with torch.no_grad():
        hf_TH = _hf_experts(gate_up_EFH, down_EHI)(hidden_TH, ids_TK.long(), weights_TK)
    ours_TH = fused_experts_reference(hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK)
    torch.testing.assert_close(ours_TH, hf_TH, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids_dtype", ID_DTYPES)
def test_reference_ids_dtypes(ids_dtype, rng):
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK = _random_problem(5, 60, 4, 32, 16, rng)
    out_TH = fused_experts_reference(
        hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK.to(ids_dtype)
    )
    _assert_matches_oracle(
        out_TH, _oracle(hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK), torch.float32
    )


def test_reference_rejects_ids_out_of_range(rng):
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK = _random_problem(5, 8, 2, 32, 16, rng)
    ids_TK[3, 1] = 8
    with pytest.raises(
        ValueError, match=r"topk_ids_TK: expected values in \[0, 8\), got min \d and max 8"
    ):
        fused_experts_reference(hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK)
    ids_TK[3, 1] = -1
    with pytest.raises(ValueError, match="topk_ids_TK: expected values in"):
        fused_experts_reference(hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK)


# --------------------------------------------------------------------------------------------
# Triton path (CUDA, or CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_oracle(shape, triton_device, rng):
    problem = _random_problem(*shape, rng)
    out_TH = fused_experts_triton(*_to(triton_device, *problem))
    _assert_matches_oracle(out_TH, _oracle(*problem), torch.float32)


@pytest.mark.triton
def test_triton_matches_hf_qwen3_moe_experts(triton_device, rng):
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK = _random_problem(33, 60, 4, 64, 48, rng)
    with torch.no_grad():
        hf_TH = _hf_experts(gate_up_EFH, down_EHI)(hidden_TH, ids_TK.long(), weights_TK)
    ours_TH = fused_experts_triton(
        *_to(triton_device, hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK)
    )
    torch.testing.assert_close(ours_TH.cpu(), hf_TH, rtol=1e-5, atol=1e-5)


# block_m 32 / 64 / 128 (the prefill paths) with tiles that leave partial reduction steps
# (H = 48 or I = 24 against block_k 32) and grouped row ordering.
OTHER_CONFIGS = [
    FusedMoeConfig(
        block_m=32,
        gate_up=GemmTiles(block_n=16, block_k=32, group_m=2),
        down=GemmTiles(block_n=32, block_k=32, group_m=3),
    ),
    FusedMoeConfig(
        block_m=64,
        gate_up=GemmTiles(block_n=32, block_k=16),
        down=GemmTiles(block_n=16, block_k=32, group_m=4),
    ),
    FusedMoeConfig(
        block_m=128,
        gate_up=GemmTiles(block_n=16, block_k=64),
        down=GemmTiles(block_n=64, block_k=16),
    ),
]


@pytest.mark.triton
@pytest.mark.parametrize("config", OTHER_CONFIGS, ids=lambda c: f"block_m{c.block_m}")
def test_triton_other_tiles(config, triton_device, rng):
    problem = _random_problem(40, 4, 2, 48, 24, rng)
    out_TH = fused_experts_triton(*_to(triton_device, *problem), config=config)
    _assert_matches_oracle(out_TH, _oracle(*problem), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_all_tokens_to_the_same_experts(top_k, triton_device, rng):
    """Every token picks the same experts: one expert's blocks carry all pairs, the rest none."""
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, _ = _random_problem(33, 8, top_k, 32, 16, rng)
    ids_TK = torch.tensor([5, 2][:top_k], dtype=torch.int32).expand(33, top_k)
    problem = (hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK)
    out_TH = fused_experts_triton(*_to(triton_device, *problem))
    _assert_matches_oracle(out_TH, _oracle(*problem), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("ids_dtype", ID_DTYPES)
def test_triton_ids_dtypes(ids_dtype, triton_device, rng):
    hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK = _random_problem(5, 60, 4, 32, 16, rng)
    inputs = _to(triton_device, hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK.to(ids_dtype))
    out_TH = fused_experts_triton(*inputs)
    _assert_matches_oracle(
        out_TH, _oracle(hidden_TH, gate_up_EFH, down_EHI, weights_TK, ids_TK), torch.float32
    )


@pytest.mark.triton
def test_triton_strided_inputs(triton_device, rng):
    """Views with arbitrary strides, made on the device: a column slice of the hidden states,
    K-major weights, every other column of the routing tensors."""
    T, E, K, H, I = 5, 8, 2, 32, 16
    wide_TH, gate_up_EHF, down_EIH, wide_weights_TK, wide_ids_TK = _to(
        triton_device,
        torch.randn(T, H + 7, generator=rng),
        torch.randn(E, H, 2 * I, generator=rng) / H**0.5,
        torch.randn(E, I, H, generator=rng) / I**0.5,
        torch.rand(T, 2 * K, generator=rng),
        _random_ids(T, E, 2 * K, rng),
    )
    problem = (
        wide_TH[:, 3 : 3 + H],
        gate_up_EHF.transpose(1, 2),
        down_EIH.transpose(1, 2),
        wide_weights_TK[:, ::2],
        wide_ids_TK[:, ::2],
    )
    assert not any(t.is_contiguous() for t in problem)
    _assert_matches_oracle(fused_experts_triton(*problem), _oracle(*problem), torch.float32)


@pytest.mark.triton
def test_triton_never_reads_past_the_reduction(triton_device, rng):
    """NaN right after each row of hidden and weights (H, I short of a reduction step): any
    read beyond H or I, even one multiplied by a masked zero, would turn the output into NaN."""
    T, E, K, H, I = 5, 8, 2, 32, 16
    nan = float("nan")
    problem = _random_problem(T, E, K, H, I, rng)
    hidden_TH, gate_up_EFH, down_EHI = (
        torch.nn.functional.pad(t, (0, 16), value=nan).to(triton_device)[..., : t.shape[-1]]
        for t in problem[:3]
    )
    out_TH = fused_experts_triton(
        hidden_TH, gate_up_EFH, down_EHI, *_to(triton_device, *problem[3:])
    )
    _assert_matches_oracle(out_TH, _oracle(*problem), torch.float32)


@pytest.mark.triton
def test_no_tokens(triton_device, rng):
    problem = _random_problem(0, 8, 2, 32, 16, rng)
    for out_TH in (
        fused_experts_reference(*problem),
        fused_experts_triton(*_to(triton_device, *problem)),
    ):
        assert out_TH.shape == (0, 32) and out_TH.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Token sorting
# --------------------------------------------------------------------------------------------


def _check_layout_spec(ids_TK: torch.Tensor, num_experts: int, block_m: int, alignment) -> None:
    """The layout of moe_align's docstring, checked from its definition."""
    ids_P = ids_TK.reshape(-1).long().cpu()
    num_pairs = ids_P.numel()
    sorted_ids = alignment.sorted_pair_ids.cpu().long()
    expert_ids = alignment.expert_ids_B.cpu().long()
    used = int(alignment.num_post_padded)
    assert sorted_ids.numel() == max_padded_pairs(num_pairs, num_experts, block_m)
    assert used % block_m == 0 and used <= sorted_ids.numel()
    position = 0
    for expert in range(num_experts):
        pairs = torch.nonzero(ids_P == expert).flatten()
        if pairs.numel() == 0:
            continue
        blocks = -(-pairs.numel() // block_m)
        assert (
            expert_ids[position // block_m : position // block_m + blocks].tolist()
            == [expert] * blocks
        )
        got = sorted_ids[position : position + blocks * block_m]
        assert got[: pairs.numel()].tolist() == pairs.tolist()
        assert (got[pairs.numel() :] == num_pairs).all()
        position += blocks * block_m
    assert used == position


@pytest.mark.parametrize(
    "T,E,K,block_m", [(1, 8, 2, 16), (33, 60, 4, 16), (40, 4, 2, 64), (0, 4, 2, 16)]
)
def test_align_reference_layout(T, E, K, block_m, rng):
    ids_TK = _random_ids(T, E, K, rng)
    _check_layout_spec(ids_TK, E, block_m, moe_align_reference(ids_TK, E, block_m))


# Pair counts from one program up to several chunks of the three-kernel path (P > 4 * 128),
# and uint8 ids with all 256 experts (a masked-off lane must not read as expert 255).
@pytest.mark.triton
@pytest.mark.parametrize(
    "T,E,K,block_m,ids_dtype",
    [
        (1, 8, 2, 16, torch.int32),
        (33, 60, 4, 16, torch.int64),
        (40, 4, 2, 64, torch.int32),
        (200, 8, 4, 32, torch.int16),
        (130, 128, 8, 16, torch.int32),
        (7, 300, 3, 64, torch.int32),
        (5, 256, 3, 16, torch.uint8),
        (70, 256, 8, 16, torch.uint8),
    ],
)
def test_align_triton_layout(T, E, K, block_m, ids_dtype, triton_device, rng):
    ids_TK = _random_ids(T, E, K, rng, ids_dtype)
    alignment = moe_align(ids_TK.to(triton_device), E, block_m)
    _check_layout_spec(ids_TK, E, block_m, alignment)


@pytest.mark.triton
@pytest.mark.parametrize("T", [5, 200])
def test_align_drops_ids_out_of_range(T, triton_device, rng):
    """Ids outside [0, E) (never produced by routing_kernels.route) are left out of the layout."""
    E, K, block_m = 8, 4, 16
    ids_TK = _random_ids(T, E, K, rng)
    ids_TK[0, 0], ids_TK[-1, 1] = E, -1
    _check_layout_spec(ids_TK, E, block_m, moe_align_reference(ids_TK, E, block_m))
    _check_layout_spec(ids_TK, E, block_m, moe_align(ids_TK.to(triton_device), E, block_m))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


# name -> (index of the argument replaced, its replacement from the good one, error, message)
BAD_INPUTS = {
    "hidden list": (0, lambda t: t.tolist(), TypeError, "hidden_TH: expected a torch.Tensor"),
    "hidden 3d": (0, lambda t: t[None], ValueError, r"hidden_TH: expected 2 dims \[T, H\]"),
    "gate_up 2d": (1, lambda t: t[0], ValueError, "gate_up_proj_EFH: expected 3 dims"),
    "gate_up odd": (
        1,
        lambda t: t[:, :-1],
        ValueError,
        "gate_up_proj_EFH: expected E >= 1 experts",
    ),
    "gate_up hidden": (
        1,
        lambda t: t[:, :, :-1],
        ValueError,
        "gate_up_proj_EFH: expected last dim 32",
    ),
    "down inter": (
        2,
        lambda t: t[:, :, :-1],
        ValueError,
        r"down_proj_EHI: expected shape \(8, 32, 16\)",
    ),
    "down experts": (
        2,
        lambda t: t[:-1],
        ValueError,
        r"down_proj_EHI: expected shape \(8, 32, 16\)",
    ),
    "ids rows": (4, lambda t: t[:-1], ValueError, r"topk_ids_TK: expected shape \[5, K\]"),
    "ids k=0": (
        4,
        lambda t: t[:, :0],
        ValueError,
        r"topk_ids_TK: expected shape \[5, K\] with K >= 1",
    ),
    "weights shape": (
        3,
        lambda t: t[:, :1],
        ValueError,
        r"topk_weights_TK: expected shape \(5, 2\)",
    ),
    "hidden int": (
        0,
        lambda t: t.long(),
        ValueError,
        "hidden_TH: expected dtype float16, bfloat16 or",
    ),
    "hidden f64": (
        0,
        lambda t: t.double(),
        ValueError,
        "hidden_TH: expected dtype float16, bfloat16 or",
    ),
    "down dtype": (
        2,
        lambda t: t.half(),
        ValueError,
        "down_proj_EHI: expected dtype torch.float32",
    ),
    "weights int": (
        3,
        lambda t: t.long(),
        ValueError,
        "topk_weights_TK: expected a floating dtype",
    ),
    "ids float": (4, lambda t: t.float(), ValueError, "topk_ids_TK: expected an integer dtype"),
    "ids bool": (4, lambda t: t > 3, ValueError, "topk_ids_TK: expected an integer dtype"),
    "device": (3, lambda t: t.to("meta"), ValueError, "topk_weights_TK: expected device cpu"),
}


@pytest.mark.parametrize("fn", [fused_experts, fused_experts_reference, fused_experts_triton])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise(case, fn, rng):
    index, corrupt, error, message = BAD_INPUTS[case]
    args = list(_random_problem(5, 8, 2, 32, 16, rng))
    args[index] = corrupt(args[index])
    with pytest.raises(error, match=message):
        fn(*args)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16, got 24"):
        GemmTiles(block_n=24, block_k=32)
    with pytest.raises(ValueError, match="block_k: expected a power of two >= 16, got 8"):
        GemmTiles(block_n=16, block_k=8)
    with pytest.raises(ValueError, match="group_m: expected >= 1, got 0"):
        GemmTiles(block_n=16, block_k=16, group_m=0)
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 8"):
        FusedMoeConfig(
            block_m=8,
            gate_up=GemmTiles(block_n=16, block_k=16),
            down=GemmTiles(block_n=16, block_k=16),
        )
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 48"):
        moe_align(torch.zeros(2, 2, dtype=torch.int32), 4, 48)
    with pytest.raises(ValueError, match="num_experts: expected >= 1, got 0"):
        moe_align_reference(torch.zeros(2, 2, dtype=torch.int32), 0, 16)


def test_default_config_block_m_follows_pairs_per_expert():
    """Decode gets 16-row blocks; block_m grows with the pairs each expert receives."""
    sizes = [default_config(T, 8, 128, torch.bfloat16).block_m for T in (1, 16, 64, 256, 512, 4096)]
    assert sizes[0] == sizes[1] == sizes[2] == 16
    assert sizes == sorted(sizes) and sizes[-1] == 128


# --------------------------------------------------------------------------------------------
# CUDA only: bf16, larger shapes, CUDA graphs, no host sync
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 128, 8, 256, 96),
        (257, 128, 8, 256, 96),
        (2048, 16, 2, 512, 384),
        (64, 128, 8, 2048, 768),
    ],
)
def test_cuda_half_types_match_oracle(shape, dtype, rng):
    problem = _random_problem(*shape, rng, dtype)
    oracle_TH = _oracle(*problem)
    out_TH = fused_experts(*_to(torch.device("cuda"), *problem))
    _assert_matches_oracle(out_TH, oracle_TH, dtype)
    # No less accurate than the HF-ordered reference on the same device, up to rounding noise.
    reference_TH = fused_experts_reference(*_to(torch.device("cuda"), *problem))
    ours_err = (out_TH.cpu().double() - oracle_TH).abs().mean()
    reference_err = (reference_TH.cpu().double() - oracle_TH).abs().mean()
    assert ours_err <= 1.5 * reference_err + 1e-6


@pytest.mark.gpu
def test_cuda_graph_replay_and_no_host_sync(rng):
    """One captured call replays correctly on new routing; the eager call never syncs."""
    cuda = torch.device("cuda")
    T, E, K, H, I = 16, 128, 8, 256, 96
    static = list(_to(cuda, *_random_problem(T, E, K, H, I, rng, torch.bfloat16)))
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_experts(*static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts(*static)  # warm-up compiles outside the capture
        with torch.cuda.graph(graph, stream=stream):
            out_TH = fused_experts(*static)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        fresh = _random_problem(T, E, K, H, I, rng, torch.bfloat16)
        static[0].copy_(fresh[0])
        static[3].copy_(fresh[3])
        static[4].copy_(fresh[4])
        graph.replay()
        eager_TH = fused_experts(*static)
        torch.testing.assert_close(out_TH, eager_TH, rtol=0, atol=0)
