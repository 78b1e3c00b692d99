"""RoutedExperts.save / load under hostile files: non-integer fields, unknown keys, truncated,
corrupted, empty and foreign files all raise ValueError naming the path and the problem; intact
files round-trip exactly (issue 13, section 5)."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from replay.routed_experts import RoutedExperts


@pytest.fixture
def gen(rng: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(rng.initial_seed())


def random_trace(
    gen: np.random.Generator, *, experts: int, rows: int, valid: bool
) -> RoutedExperts:
    layers = sorted(gen.choice(12, size=int(gen.integers(1, 5)), replace=False).tolist())
    top_k = int(gen.integers(1, min(experts, 6) + 1))
    # The first top_k of a random permutation per (row, layer): distinct ids.
    ids = np.argsort(gen.random((rows, len(layers), experts)), axis=2)[:, :, :top_k]
    mask = gen.random(rows) < 0.6 if valid else None
    return RoutedExperts(ids, layers, experts, start=int(gen.integers(0, 1000)), valid=mask)


def write_npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)
    return path


def good_fields(gen: np.random.Generator) -> dict[str, object]:
    trace = random_trace(gen, experts=16, rows=5, valid=True)
    return {
        "format_version": np.int64(1),
        "ids": trace.ids,
        "moe_layers": np.asarray(trace.moe_layers, dtype=np.int64),
        "num_experts": np.int64(16),
        "start": np.int64(trace.start),
        "valid": trace.valid,
    }


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("experts", [2, 256, 257, 32768, 32769])
@pytest.mark.parametrize("valid", [False, True])
def test_save_load_round_trips_exactly(
    gen: np.random.Generator, tmp_path: Path, experts: int, valid: bool
) -> None:
    for rows in (0, 1, int(gen.integers(2, 40))):
        trace = random_trace(gen, experts=experts, rows=rows, valid=valid)
        path = tmp_path / f"{rows}.trace"
        trace.save(path)
        loaded = RoutedExperts.load(path)
        assert loaded == trace
        assert loaded.ids.dtype == trace.ids.dtype and loaded.ids.shape == trace.ids.shape
        assert (loaded.start, loaded.moe_layers, loaded.num_experts) == (
            trace.start,
            trace.moe_layers,
            trace.num_experts,
        )
        assert (loaded.valid is None) == (not valid)
        # Saving the loaded trace writes the same arrays again.
        loaded.save(tmp_path / "again.trace")
        assert RoutedExperts.load(tmp_path / "again.trace") == trace


# ---------------------------------------------------------------------- field types


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("num_experts", np.float64(8.9), "8.9"),
        ("start", np.float64(1.7), "1.7"),
        ("moe_layers", np.array([0.4, 2.6]), r"\[0.4, 2.6\]"),
        ("num_experts", np.float64(16.0), "16.0"),  # integral, but not an integer type
        ("start", np.array([0, 1]), r"\[0, 1\]"),  # not a scalar
        ("format_version", np.float64(1.0), "1.0"),
        ("moe_layers", np.array(3), "3"),  # not 1-D
    ],
)
def test_non_integer_fields_are_rejected_not_truncated(
    gen: np.random.Generator, tmp_path: Path, key: str, value: object, shown: str
) -> None:
    fields = good_fields(gen)
    if key == "moe_layers" and np.ndim(value) == 1:
        fields["ids"] = np.asarray(fields["ids"])[:, :2]
    fields[key] = value
    path = write_npz(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match=rf"bad\.npz: {key}: expected .*integer.*got .*{shown}"):
        RoutedExperts.load(path)


def test_bad_contents_name_the_path(gen: np.random.Generator, tmp_path: Path) -> None:
    fields = good_fields(gen)
    fields["valid"] = np.ones(3, dtype=bool)  # not one per row
    path = write_npz(tmp_path / "rows.npz", **fields)
    with pytest.raises(ValueError, match=r"rows\.npz: valid: expected shape \(5,\)"):
        RoutedExperts.load(path)


@pytest.mark.parametrize("extra", ["Valid", "weights", "ids_extra"])
def test_unknown_keys_are_rejected(gen: np.random.Generator, tmp_path: Path, extra: str) -> None:
    fields = good_fields(gen)
    if extra == "Valid":  # the misspelling: the mask would be ignored, every row replayed
        fields["Valid"] = fields.pop("valid")
    else:
        fields[extra] = np.zeros(2)
    path = write_npz(tmp_path / "keys.npz", **fields)
    accepted = ["format_version", "ids", "moe_layers", "num_experts", "start", "valid"]
    with pytest.raises(ValueError, match=re.escape(f"{accepted}, got unknown keys ['{extra}']")):
        RoutedExperts.load(path)


# ---------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(gen: np.random.Generator, tmp_path: Path) -> tuple[RoutedExperts, bytes]:
    trace = random_trace(gen, experts=16, rows=12, valid=True)
    trace.save(tmp_path / "good.trace")
    return trace, (tmp_path / "good.trace").read_bytes()


def load_or_value_error(path: Path, expected: RoutedExperts) -> str:
    """Loads ``path``: either the very trace saved, or a ValueError naming the path."""
    try:
        loaded = RoutedExperts.load(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: "), err
        return "error"
    assert loaded == expected, "a damaged file loaded as a different trace"
    return "same"


def test_every_truncation_raises_value_error(
    saved: tuple[RoutedExperts, bytes], tmp_path: Path
) -> None:
    trace, raw = saved
    path = tmp_path / "cut.trace"
    for length in range(len(raw)):
        path.write_bytes(raw[:length])
        assert load_or_value_error(path, trace) == "error", length


def test_every_flipped_byte_raises_value_error_or_loads_the_same_trace(
    gen: np.random.Generator, saved: tuple[RoutedExperts, bytes], tmp_path: Path
) -> None:
    trace, raw = saved
    path = tmp_path / "flipped.trace"
    outcomes = []
    # One bit per byte, which bit drawn per run (a flipped zip directory entry once dropped the
    # ``valid`` member without a word).
    bits = gen.integers(0, 8, size=len(raw))
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 1 << int(bits[position])
        path.write_bytes(bytes(damaged))
        outcomes.append(load_or_value_error(path, trace))
    # Most flips hit compressed data, headers or CRCs; a few land on unchecked fields (times).
    assert outcomes.count("error") > len(outcomes) // 2


def test_flipped_bytes_in_the_middle_name_the_problem(
    saved: tuple[RoutedExperts, bytes], tmp_path: Path
) -> None:
    _, raw = saved
    damaged = bytearray(raw)
    middle = len(raw) // 2
    damaged[middle - 8 : middle + 8] = bytes(b ^ 0xFF for b in damaged[middle - 8 : middle + 8])
    path = tmp_path / "middle.trace"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"middle\.trace: expected a trace \.npz .*: \w+"):
        RoutedExperts.load(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "got an empty file"),
        (b"routing trace, honestly\n" * 4, "File is not a zip file"),
        (b"PK\x03\x04" + b"\x00" * 40, "BadZipFile"),
    ],
)
def test_empty_and_foreign_files_raise_value_error(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "foreign.trace"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"foreign\.trace: .*{problem}"):
        RoutedExperts.load(path)


def test_npy_and_pickled_members_are_refused(gen: np.random.Generator, tmp_path: Path) -> None:
    path = tmp_path / "single.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy: .*not a zip file"):
        RoutedExperts.load(path)
    fields = good_fields(gen) | {"ids": np.array([{"evil": 1}], dtype=object)}
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as archive:
        for key, value in fields.items():
            member = io.BytesIO()
            np.save(member, value, allow_pickle=True)
            archive.writestr(f"{key}.npy", member.getvalue())
    with pytest.raises(ValueError, match=r"pickled\.npz: .*allow_pickle"):
        RoutedExperts.load(tmp_path / "pickled.npz")


def test_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RoutedExperts.load(tmp_path / "absent.trace")
