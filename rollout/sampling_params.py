"""Per-request generation settings: ``SamplingParams``."""

from __future__ import annotations

from dataclasses import dataclass

from rollout.config import (
    check_bool,
    check_float,
    check_int,
    check_optional_int,
    check_token_ids,
)

__all__ = ["MIN_SAMPLING_TEMPERATURE", "SamplingParams"]

# Temperatures below this sample greedily (see SamplingParams.temperature).
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(kw_only=True, slots=True, frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops; validated at construction.

    Args:
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature (>= 0). 0, and every temperature below
            ``MIN_SAMPLING_TEMPERATURE`` (1e-5; 1e-38, subnormals), means greedy: argmax, ties
            to the lower id, ``top_p``, ``top_k`` and ``seed`` unused. That is the limit of
            sampling as the temperature goes to 0, which such temperatures reach anyway but for
            near-ties (a logit gap below ~1e-3), and the logits they divide would overflow
            float32 for the smallest. Whatever the temperature, a token's logprob is that of
            the temperature-1 distribution (``rollout.sampler``).
        top_p: nucleus mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens (>= 1); -1 disables it.
        seed: per-request seed (>= 0) for reproducible sampling; None uses the engine's stream.
        stop_token_ids: ids that end the request (kept in its output); a list is stored as a
            tuple. They apply even with ``ignore_eos``.
        ignore_eos: keep generating past the checkpoint's eos ids.
        return_routed_experts: return the routed experts of every token (issue 4).
        routed_experts_start: first token whose routing row is returned (>= 0; at most the
            prompt length, checked when the request is added).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_routed_experts: bool = False
    routed_experts_start: int = 0

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, minimum=1)
        temperature = check_float("temperature", self.temperature, low=0.0, high=float("inf"))
        top_p = check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("top_k", self.top_k, minimum=-1)
        if self.top_k == 0:
            raise ValueError("top_k: expected -1 (disabled) or an int >= 1, got 0")
        check_optional_int("seed", self.seed, minimum=0)
        stop_token_ids = check_token_ids("stop_token_ids", self.stop_token_ids)
        check_bool("ignore_eos", self.ignore_eos)
        check_bool("return_routed_experts", self.return_routed_experts)
        check_int("routed_experts_start", self.routed_experts_start, minimum=0)
        # The dataclass is frozen: normalised values are stored through object.__setattr__.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when ``temperature < MIN_SAMPLING_TEMPERATURE`` (argmax sampling)."""
        return self.temperature < MIN_SAMPLING_TEMPERATURE
