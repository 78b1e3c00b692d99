"""SamplingParams: defaults, normalisation, and the errors its validation raises."""

from __future__ import annotations

import dataclasses

import pytest

from rollout.sampling_params import SamplingParams


def test_defaults_match_the_documented_api() -> None:
    params = SamplingParams()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0, -1)
    assert params.seed is None and params.stop_token_ids == ()
    assert not params.ignore_eos and not params.return_routed_experts
    assert params.routed_experts_start == 0 and not params.greedy


def test_normalises_lists_and_numbers() -> None:
    params = SamplingParams(stop_token_ids=[3, 0, 7], temperature=0, top_p=1)
    assert params.stop_token_ids == (3, 0, 7)
    assert isinstance(params.temperature, float) and params.greedy
    assert isinstance(params.top_p, float)


def test_is_frozen_and_keyword_only() -> None:
    params = SamplingParams(max_tokens=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(4)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field", "actual"),
    [
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"temperature": -0.5}, "temperature", "-0.5"),
        ({"temperature": float("nan")}, "temperature", "nan"),
        ({"temperature": float("inf")}, "temperature", "inf"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_p": 1.5}, "top_p", "1.5"),
        ({"top_k": 0}, "top_k", "0"),
        ({"top_k": -2}, "top_k", "-2"),
        ({"seed": -1}, "seed", "-1"),
        ({"stop_token_ids": [1, -3]}, "stop_token_ids[1]", "-3"),
        ({"routed_experts_start": -1}, "routed_experts_start", "-1"),
    ],
)
def test_out_of_range_raises_value_error_naming_the_field(
    kwargs: dict[str, object], field: str, actual: str
) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field}: ") and message.endswith(f"got {actual}"), message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": None}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"stop_token_ids": [1, 2.0]}, "stop_token_ids[1]"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"return_routed_experts": "yes"}, "return_routed_experts"),
    ],
)
def test_wrong_type_raises_type_error_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(TypeError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(f"{field}: expected"), str(info.value)


def test_boundary_values_are_accepted() -> None:
    params = SamplingParams(max_tokens=1, top_p=1e-9, top_k=1, seed=0, stop_token_ids=(0,))
    assert params.top_k == 1 and params.seed == 0
