"""RoutedExpertsCapturer: the DP rule, the buffer dtypes, and the fused kernel path == capture().

Legend: T tokens (rows), E experts, L MoE layers, K top_k.

``TRITON_INTERPRET=1 python -m pytest -m triton tests/rollout/test_capturer.py`` runs the
Triton routing kernel's fused capture on CPU (on CUDA when there is a device).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from rollout.capture import DPMetadata, RoutedExpertsCapturer, compact_id_dtype
from routing_kernels.route import route, route_triton
from routing_kernels.routing_method import RoutingMethod

DTYPES = [torch.uint8, torch.int16, torch.int32]
# (method, E, K, extra route kwargs): every method, grouped DeepSeek-V3 included.
ROUTES = [
    (RoutingMethod.DEFAULT, 16, 4, {}),
    (RoutingMethod.RENORMALIZE, 60, 2, {}),
    (RoutingMethod.RENORMALIZE_NAIVE, 8, 8, {}),
    (
        RoutingMethod.DEEPSEEK_V3,
        32,
        4,
        {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    ),
    (RoutingMethod.LLAMA4, 16, 1, {}),
]


def _random_ids(rows: int, num_experts: int, top_k: int, rng: torch.Generator) -> torch.Tensor:
    """Distinct int32 ids per row: the first K of a random permutation of the experts."""
    return torch.rand(rows, num_experts, generator=rng).argsort(dim=1)[:, :top_k].to(torch.int32)


def _random_counts(num_ranks: int, rng: torch.Generator, high: int = 9) -> list[int]:
    return torch.randint(0, high, (num_ranks,), generator=rng).tolist()


def _sentinel_capturer(
    rows: int, layers: int, top_k: int, dtype: torch.dtype, *, device="cpu", dp_rank: int = 0
) -> RoutedExpertsCapturer:
    """A capturer whose buffer holds a value no capture writes here (to see what was written)."""
    capturer = RoutedExpertsCapturer(
        rows, layers, top_k, device=device, dtype=dtype, dp_rank=dp_rank
    )
    capturer.buffer.fill_(255 if dtype == torch.uint8 else -7)
    return capturer


def _route_kwargs(method: RoutingMethod, num_experts: int, extra: dict, rng: torch.Generator):
    kwargs = dict(extra)
    if method is RoutingMethod.DEEPSEEK_V3:
        kwargs["correction_bias"] = 0.1 * torch.randn(num_experts, generator=rng)
    return kwargs


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def test_dp_metadata_is_a_validated_frozen_tuple():
    meta = DPMetadata(num_tokens_across_dp=[3, 0, 5])
    assert meta.num_tokens_across_dp == (3, 0, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.num_tokens_across_dp = (1,)
    with pytest.raises(ValueError, match="at least one rank"):
        DPMetadata(num_tokens_across_dp=())
    with pytest.raises(ValueError, match=r"num_tokens_across_dp\[1\]: expected >= 0, got -2"):
        DPMetadata(num_tokens_across_dp=[1, -2])
    with pytest.raises(TypeError, match=r"num_tokens_across_dp\[0\]"):
        DPMetadata(num_tokens_across_dp=[True])
    with pytest.raises(TypeError, match=r"num_tokens_across_dp\[0\]"):
        DPMetadata(num_tokens_across_dp=[1.0])
    with pytest.raises(TypeError, match="num_tokens_across_dp"):
        DPMetadata(num_tokens_across_dp=5)


def test_compact_id_dtype_boundaries():
    cases = {1: torch.uint8, 256: torch.uint8, 257: torch.int16, 32768: torch.int16}
    cases[32769] = torch.int32
    for num_experts, dtype in cases.items():
        assert compact_id_dtype(num_experts) == dtype
    with pytest.raises(ValueError, match="num_experts: expected >= 1, got 0"):
        compact_id_dtype(0)
    with pytest.raises(TypeError, match="num_experts"):
        compact_id_dtype(8.0)


def test_capturer_buffer_and_dtypes():
    capturer = RoutedExpertsCapturer(6, 3, 2, device="cpu")
    assert capturer.dtype == torch.int16  # dtype=None
    assert capturer.buffer.shape == (6, 3, 2) and capturer.buffer.device.type == "cpu"
    assert not capturer.buffer.any()
    for dtype in DTYPES:
        assert RoutedExpertsCapturer(6, 3, 2, device="cpu", dtype=dtype).buffer.dtype == dtype
    with pytest.raises(ValueError, match="dtype: expected torch.uint8, torch.int16 or torch.int32"):
        RoutedExpertsCapturer(6, 3, 2, device="cpu", dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        RoutedExpertsCapturer(6, 3, 2, device="cpu", dtype="int16")
    for field, args, kwargs in [
        ("max_num_tokens", (0, 3, 2), {}),
        ("num_moe_layers", (6, 0, 2), {}),
        ("top_k", (6, 3, 0), {}),
        ("dp_rank", (6, 3, 2), {"dp_rank": -1}),
    ]:
        with pytest.raises(ValueError, match=field):
            RoutedExpertsCapturer(*args, device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------
# capture(): rows and the DP rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_capture_without_metadata_writes_rows_0_to_n(dtype, rng):
    num_experts = {torch.uint8: 256, torch.int16: 32768, torch.int32: 40000}[dtype]
    capturer = _sentinel_capturer(10, 3, 4, dtype)
    before = capturer.buffer.clone()
    ids = _random_ids(7, num_experts, 4, rng)
    assert capturer.capture(1, ids) == 7
    expected = before.clone()
    expected[:7, 1] = ids.to(dtype)
    assert torch.equal(capturer.buffer, expected)
    # The largest id of the dtype's range survives the cast.
    top = torch.full((2, 4), num_experts - 1, dtype=torch.int64)
    capturer.capture(2, top)
    assert capturer.buffer[:2, 2].to(torch.int64).eq(num_experts - 1).all()


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_capture_dp_rule(num_ranks, rng):
    counts = _random_counts(num_ranks, rng)
    counts[0] = max(counts[0], 1)
    total = sum(counts)
    ids = _random_ids(total, 64, 2, rng)
    offsets = list(itertools.accumulate([0, *counts]))
    meta = DPMetadata(num_tokens_across_dp=counts)
    for rank in range(num_ranks):
        mine = counts[rank]
        # All ranks' tokens: this rank's slice lands in rows [0, n_r).
        capturer = _sentinel_capturer(40, 2, 2, torch.int16, dp_rank=rank)
        before = capturer.buffer.clone()
        assert capturer.capture(1, ids, meta) == mine
        expected = before.clone()
        expected[:mine, 1] = ids[offsets[rank] : offsets[rank + 1]].to(torch.int16)
        assert torch.equal(capturer.buffer, expected)
        assert capturer.rank_rows(total, meta) == (offsets[rank], offsets[rank + 1])
        # Only this rank's tokens (local routing): all rows are its own.
        if mine != total:
            local = _random_ids(mine, 64, 2, rng)
            capturer.capture(0, local, meta)
            assert torch.equal(capturer.buffer[:mine, 0], local.to(torch.int16))
            assert capturer.rank_rows(mine, meta) == (0, mine)
        # No metadata: every row.
        assert capturer.capture(0, ids) == total


def test_capture_dp_rule_rejects_other_batch_sizes_before_writing(rng):
    counts = [3, 5, 2]
    meta = DPMetadata(num_tokens_across_dp=counts)
    capturer = _sentinel_capturer(16, 2, 2, torch.int16, dp_rank=1)
    before = capturer.buffer.clone()
    for bad in (4, 9, 11, 0):
        ids = _random_ids(bad, 64, 2, rng)
        with pytest.raises(ValueError) as info:
            capturer.capture(1, ids, meta)
        message = str(info.value)
        assert "unexpected topk_ids batch dim" in message
        assert f"dim {bad}:" in message
        assert "= 10" in message and "num_tokens_across_dp[1] = 5" in message
        assert "[3, 5, 2]" in message
        assert torch.equal(capturer.buffer, before)
    # A rank without an entry in the metadata.
    far = _sentinel_capturer(16, 2, 2, torch.int16, dp_rank=3)
    with pytest.raises(ValueError, match="dp_rank 3"):
        far.capture(0, _random_ids(10, 64, 2, rng), meta)
    assert torch.equal(far.buffer, before)


def test_capture_rejects_bad_inputs_before_writing(rng):
    capturer = _sentinel_capturer(4, 2, 2, torch.int16)
    before = capturer.buffer.clone()
    ids = _random_ids(3, 16, 2, rng)
    cases = [
        (ValueError, r"layer: expected an MoE layer index in \[0, 2\), got 2", (2, ids)),
        (ValueError, "layer: expected >= 0", (-1, ids)),
        (TypeError, "layer", (1.0, ids)),
        (ValueError, r"topk_ids: expected shape \[n, 2\]", (0, _random_ids(3, 16, 3, rng))),
        (ValueError, r"topk_ids: expected shape \[n, 2\]", (0, ids.flatten())),
        (ValueError, "topk_ids: expected an integer dtype", (0, ids.float())),
        (ValueError, "topk_ids: expected an integer dtype", (0, ids.bool())),
        (ValueError, "topk_ids: expected device cpu", (0, ids.to("meta"))),
        (TypeError, "topk_ids: expected a torch.Tensor", (0, ids.tolist())),
        (ValueError, "max_num_tokens = 4 rows", (0, _random_ids(5, 16, 2, rng))),
        (TypeError, "dp: expected a DPMetadata", (0, ids, [3])),
    ]
    for error, pattern, args in cases:
        with pytest.raises(error, match=pattern):
            capturer.capture(*args)
        assert torch.equal(capturer.buffer, before)


def test_layer_view_is_a_view_of_the_buffer(rng):
    capturer = RoutedExpertsCapturer(8, 3, 4, device="cpu", dtype=torch.uint8)
    view = capturer.layer_view(2, 5)
    assert view.shape == (5, 4) and view.stride() == (12, 1)
    ids = _random_ids(5, 200, 4, rng)
    view.copy_(ids)
    assert torch.equal(capturer.buffer[:5, 2], ids.to(torch.uint8))
    assert capturer.layer_view(0, 0).shape == (0, 4)
    with pytest.raises(ValueError, match="num_tokens: expected <= max_num_tokens = 8, got 9"):
        capturer.layer_view(0, 9)
    with pytest.raises(ValueError, match=r"layer: expected an MoE layer index in \[0, 3\)"):
        capturer.layer_view(3, 1)


# --------------------------------------------------------------------------------------------
# The fused path (routing kernel writes through capture_out) == capture()
# --------------------------------------------------------------------------------------------


def _check_fused_equals_capture(route_fn, device, dtype, rng):
    num_tokens, num_layers = 11, 3
    for method, num_experts, top_k, extra in ROUTES:
        fused = _sentinel_capturer(16, num_layers, top_k, dtype, device=device)
        entry = _sentinel_capturer(16, num_layers, top_k, dtype, device=device)
        for layer in range(num_layers):
            logits = 3.0 * torch.randn(num_tokens, num_experts, generator=rng)
            kwargs = _route_kwargs(method, num_experts, extra, rng)
            logits = logits.to(device)
            kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            _, fused_ids = route_fn(
                logits, top_k, method, capture_out=fused.layer_view(layer, num_tokens), **kwargs
            )
            _, ids = route_fn(logits, top_k, method, **kwargs)
            assert torch.equal(fused_ids, ids)
            entry.capture(layer, ids)
        assert torch.equal(fused.buffer.cpu(), entry.buffer.cpu()), method


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_capture_equals_capture_entry(dtype, rng):
    _check_fused_equals_capture(route, torch.device("cpu"), dtype, rng)


def test_fused_capture_of_the_rank_slice_equals_dp_capture(rng):
    counts = [4, 0, 7, 3]
    meta = DPMetadata(num_tokens_across_dp=counts)
    total = sum(counts)
    for rank in range(len(counts)):
        fused = _sentinel_capturer(16, 2, 2, torch.uint8, dp_rank=rank)
        entry = _sentinel_capturer(16, 2, 2, torch.uint8, dp_rank=rank)
        for layer in range(2):
            logits = 3.0 * torch.randn(total, 32, generator=rng)
            start, stop = fused.rank_rows(total, meta)
            route(
                logits[start:stop],
                2,
                "renormalize",
                capture_out=fused.layer_view(layer, stop - start),
            )
            _, ids = route(logits, 2, "renormalize")
            entry.capture(layer, ids, meta)
        assert torch.equal(fused.buffer, entry.buffer), rank


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_triton_fused_capture_equals_capture_entry(dtype, triton_device, rng):
    _check_fused_equals_capture(route_triton, triton_device, dtype, rng)
