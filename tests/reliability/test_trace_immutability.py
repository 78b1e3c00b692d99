"""A validated trace cannot be changed: its arrays refuse writes and refuse to be flagged
writable again, also after pickling (Ray) and copying; replay trusts them (issue 13, 5).

Before: ``trace.ids.setflags(write=True)`` succeeded, an id of 200 could be written and replay
(which does not re-check validated ids) scattered it into the experts' index."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from replay.routed_experts import RoutedExperts

TOP_K = 2


@pytest.fixture
def gen(rng: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(rng.initial_seed())


def random_trace(gen: np.random.Generator, experts: int, moe_layers: list[int], rows: int):
    ids = np.argsort(gen.random((rows, len(moe_layers), experts)), axis=2)[:, :, :TOP_K]
    return RoutedExperts(ids, moe_layers, experts, valid=gen.random(rows) < 0.8)


def copies(trace: RoutedExperts) -> dict[str, RoutedExperts]:
    return {
        "original": trace,
        "pickle2": pickle.loads(pickle.dumps(trace, protocol=2)),
        "pickle5": pickle.loads(pickle.dumps(trace, protocol=5)),
        "deepcopy": copy.deepcopy(trace),
        "copy": copy.copy(trace),
        "extended": trace.extend(
            RoutedExperts(trace.ids[:0], trace.moe_layers, trace.num_experts, start=trace.num_rows)
        ),
    }


@pytest.mark.parametrize("experts", [8, 300, 40000])  # uint8, int16, int32 ids
def test_arrays_cannot_be_flagged_writable(gen: np.random.Generator, experts: int) -> None:
    trace = random_trace(gen, experts, [0, 2, 3], rows=6)
    for how, each in copies(trace).items():
        assert each == trace, how
        arrays = {"ids": each.ids, "valid": each.valid}
        for name, array in arrays.items():
            for view in (array, array[1:], array.reshape(-1), array.view(np.uint8)):
                with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
                    view.setflags(write=True)
                assert not view.flags.writeable, (how, name)
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 1
            with pytest.raises(ValueError, match="read-only"):
                array[...] = 0
            with pytest.raises(ValueError, match="read-only"):
                np.copyto(array, np.zeros_like(array))
            with pytest.raises(ValueError, match="read-only"):
                array.fill(0)
        np.testing.assert_array_equal(each.ids, trace.ids)
        np.testing.assert_array_equal(each.valid, trace.valid)


def test_a_tampered_id_cannot_be_written(gen: np.random.Generator) -> None:
    """The reproduction: re-flag ``ids`` writable and write 200 (8 experts)."""
    trace = random_trace(gen, 8, [0, 2], rows=5)
    for how, each in copies(trace).items():
        with pytest.raises(ValueError):
            each.ids.setflags(write=True)
        with pytest.raises(ValueError):
            each.ids[0, 0, 0] = 200
        assert int(each.ids.max()) < 8, how
        # What replay moves to the device is built from these arrays, never writable ones.
        assert torch.equal(each.to_torch(), torch.from_numpy(trace.ids.astype(np.int64)))
