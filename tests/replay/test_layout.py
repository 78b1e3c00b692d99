"""Batch layouts (padding, packing) and the alignment of traces onto a batch's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from replay.layout import BatchLayout, align_traces, traces_from_aligned
from replay.routed_experts import RoutedExperts

LAYERS = (1, 3)
E, K = 8, 2


def random_trace(
    rows: int, rng: torch.Generator, *, start: int = 0, valid: list[bool] | None = None
) -> RoutedExperts:
    """Distinct random ids per (row, layer)."""
    ids = torch.rand(rows, len(LAYERS), E, generator=rng).argsort(dim=-1)[..., :K]
    return RoutedExperts(
        ids.numpy(),
        LAYERS,
        E,
        start=start,
        valid=None if valid is None else np.array(valid),
    )


def sequences(layout: BatchLayout) -> list[list[int]]:
    return [layout.positions(i).tolist() for i in range(layout.num_sequences)]


# ---------------------------------------------------------------------- layouts


def test_dense_layout_is_one_sequence_per_row() -> None:
    layout = BatchLayout.dense(2, 3)
    assert sequences(layout) == [[0, 1, 2], [3, 4, 5]]
    assert layout.num_tokens == 6 and layout.lengths.tolist() == [3, 3]


def test_attention_mask_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    layout = BatchLayout.from_attention_mask(mask)
    assert sequences(layout) == [[0, 1, 2], [7, 8, 9], []]
    assert (layout.batch_size, layout.seq_len) == (3, 5)


def test_position_ids_split_where_positions_restart() -> None:
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    layout = BatchLayout.from_position_ids(position_ids)
    assert sequences(layout) == [[0, 1, 2], [3, 4], [5], [6, 7, 8, 9], [10, 11]]


def test_position_ids_with_padding_mask() -> None:
    # Row 0: two packed sequences then two pad tokens; the pads would otherwise look like a
    # third sequence (their position ids restart at 0).
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    layout = BatchLayout.from_position_ids(position_ids, mask)
    assert sequences(layout) == [[0, 1], [2, 3, 4]]


def test_position_ids_one_dimensional_and_continuations() -> None:
    # A continuation starting at position 7 is its own sequence (HF's rule: diff != 1).
    layout = BatchLayout.from_position_ids(torch.tensor([0, 1, 7, 8, 9]))
    assert sequences(layout) == [[0, 1], [2, 3, 4]]


def test_cu_seqlens() -> None:
    layout = BatchLayout.from_cu_seqlens(torch.tensor([0, 3, 4, 7]))
    assert sequences(layout) == [[0, 1, 2], [3], [4, 5, 6]]
    padded = BatchLayout.from_cu_seqlens([0, 2, 5], batch_size=1, seq_len=8)
    assert sequences(padded) == [[0, 1], [2, 3, 4]] and padded.num_tokens == 8


@pytest.mark.parametrize(
    ("cu_seqlens", "kwargs", "match"),
    [
        ([1, 3], {}, "starting at 0"),
        ([0, 3, 2], {}, "non-decreasing"),
        (
            [0, 3, 6],
            {"batch_size": 2, "seq_len": 4},
            "sequence 1 .* crosses a row boundary",
        ),
        (
            [0, 9],
            {"batch_size": 2, "seq_len": 4},
            "<= batch_size \\* seq_len = 8, got 9",
        ),
        ([0, 4], {"batch_size": 2}, "seq_len: expected a value"),
    ],
)
def test_cu_seqlens_errors(cu_seqlens: list[int], kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchLayout.from_cu_seqlens(cu_seqlens, **kwargs)


def test_layout_input_errors() -> None:
    with pytest.raises(ValueError, match="attention_mask: expected values in"):
        BatchLayout.from_attention_mask(torch.tensor([[1, 2]]))
    with pytest.raises(
        ValueError, match=r"attention_mask: expected shape \[batch, seq_len\]"
    ):
        BatchLayout.from_attention_mask(torch.tensor([1, 1]))
    with pytest.raises(
        ValueError, match="attention_mask: expected the shape of position_ids"
    ):
        BatchLayout.from_position_ids(
            torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4)
        )
    with pytest.raises(
        ValueError, match=r"attention_mask: expected values in \{0, 1\}, got \[0.5"
    ):
        BatchLayout.from_attention_mask(torch.tensor([[0.5, 1.0]]))
    assert sequences(BatchLayout.from_attention_mask(torch.tensor([[0.0, 1.0]]))) == [
        [1]
    ]
    with pytest.raises(ValueError, match="position_ids: expected an integer dtype"):
        BatchLayout.from_position_ids(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="cu_seqlens: expected alone"):
        BatchLayout.from_inputs(cu_seqlens=[0, 2], position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(
        ValueError, match="token_index: expected each flat position at most once"
    ):
        BatchLayout(
            batch_size=1,
            seq_len=3,
            token_index=np.array([0, 0], dtype=np.int64),
            seq_offsets=np.array([0, 2], dtype=np.int64),
        )


def test_from_inputs_picks_the_described_layout() -> None:
    assert BatchLayout.from_inputs() is None
    mask = torch.tensor([[0, 1, 1]])
    assert sequences(BatchLayout.from_inputs(attention_mask=mask)) == [[1, 2]]
    pos = torch.tensor([[0, 0, 1]])
    assert sequences(BatchLayout.from_inputs(position_ids=pos)) == [[0], [1, 2]]
    assert sequences(BatchLayout.from_inputs(cu_seqlens=[0, 1, 3])) == [[0], [1, 2]]


# ---------------------------------------------------------------------- alignment


def test_align_places_rows_on_their_tokens(rng: torch.Generator) -> None:
    # Row 0: right-padded sequence of 4 tokens; row 1: left-padded sequence of 5 tokens whose
    # trace starts at token 1 and has an invalid row.
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    layout = BatchLayout.from_attention_mask(mask)
    first = random_trace(3, rng)
    second = random_trace(3, rng, start=1, valid=[True, False, True])
    aligned = align_traces(
        [first, second], layout, moe_layers=LAYERS, num_experts=E, top_k=K
    )

    # Flat token -> (trace, row) written out by hand: sequence 0 tokens 0..2 are flat 0..2;
    # sequence 1 token t sits at flat 7 + t, row r is token 1 + r, row 1 is invalid.
    expected = {
        0: (first, 0),
        1: (first, 1),
        2: (first, 2),
        8: (second, 0),
        10: (second, 2),
    }
    assert aligned.replay_T.tolist() == [t in expected for t in range(12)]
    assert aligned.ids_LTK.shape == (len(LAYERS), 12, K)
    for token, (trace, row) in expected.items():
        assert aligned.ids_LTK[:, token, :].tolist() == trace.ids[row].tolist()


def test_align_packed_sequences(rng: torch.Generator) -> None:
    layout = BatchLayout.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 2, 3]]))
    traces = [random_trace(2, rng), random_trace(3, rng)]
    aligned = align_traces(traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K)
    assert aligned.replay_T.tolist() == [True, True, False, True, True, True, False]
    assert (
        aligned.ids_LTK[:, 3:6, :].permute(1, 0, 2).tolist() == traces[1].ids.tolist()
    )


def test_align_device_and_dtype(rng: torch.Generator) -> None:
    layout = BatchLayout.dense(1, 3)
    aligned = align_traces(
        [random_trace(2, rng)],
        layout,
        moe_layers=LAYERS,
        num_experts=E,
        top_k=K,
        device="cpu",
    )
    assert aligned.ids_LTK.dtype == torch.int32 and aligned.replay_T.dtype == torch.bool
    assert aligned.ids_LTK.is_contiguous()


@pytest.mark.parametrize(
    ("num_experts", "dtype"), [(8, torch.uint8), (300, torch.int16)]
)
def test_align_keeps_the_traces_compact_layout(
    num_experts: int, dtype: torch.dtype, rng: torch.Generator
) -> None:
    # Sequence 0 is left-padded (its rows one run of tokens), sequence 1 has invalid rows (its
    # replayed tokens not one run): both placements of the rows.
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    layout = BatchLayout.from_attention_mask(mask)
    ids = [
        torch.rand(rows, len(LAYERS), num_experts, generator=rng)
        .argsort(-1)[..., :K]
        .numpy()
        for rows in (3, 4)
    ]
    traces = [
        RoutedExperts(ids[0], LAYERS, num_experts),
        RoutedExperts(
            ids[1], LAYERS, num_experts, valid=np.array([True, False, True, False])
        ),
    ]
    aligned = align_traces(
        traces, layout, moe_layers=LAYERS, num_experts=num_experts, top_k=K
    )
    # Flat token -> trace row, by hand: sequence 0 is flat 1..4, sequence 1 flat 5..9.
    expected = {1: ids[0][0], 2: ids[0][1], 3: ids[0][2], 5: ids[1][0], 7: ids[1][2]}
    assert aligned.ids_TLK.dtype == dtype and aligned.ids_TLK.shape == (
        10,
        len(LAYERS),
        K,
    )
    assert aligned.num_replayed == len(expected)
    for token in range(10):
        want = (
            expected[token].tolist() if token in expected else [[0] * K] * len(LAYERS)
        )
        assert aligned.ids_TLK[token].tolist() == want, token
        assert bool(aligned.replay_T[token]) is (token in expected)
    assert torch.equal(aligned.ids_LTK, aligned.ids_TLK.permute(1, 0, 2).int())


def test_align_of_traces_without_valid_rows_replays_nothing(
    rng: torch.Generator,
) -> None:
    traces = [random_trace(3, rng, valid=[False] * 3), random_trace(0, rng, start=3)]
    aligned = align_traces(
        traces, BatchLayout.dense(2, 4), moe_layers=LAYERS, num_experts=E, top_k=K
    )
    assert aligned.num_replayed == 0 and not aligned.replay_T.any()
    assert not aligned.ids_TLK.any()


@pytest.mark.gpu
def test_align_onto_cuda_is_one_copy_without_synchronization(
    rng: torch.Generator,
) -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    layout = BatchLayout.from_attention_mask(mask)
    traces = [
        random_trace(3, rng),
        random_trace(3, rng, start=1, valid=[True, False, True]),
    ]
    on_cpu = align_traces(traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K)
    align_traces(
        traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K, device="cuda"
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = align_traces(
            traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K, device="cuda"
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_gpu.ids_TLK.is_cuda and on_gpu.replay_T.is_cuda
    storage = on_gpu.ids_TLK.untyped_storage()  # one buffer, so one copy
    assert storage.data_ptr() == on_gpu.replay_T.untyped_storage().data_ptr()
    assert torch.equal(on_gpu.ids_TLK.cpu(), on_cpu.ids_TLK)
    assert torch.equal(on_gpu.replay_T.cpu(), on_cpu.replay_T)
    assert on_gpu.num_replayed == on_cpu.num_replayed == 5


def _mismatch(rng: torch.Generator, **kwargs: object) -> RoutedExperts:
    ids = torch.rand(
        kwargs.pop("rows", 3), len(kwargs.get("layers", LAYERS)), E, generator=rng
    )
    ids = ids.argsort(dim=-1)[..., : kwargs.pop("top_k", K)]
    return RoutedExperts(
        ids.numpy(),
        kwargs.pop("layers", LAYERS),
        kwargs.pop("num_experts", E),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (
            dict(layers=(1, 2, 3)),
            r"traces\[1\]\.moe_layers: expected the model's 2 MoE layers",
        ),
        (
            dict(layers=(1, 2)),
            r"traces\[1\]\.moe_layers: .*\[1, 3\], got 2 layers \[1, 2\]",
        ),
        (dict(top_k=3), r"traces\[1\]\.top_k: expected 2 .*got 3"),
        (dict(num_experts=16), r"traces\[1\]\.num_experts: expected 8 .*got 16"),
        (
            dict(rows=2),
            r"traces\[1\]: expected 3 rows \(sequence 1 has 4 tokens.*got 2",
        ),
        (dict(rows=4), r"traces\[1\]: expected 3 rows .*got 4"),
        (dict(rows=3, start=1), r"traces\[1\]: expected 2 rows .*start 1.*got 3"),
        (dict(rows=0, start=4), r"traces\[1\]\.start: expected <= 3 .*got 4"),
    ],
)
def test_align_rejects_mismatched_traces(
    rng: torch.Generator, bad: dict, match: str
) -> None:
    layout = BatchLayout.dense(2, 4)
    traces = [random_trace(3, rng), _mismatch(rng, **bad)]
    with pytest.raises(ValueError, match=match):
        align_traces(traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K)


def test_align_rejects_wrong_trace_count_and_types(rng: torch.Generator) -> None:
    layout = BatchLayout.dense(2, 4)
    with pytest.raises(
        ValueError, match=r"traces: expected 2 \(one per sequence.*got 1"
    ):
        align_traces(
            [random_trace(3, rng)], layout, moe_layers=LAYERS, num_experts=E, top_k=K
        )
    with pytest.raises(TypeError, match="traces: expected a list of RoutedExperts"):
        align_traces(
            random_trace(3, rng), layout, moe_layers=LAYERS, num_experts=E, top_k=K
        )
    with pytest.raises(TypeError, match=r"traces\[1\]: expected RoutedExperts"):
        align_traces(
            [random_trace(3, rng), "x"],
            layout,
            moe_layers=LAYERS,
            num_experts=E,
            top_k=K,
        )


def test_bad_ids_are_caught_by_the_trace_itself() -> None:
    ids = np.zeros((2, len(LAYERS), K), dtype=np.int64)
    ids[..., 1] = 1
    ids[1, 0, 1] = E
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 8\)"):
        RoutedExperts(ids, LAYERS, E)
    ids[1, 0, 1] = 0
    with pytest.raises(ValueError, match="ids: expected distinct ids"):
        RoutedExperts(ids, LAYERS, E)


def test_traces_from_aligned_inverts_align(rng: torch.Generator) -> None:
    layout = BatchLayout.from_position_ids(
        torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]),
        torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
    )
    traces = [random_trace(n - 1, rng) for n in layout.lengths.tolist()]
    aligned = align_traces(traces, layout, moe_layers=LAYERS, num_experts=E, top_k=K)
    back = traces_from_aligned(
        aligned.ids_LTK, layout, moe_layers=LAYERS, num_experts=E
    )
    assert back == traces
    with pytest.raises(ValueError, match=r"ids_LTK: expected shape \(2, 12, top_k\)"):
        traces_from_aligned(
            aligned.ids_LTK[:, :5], layout, moe_layers=LAYERS, num_experts=E
        )
