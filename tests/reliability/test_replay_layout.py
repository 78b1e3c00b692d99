"""Replay and record refuse a forward whose inputs lay the batch out otherwise than the
context was told (issue 13, section 6).

Before: ``with ctl.replay(traces, attention_mask=right_padded): model(left_padded_ids,
attention_mask=left_padded)`` raised nothing and the logits were off by ~1.6 from native routing:
trace rows landed on other tokens. The oracle for "matching layouts still work" is HF
transformers' own native forward of each sequence alone (replaying its own routing reproduces
it).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import replay
import replay.forward_layout
from replay.routed_experts import RoutedExperts

LENGTHS = (7, 4, 5)


@pytest.fixture
def model(rng: torch.Generator) -> transformers.PreTrainedModel:
    """A tiny random Qwen3-MoE (2 MoE layers of 8 experts, top-2), HF's sdpa attention."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.initial_seed())
        return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.fixture
def ctl(model: transformers.PreTrainedModel) -> replay.ReplayController:
    return replay.patch(model)


@pytest.fixture
def sequences(model: transformers.PreTrainedModel, rng: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, model.config.vocab_size, (n,), generator=rng) for n in LENGTHS]


def native_singles(model, ctl, sequences) -> tuple[list[torch.Tensor], list[RoutedExperts]]:
    """HF's logits of each sequence alone, and its routing recorded in that forward."""
    logits, traces = [], []
    for seq in sequences:
        with torch.no_grad(), ctl.record() as rec:
            logits.append(model(seq[None]).logits[0])
        traces.append(rec.traces[0])
    return logits, traces


def padded(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``[batch, max_len]`` ids and 0/1 mask, each row one sequence padded on ``side``."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    spans = []
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span], mask[row, span] = seq, 1
        spans.append(span)
    return ids, mask, spans


def packed(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row of the sequences back to back: ids, restarting position ids, cu_seqlens."""
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.cat(sequences)[None], position_ids, cu_seqlens


# ---------------------------------------------------------------------- the reproduction


@pytest.mark.parametrize(("context_side", "model_side"), [("right", "left"), ("left", "right")])
def test_a_mask_of_the_other_padding_side_raises(
    model, ctl, sequences, context_side: str, model_side: str
) -> None:
    _, traces = native_singles(model, ctl, sequences)
    _, context_mask, _ = padded(sequences, context_side)
    ids, model_mask, _ = padded(sequences, model_side)
    # Sequence 1 (4 tokens in rows of 7) is flat tokens 7..10 right-padded, 10..13 left-padded.
    expected = {
        "right": "sequence 1 is flat tokens 7..10 in the context, padding there",
        "left": "sequence 1 is flat tokens 10..13 in the context, its sequence there is flat "
        "tokens 7..10",
    }[context_side]
    with (
        pytest.raises(
            ValueError,
            match=r"replay: expected the forward to keep the sequences of the context's layout "
            r"\(by its attention_mask\), got a forward laid out by its attention_mask: " + expected,
        ),
        torch.no_grad(),
        ctl.replay(traces, attention_mask=context_mask),
    ):
        model(ids, attention_mask=model_mask)


def test_a_left_padded_forward_without_its_mask_raises(model, ctl, sequences) -> None:
    _, traces = native_singles(model, ctl, sequences)
    ids, mask, _ = padded(sequences, "left")
    with (
        pytest.raises(ValueError, match=r"laid out by its shape alone \(dense rows\): sequence 1"),
        torch.no_grad(),
        ctl.replay(traces, attention_mask=mask),
    ):
        model(ids)


def test_a_mask_written_in_place_after_entering_raises(model, ctl, sequences) -> None:
    """The same tensor is not enough: its contents changed since the context read it."""
    _, traces = native_singles(model, ctl, sequences)
    ids, mask, _ = padded(sequences, "right")
    with (
        pytest.raises(ValueError, match="sequence 1 is flat tokens 7..10 in the context"),
        torch.no_grad(),
        ctl.replay(traces, attention_mask=mask),
    ):
        mask[1] = mask[1].flip(0)  # now left-padded
        model(ids, attention_mask=mask)


def test_a_positional_mask_is_read_too(model, ctl, sequences) -> None:
    _, traces = native_singles(model, ctl, sequences)
    _, right_mask, _ = padded(sequences, "right")
    ids, left_mask, _ = padded(sequences, "left")
    with (
        pytest.raises(ValueError, match="got a forward laid out by its attention_mask"),
        torch.no_grad(),
        ctl.replay(traces, attention_mask=right_mask),
    ):
        model(ids, left_mask)  # HF forward(input_ids, attention_mask, ...)


@pytest.mark.parametrize("forward", ["other_split", "unpacked", "mask_and_position_ids"])
def test_a_packed_forward_of_another_layout_raises(model, ctl, sequences, forward: str) -> None:
    _, traces = native_singles(model, ctl, sequences)
    ids, position_ids, cu_seqlens = packed(sequences)
    kwargs: dict[str, torch.Tensor] = {
        # 7 + 4 + 5 split as 7 + 5 + 4: the last two sequences' boundary moves.
        "other_split": {"position_ids": torch.cat([torch.arange(n) for n in (7, 5, 4)])[None]},
        "unpacked": {},  # one 16-token sequence: sequences 1 and 2 attend across
        # HF attends by a 2-D mask and ignores the restarts in position_ids.
        "mask_and_position_ids": {
            "position_ids": position_ids,
            "attention_mask": torch.ones_like(ids),
        },
    }[forward]
    expected = (
        "sequence 2 is flat tokens 11..15 in the context, its sequence there is flat tokens 7..11"
        if forward == "other_split"
        else "sequence 1 is flat tokens 7..10 in the context, its sequence there is flat tokens "
        "0..15"
    )
    for context in ({"position_ids": position_ids}, {"cu_seqlens": cu_seqlens}):
        with (
            pytest.raises(ValueError, match=expected),
            torch.no_grad(),
            ctl.replay(traces, **context),
        ):
            model(ids, use_cache=False, **kwargs)


def test_record_checks_the_forward_against_its_layout(model, ctl, sequences) -> None:
    _, right_mask, _ = padded(sequences, "right")
    ids, left_mask, _ = padded(sequences, "left")
    with (
        pytest.raises(ValueError, match="record: expected the forward to keep the sequences"),
        torch.no_grad(),
        ctl.record(attention_mask=right_mask),
    ):
        model(ids, attention_mask=left_mask)


# ---------------------------------------------------------------------- matching layouts


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mask_given_as", ["same", "bool_copy", "positional"])
def test_padded_layouts_that_match_replay_like_single_sequences(
    model, ctl, sequences, side: str, mask_given_as: str
) -> None:
    singles, traces = native_singles(model, ctl, sequences)
    ids, mask, spans = padded(sequences, side)
    forward_mask = mask.bool().clone() if mask_given_as == "bool_copy" else mask
    args = (ids, forward_mask) if mask_given_as == "positional" else (ids,)
    kwargs = {} if mask_given_as == "positional" else {"attention_mask": forward_mask}
    with torch.no_grad(), ctl.replay(traces, attention_mask=mask):
        logits = model(*args, **kwargs).logits
    for row, (single, span) in enumerate(zip(singles, spans, strict=True)):
        torch.testing.assert_close(logits[row, span], single, atol=1e-4, rtol=1e-4)


def test_a_right_padded_forward_without_its_mask_keeps_the_sequences(model, ctl, sequences) -> None:
    """Trailing padding cannot reach earlier tokens under causal attention: not an error."""
    singles, traces = native_singles(model, ctl, sequences)
    ids, mask, spans = padded(sequences, "right")
    with torch.no_grad(), ctl.replay(traces, attention_mask=mask):
        logits = model(ids).logits
    for row, (single, span) in enumerate(zip(singles, spans, strict=True)):
        torch.testing.assert_close(logits[row, span], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("context_by", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("forward_by", ["position_ids", "cu_seq_lens_q"])
def test_packed_layouts_that_match_replay_like_single_sequences(
    model, ctl, sequences, context_by: str, forward_by: str
) -> None:
    singles, traces = native_singles(model, ctl, sequences)
    ids, position_ids, cu_seqlens = packed(sequences)
    context = {"position_ids": position_ids, "cu_seqlens": cu_seqlens}[context_by]
    forward = {"position_ids": position_ids}
    if forward_by == "cu_seq_lens_q":  # as HF's flattening collator gives flash-attention
        forward |= {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens}
    with torch.no_grad(), ctl.replay(traces, **{context_by: context}):
        logits = model(ids, use_cache=False, **forward).logits[0]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    for i, single in enumerate(singles):
        torch.testing.assert_close(logits[starts[i] : starts[i + 1]], single, atol=1e-4, rtol=1e-4)


def test_record_without_a_layout_takes_the_forwards_own(model, ctl, sequences) -> None:
    """Before, it took every row as one sequence and recorded the padding's routing."""
    _, traces = native_singles(model, ctl, sequences)
    ids, mask, _ = padded(sequences, "left")
    with torch.no_grad(), ctl.record() as rec:
        model(ids, attention_mask=mask)
    assert rec.traces == traces


def test_the_tensors_the_context_was_given_are_not_read_again(
    model, ctl, sequences, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's case costs nothing per forward: no layout is derived from its inputs."""
    _, traces = native_singles(model, ctl, sequences)
    ids, mask, _ = padded(sequences, "left")
    derived = []
    model_layout = replay.forward_layout.LayoutInputs.model_layout
    monkeypatch.setattr(
        replay.forward_layout.LayoutInputs,
        "model_layout",
        lambda self, shape: derived.append(shape) or model_layout(self, shape),
    )
    with torch.no_grad(), ctl.replay(traces, attention_mask=mask):
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    assert derived == []
    with torch.no_grad(), ctl.replay(traces, attention_mask=mask):
        model(ids, attention_mask=mask.clone())
    assert derived == [tuple(ids.shape)]
