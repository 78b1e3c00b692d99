"""RoutedExperts: validation, immutability, compact dtypes, .npz, extend, engine formats."""

from __future__ import annotations

import base64
import io
import re
import struct

import numpy as np
import pytest
import torch

from replay.routed_experts import RoutedExperts, compact_dtype


@pytest.fixture
def gen(rng: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from the per-test ``rng`` seed (printed on failure)."""
    return np.random.default_rng(rng.initial_seed())


def random_ids(
    gen: np.random.Generator, rows: int, layers: int, top_k: int, experts: int
) -> np.ndarray:
    """Distinct ids per (row, layer): the first k of a random permutation of the experts."""
    return np.argsort(gen.random((rows, layers, experts)), axis=2)[:, :, :top_k].astype(np.int64)


def random_layers(gen: np.random.Generator, count: int, total: int) -> list[int]:
    return sorted(int(x) for x in gen.choice(total, size=count, replace=False))


def random_trace(
    gen: np.random.Generator, *, rows: int | None = None, start: int = 0, valid: bool = False
):
    rows = int(gen.integers(1, 9)) if rows is None else rows
    experts = int(gen.integers(4, 40))
    top_k = int(gen.integers(1, min(experts - 1, 8) + 1))
    layers = random_layers(gen, int(gen.integers(1, 5)), 8)
    ids = random_ids(gen, rows, len(layers), top_k, experts)
    mask = gen.random(rows) < 0.7 if valid else None
    return RoutedExperts(ids, layers, experts, start=start, valid=mask)


# ---------------------------------------------------------------------- construction


def test_properties_follow_the_input(gen: np.random.Generator) -> None:
    rows, top_k, experts = (
        int(gen.integers(1, 12)),
        int(gen.integers(1, 5)),
        int(gen.integers(8, 300)),
    )
    layers = random_layers(gen, 3, 10)
    ids = random_ids(gen, rows, 3, top_k, experts)
    valid = gen.random(rows) < 0.5
    start = int(gen.integers(0, 100))
    trace = RoutedExperts(ids, layers, experts, start=start, valid=valid)
    np.testing.assert_array_equal(trace.ids, ids)
    assert trace.ids.dtype == (np.uint8 if experts <= 256 else np.int16)
    assert trace.moe_layers == tuple(layers) and isinstance(trace.moe_layers, tuple)
    assert (trace.num_experts, trace.start, trace.top_k) == (experts, start, top_k)
    assert trace.num_rows == len(trace) == rows
    np.testing.assert_array_equal(trace.valid, valid)
    assert RoutedExperts(ids, layers, experts).valid is None


def test_empty_trace_is_allowed() -> None:
    trace = RoutedExperts(np.zeros((0, 2, 3), dtype=np.int32), [1, 3], 8)
    assert len(trace) == 0 and trace.top_k == 3


def test_moe_layers_accept_any_integer_sequence(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 2, 3, 2, 8)
    a = RoutedExperts(ids, np.array([1, 4, 6]), 8)
    b = RoutedExperts(ids, range(1, 7, 2), 8)
    assert a.moe_layers == (1, 4, 6) and b.moe_layers == (1, 3, 5)
    assert all(type(layer) is int for layer in a.moe_layers)


@pytest.mark.parametrize(
    ("experts", "dtype"),
    [
        (1, np.uint8),
        (256, np.uint8),
        (257, np.int16),
        (32768, np.int16),
        (32769, np.int32),
        (10**6, np.int32),
    ],
)
def test_compact_dtype_boundaries(experts: int, dtype: type) -> None:
    assert compact_dtype(experts) == np.dtype(dtype)
    # The largest id survives the narrowing unchanged.
    ids = np.array([[[experts - 1]]], dtype=np.int64)
    trace = RoutedExperts(ids, [0], experts)
    assert trace.ids.dtype == np.dtype(dtype)
    assert int(trace.ids[0, 0, 0]) == experts - 1


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_compact_dtype_rejects_bad_counts(value: object, error: type) -> None:
    with pytest.raises(error, match="num_experts"):
        compact_dtype(value)  # type: ignore[arg-type]


def test_input_is_copied_and_stored_read_only(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 4, 2, 2, 16).astype(
        np.uint8
    )  # already compact: a copy must still be made
    valid = np.ones(4, dtype=bool)
    trace = RoutedExperts(ids, [0, 1], 16, valid=valid)
    before = trace.ids.copy()
    ids[...] = 0
    valid[...] = False
    np.testing.assert_array_equal(trace.ids, before)
    assert trace.valid.all()
    with pytest.raises(ValueError, match="read-only"):
        trace.ids[0, 0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        trace.valid[0] = False
    for name in ("ids", "moe_layers", "num_experts", "start", "valid", "other"):
        with pytest.raises(AttributeError):
            setattr(trace, name, 0)


# ---------------------------------------------------------------------- validation


def test_out_of_range_id_names_value_and_place(gen: np.random.Generator) -> None:
    experts, layers = 16, [2, 5, 9]
    ids = random_ids(gen, 6, 3, 4, experts)
    row, col, slot = int(gen.integers(6)), int(gen.integers(3)), int(gen.integers(4))
    bad = experts + int(gen.integers(0, 5))
    ids[row, col, slot] = bad
    message = f"expected values in [0, {experts}), got {bad} at (row {row}, layer {layers[col]})"
    with pytest.raises(ValueError, match=re.escape(message)):
        RoutedExperts(ids, layers, experts)
    ids[row, col, slot] = -1
    with pytest.raises(ValueError, match=re.escape(f"got -1 at (row {row}, layer {layers[col]})")):
        RoutedExperts(ids, layers, experts)


def test_duplicate_id_names_place(gen: np.random.Generator) -> None:
    layers = [0, 3]
    ids = random_ids(gen, 5, 2, 3, 10)
    row, col = int(gen.integers(5)), int(gen.integers(2))
    ids[row, col, 2] = ids[row, col, 0]
    message = f"got {ids[row, col, 0]} twice at (row {row}, layer {layers[col]})"
    with pytest.raises(ValueError, match=re.escape(message)):
        RoutedExperts(ids, layers, 10)


GOOD = np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"ids": GOOD[0]}, ValueError, r"ids: expected a 3-D array .* got shape \(2, 2\)"),
        (
            {"ids": GOOD.astype(np.float32)},
            ValueError,
            r"ids: expected an integer dtype, got float32",
        ),
        ({"ids": GOOD > 3}, ValueError, r"ids: expected an integer dtype, got bool"),
        ({"moe_layers": [1, 2, 3]}, ValueError, r"len\(moe_layers\) == 3, got 2"),
        ({"ids": GOOD[:, :, :0]}, ValueError, r"top_k \(shape\[2\]\) in \[1, 8\], got 0"),
        ({"num_experts": 1}, ValueError, r"top_k \(shape\[2\]\) in \[1, 1\], got 2"),
        ({"num_experts": 0}, ValueError, r"num_experts: expected >= 1, got 0"),
        ({"num_experts": 8.0}, TypeError, r"num_experts: expected an int"),
        ({"start": -1}, ValueError, r"start: expected >= 0, got -1"),
        ({"start": 1.5}, TypeError, r"start: expected an int"),
        ({"moe_layers": [3, 3]}, ValueError, r"strictly increasing indices, got 3 after 3"),
        ({"moe_layers": [4, 1]}, ValueError, r"strictly increasing indices, got 1 after 4"),
        ({"moe_layers": [-1, 2]}, ValueError, r"moe_layers\[0\]: expected >= 0, got -1"),
        ({"moe_layers": []}, ValueError, r"moe_layers: expected at least one"),
        ({"moe_layers": "01"}, TypeError, r"moe_layers: expected a sequence"),
        (
            {"valid": np.ones(3, dtype=bool)},
            ValueError,
            r"valid: expected shape \(2,\) .* got \(3,\)",
        ),
        ({"valid": np.ones((2, 1), dtype=bool)}, ValueError, r"valid: expected shape \(2,\)"),
        (
            {"valid": np.ones(2, dtype=np.int64)},
            ValueError,
            r"valid: expected dtype bool, got int64",
        ),
    ],
)
def test_bad_input_raises_naming_the_field(kwargs: dict, error: type, pattern: str) -> None:
    args = {"ids": GOOD, "moe_layers": [0, 1], "num_experts": 8} | kwargs
    with pytest.raises(error, match=pattern):
        RoutedExperts(**args)


# ---------------------------------------------------------------------- equality and repr


def test_equality_is_by_value(gen: np.random.Generator) -> None:
    trace = random_trace(gen, valid=True)
    same = RoutedExperts(
        trace.ids.astype(np.int64),
        list(trace.moe_layers),
        trace.num_experts,
        start=trace.start,
        valid=trace.valid.copy(),
    )
    assert trace == same
    changed = trace.ids.astype(np.int64)
    row, col = int(gen.integers(trace.num_rows)), int(gen.integers(len(trace.moe_layers)))
    unused = sorted(set(range(trace.num_experts)) - set(changed[row, col].tolist()))
    changed[row, col, 0] = unused[0]
    assert trace != RoutedExperts(
        changed, trace.moe_layers, trace.num_experts, start=trace.start, valid=trace.valid
    )
    assert trace != RoutedExperts(
        trace.ids, trace.moe_layers, trace.num_experts, start=trace.start + 1, valid=trace.valid
    )
    assert trace != RoutedExperts(trace.ids, trace.moe_layers, trace.num_experts, start=trace.start)
    assert trace != trace.ids.tolist() and trace != "trace"
    with pytest.raises(TypeError):
        hash(trace)


def test_repr_is_short(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 300, 6, 4, 64)
    trace = RoutedExperts(ids, [1, 2, 3, 5, 7, 11], 64, start=9, valid=np.arange(300) % 3 > 0)
    text = repr(trace)
    assert len(text) < 160
    for part in (
        "rows=300",
        "moe_layers=6 [1..11]",
        "top_k=4",
        "num_experts=64",
        "start=9",
        "valid=200/300",
    ):
        assert part in text


# ---------------------------------------------------------------------- save / load


@pytest.mark.parametrize("with_valid", [True, False])
def test_save_load_round_trip(gen: np.random.Generator, tmp_path, with_valid: bool) -> None:
    trace = random_trace(gen, start=int(gen.integers(0, 50)), valid=with_valid)
    path = tmp_path / "trace.routing"  # no .npz suffix: written exactly where asked
    trace.save(path)
    assert path.exists() and not (tmp_path / "trace.routing.npz").exists()
    loaded = RoutedExperts.load(path)
    assert loaded == trace
    assert loaded.ids.dtype == trace.ids.dtype
    assert (loaded.valid is None) == (not with_valid)


def test_load_validates(gen: np.random.Generator, tmp_path) -> None:
    ids = random_ids(gen, 3, 1, 2, 8)
    ids[1, 0, 1] = ids[1, 0, 0]
    fields = {
        "ids": ids,
        "moe_layers": np.array([0]),
        "num_experts": np.int64(8),
        "start": np.int64(0),
    }
    np.savez(tmp_path / "dup.npz", format_version=np.int64(1), **fields)
    with pytest.raises(ValueError, match=r"twice at \(row 1, layer 0\)"):
        RoutedExperts.load(tmp_path / "dup.npz")
    np.savez(tmp_path / "version.npz", format_version=np.int64(99), **fields)
    with pytest.raises(ValueError, match="format_version: expected 1, got 99"):
        RoutedExperts.load(tmp_path / "version.npz")
    np.savez(tmp_path / "missing.npz", format_version=np.int64(1), ids=ids)
    with pytest.raises(ValueError, match=r"missing \['moe_layers', 'num_experts', 'start'\]"):
        RoutedExperts.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- extend


@pytest.mark.parametrize(
    ("valid_a", "valid_b"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_extend_concatenates_a_continuation(
    gen: np.random.Generator, valid_a: bool, valid_b: bool
) -> None:
    layers, experts, top_k = random_layers(gen, 3, 6), 32, 4
    rows_a, rows_b, start = (
        int(gen.integers(1, 6)),
        int(gen.integers(0, 6)),
        int(gen.integers(0, 20)),
    )
    ids_a, ids_b = (
        random_ids(gen, rows_a, 3, top_k, experts),
        random_ids(gen, rows_b, 3, top_k, experts),
    )
    mask_a = gen.random(rows_a) < 0.5 if valid_a else None
    mask_b = gen.random(rows_b) < 0.5 if valid_b else None
    a = RoutedExperts(ids_a, layers, experts, start=start, valid=mask_a)
    b = RoutedExperts(ids_b, layers, experts, start=start + rows_a, valid=mask_b)
    joined = a.extend(b)
    np.testing.assert_array_equal(joined.ids, np.concatenate([ids_a, ids_b]))
    assert (joined.start, joined.moe_layers, joined.num_experts) == (start, tuple(layers), experts)
    if not (valid_a or valid_b):
        assert joined.valid is None
    else:
        expected = np.concatenate(
            [
                mask_a if valid_a else np.ones(rows_a, dtype=bool),
                mask_b if valid_b else np.ones(rows_b, dtype=bool),
            ]
        )
        np.testing.assert_array_equal(joined.valid, expected)
    # Both inputs are untouched.
    assert a.num_rows == rows_a and b.num_rows == rows_b


def test_extend_rejects_mismatches(gen: np.random.Generator) -> None:
    ids = random_ids(gen, 3, 2, 2, 16)
    a = RoutedExperts(ids, [1, 2], 16, start=5)
    cases = [
        (RoutedExperts(ids, [1, 2], 16, start=7), r"other.start: expected 8 .* got 7"),
        (
            RoutedExperts(ids, [1, 3], 16, start=8),
            r"other.moe_layers: expected \(1, 2\) .* got \(1, 3\)",
        ),
        (RoutedExperts(ids, [1, 2], 17, start=8), r"other.num_experts: expected 16 .* got 17"),
        (RoutedExperts(ids[:, :, :1], [1, 2], 16, start=8), r"other.top_k: expected 2 .* got 1"),
    ]
    for other, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            a.extend(other)
    with pytest.raises(TypeError, match="other: expected RoutedExperts"):
        a.extend(ids)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- engine formats


def engine_array(
    gen: np.random.Generator,
    rows: int,
    hidden_layers: int,
    moe_layers: list[int],
    top_k: int,
    experts: int,
):
    """All-layer array as engines return it; dense layers hold junk that must be dropped."""
    full = np.full((rows, hidden_layers, top_k), -7, dtype=np.int32)
    full[:, moe_layers] = random_ids(gen, rows, len(moe_layers), top_k, experts)
    return full


@pytest.mark.parametrize("form", ["array", "str", "bytes"])
def test_from_vllm(gen: np.random.Generator, form: str) -> None:
    hidden, experts, top_k = 6, 64, 4
    moe_layers = [1, 2, 4, 5]  # layers 0 and 3 dense
    full = engine_array(gen, int(gen.integers(1, 10)), hidden, moe_layers, top_k, experts).astype(
        np.int16
    )
    buffer = io.BytesIO()
    np.save(buffer, full)
    text = base64.b64encode(buffer.getvalue())
    payload = {"array": full, "str": text.decode("ascii"), "bytes": text}[form]
    trace = RoutedExperts.from_vllm(payload, moe_layers=moe_layers, num_experts=experts, start=3)
    np.testing.assert_array_equal(trace.ids, full[:, moe_layers])
    assert (trace.moe_layers, trace.start, trace.top_k) == (tuple(moe_layers), 3, top_k)


def test_from_vllm_errors(gen: np.random.Generator) -> None:
    full = engine_array(gen, 3, 4, [1, 3], 2, 8)
    with pytest.raises(
        ValueError, match=r"moe_layers: expected indices < num_hidden_layers 4 .* got 4"
    ):
        RoutedExperts.from_vllm(full, moe_layers=[1, 4], num_experts=8)
    with pytest.raises(ValueError, match="payload: expected a 3-D array"):
        RoutedExperts.from_vllm(full[0], moe_layers=[1, 3], num_experts=8)
    with pytest.raises(ValueError, match="payload: expected base64 text"):
        RoutedExperts.from_vllm("not base64!", moe_layers=[1, 3], num_experts=8)
    with pytest.raises(ValueError, match="payload: expected base64 of np.save bytes"):
        RoutedExperts.from_vllm(base64.b64encode(b"plain bytes"), moe_layers=[1, 3], num_experts=8)
    with pytest.raises(ValueError, match=r"expected values in \[0, 8\), got -7"):
        RoutedExperts.from_vllm(full, moe_layers=[0, 1], num_experts=8)  # a dense column kept
    with pytest.raises(TypeError, match="payload: expected numpy.ndarray, str or bytes"):
        RoutedExperts.from_vllm(full.tolist(), moe_layers=[1, 3], num_experts=8)  # type: ignore[arg-type]


@pytest.mark.parametrize("as_str", [True, False])
def test_from_sglang(gen: np.random.Generator, as_str: bool) -> None:
    hidden, experts, top_k = 5, 300, 3
    moe_layers = [0, 2, 3]
    full = engine_array(gen, int(gen.integers(1, 8)), hidden, moe_layers, top_k, experts)
    # Pack little-endian int32 by hand, independently of numpy's byte order handling.
    raw = struct.pack(f"<{full.size}i", *full.ravel().tolist())
    text = base64.b64encode(raw)
    trace = RoutedExperts.from_sglang(
        text.decode("ascii") if as_str else text,
        num_hidden_layers=hidden,
        top_k=top_k,
        moe_layers=moe_layers,
        num_experts=experts,
        start=2,
    )
    np.testing.assert_array_equal(trace.ids, full[:, moe_layers])
    assert trace.ids.dtype == np.int16 and trace.start == 2


def test_from_sglang_errors(gen: np.random.Generator) -> None:
    full = engine_array(gen, 2, 3, [1, 2], 2, 8)
    text = base64.b64encode(full.astype("<i4").tobytes())
    kwargs = {"num_hidden_layers": 3, "top_k": 2, "moe_layers": [1, 2], "num_experts": 8}
    assert RoutedExperts.from_sglang(text, **kwargs).num_rows == 2
    with pytest.raises(ValueError, match=r"expected a multiple of 32 bytes .* got 48 bytes"):
        RoutedExperts.from_sglang(text, **(kwargs | {"num_hidden_layers": 4}))
    with pytest.raises(ValueError, match=r"expected a multiple of 24 bytes .* got 44 bytes"):
        RoutedExperts.from_sglang(base64.b64encode(full.astype("<i4").tobytes()[:-4]), **kwargs)
    with pytest.raises(ValueError, match="moe_layers: expected indices < num_hidden_layers 3"):
        RoutedExperts.from_sglang(text, **(kwargs | {"moe_layers": [1, 3]}))
    with pytest.raises(ValueError, match="payload: expected base64 text"):
        RoutedExperts.from_sglang("@@@@", **kwargs)
    with pytest.raises(TypeError, match="payload: expected str or bytes"):
        RoutedExperts.from_sglang(full, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k: expected >= 1, got 0"):
        RoutedExperts.from_sglang(text, **(kwargs | {"top_k": 0}))


# ---------------------------------------------------------------------- torch


def test_to_torch(gen: np.random.Generator) -> None:
    trace = random_trace(gen)
    ids = trace.to_torch()
    assert ids.dtype == torch.int64 and ids.device.type == "cpu"
    assert tuple(ids.shape) == (trace.num_rows, len(trace.moe_layers), trace.top_k)
    np.testing.assert_array_equal(ids.numpy(), trace.ids.astype(np.int64))
    ids[...] = 0  # the tensor is a copy: writing to it leaves the trace alone
    assert trace.ids.flags.writeable is False


@pytest.mark.gpu
def test_to_torch_cuda(gen: np.random.Generator) -> None:
    trace = random_trace(gen)
    ids = trace.to_torch("cuda")
    assert ids.device.type == "cuda" and ids.dtype == torch.int64
    np.testing.assert_array_equal(ids.cpu().numpy(), trace.ids.astype(np.int64))
