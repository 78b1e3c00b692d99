"""RoutedExperts.from_sglang checks the payload's byte length against the declared shape
instead of reinterpreting other element sizes (issue 13, section 5).

Before: an int64 payload of n rows came back as 2n rows of int32 (ids like ``[[2, 0], [6, 0]]``).
"""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import torch

from replay.routed_experts import RoutedExperts

HIDDEN, TOP_K, EXPERTS, MOE_LAYERS = 3, 2, 8, [1, 2]


@pytest.fixture
def gen(rng: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(rng.initial_seed())


def all_layer_ids(gen: np.random.Generator, rows: int) -> np.ndarray:
    """``[rows, HIDDEN, TOP_K]`` distinct ids per (row, layer), every layer filled."""
    return np.argsort(gen.random((rows, HIDDEN, EXPERTS)), axis=2)[:, :, :TOP_K]


def encode(ids: np.ndarray, fmt: str) -> bytes:
    """Base64 of the flat ids packed by ``struct`` (independent of numpy's byte handling)."""
    return base64.b64encode(struct.pack(f"<{ids.size}{fmt}", *ids.ravel().tolist()))


def from_sglang(payload: bytes, **kwargs: object) -> RoutedExperts:
    return RoutedExperts.from_sglang(
        payload,
        **{
            "num_hidden_layers": HIDDEN,
            "top_k": TOP_K,
            "moe_layers": MOE_LAYERS,
            "num_experts": EXPERTS,
            **kwargs,
        },
    )


def test_int32_payload_of_the_declared_rows_is_read(gen: np.random.Generator) -> None:
    rows = int(gen.integers(1, 20))
    ids = all_layer_ids(gen, rows)
    trace = from_sglang(encode(ids, "i"), num_rows=rows, start=4)
    np.testing.assert_array_equal(trace.ids, ids[:, MOE_LAYERS])
    assert trace.num_rows == rows and trace.start == 4


def test_int64_payload_is_rejected_naming_both_sizes(gen: np.random.Generator) -> None:
    rows = int(gen.integers(1, 20))
    payload = encode(all_layer_ids(gen, rows), "q")  # int64: the wrong element size
    expected, actual = 4 * rows * HIDDEN * TOP_K, 8 * rows * HIDDEN * TOP_K
    with pytest.raises(
        ValueError,
        match=rf"payload: expected {expected} bytes \(int32 x num_rows {rows} x num_hidden_layers "
        rf"{HIDDEN} x top_k {TOP_K}\), got {actual} bytes, 8 bytes per id where int32 has 4",
    ):
        from_sglang(payload, num_rows=rows)


@pytest.mark.parametrize("declared", [0, 1, 5])
def test_any_other_row_count_is_rejected(gen: np.random.Generator, declared: int) -> None:
    payload = encode(all_layer_ids(gen, 3), "i")
    with pytest.raises(
        ValueError,
        match=rf"expected {4 * declared * HIDDEN * TOP_K} bytes .* got "
        rf"{4 * 3 * HIDDEN * TOP_K} bytes",
    ):
        from_sglang(payload, num_rows=declared)


def test_an_empty_payload_matches_zero_rows() -> None:
    assert from_sglang(b"", num_rows=0).num_rows == 0


@pytest.mark.parametrize(("num_rows", "error"), [(-1, ValueError), (2.0, TypeError)])
def test_bad_num_rows_is_named(gen: np.random.Generator, num_rows: object, error: type) -> None:
    with pytest.raises(error, match="num_rows"):
        from_sglang(encode(all_layer_ids(gen, 2), "i"), num_rows=num_rows)
