"""Token sampling from float32 logits, and the behaviour-policy log-probability of each token.

Legend: S sampling rows (one per sequence that samples this step), V vocabulary.

Per row: a greedy request (``SamplingParams.greedy``: a temperature below
``rollout.sampling_params.MIN_SAMPLING_TEMPERATURE``, 0 included) takes the argmax (ties go to
the lower id). Otherwise the logits are divided by the temperature, filtered by top-k and then
top-p (on the top-k distribution, FlashInfer's ``top_k_first`` order), and a token is drawn.
Whatever the sampling settings, the returned logprob is ``log_softmax(logits)[token]`` of the
raw float32 logits (temperature 1, no filtering): the probability the model's policy gave the
token, which RL needs.

Non-finite logits. A row with a NaN or infinite logit (a broken weight or activation: nothing
sensible can be sampled from it) gets logprob NaN and token 0, decided on the device with the
sampling. The NaN is the row's flag: it reaches the host in the logprobs' copy, which the engine
waits for anyway, so checking it costs no synchronisation of its own (the engine raises
``rollout.engine.llm_engine.NonFiniteLogitsError`` naming the request). Token 0 keeps the id a
valid one for the next step, launched before the host sees the flag, which feeds it.

Randomness. A request with a ``seed`` draws with noise that depends only on ``(seed, number
of tokens it has generated)``, so it gets the same tokens whatever else is in the batch, at
whatever row, before or after a preemption, on any device: ``keyed_sample`` takes the Gumbel-max
of the filtered logits with uniform noise from a counter-based integer hash (splitmix64) of
``(seed, counter, token id)``. Rows without a seed draw from the engine's generator (seeded by
``LLM(seed=...)``): one 63-bit step seed per call. On CUDA with FlashInfer installed those rows
go through FlashInfer's fused sampling kernels (``sampling_from_logits`` /
``top_k_top_p_sampling_from_logits``) seeded with the step seed; FlashInfer mixes the row index
into its Philox stream, which is why seeded rows do not use it. Elsewhere they take
``keyed_sample`` with keys ``(step seed, row)``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rollout.sampling_params import SamplingParams
from routing_kernels import batch_invariant

__all__ = [
    "SampledTokens",
    "Sampler",
    "SamplingInputs",
    "apply_top_k_top_p",
    "keyed_sample",
    "uniform_noise",
]

logger = logging.getLogger(__name__)


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
# Unseeded rows' counters start here, so their keys never equal a seeded request's.
_UNSEEDED_COUNTER_BASE = 1 << 40
_UNIFORM_BITS = 23  # (k + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` on int64 is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on int64 (multiplications wrap modulo 2**64)."""
    x ^= _shift_right(x, 30)
    x *= _MIX1
    x ^= _shift_right(x, 27)
    x *= _MIX2
    x ^= _shift_right(x, 31)
    return x


def uniform_noise(seeds_S: torch.Tensor, counters_S: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform float32 noise [S, V] in (0, 1), a pure function of ``(seed, counter, column)``.

    Integer arithmetic only, so the same keys give bit-identical noise on every device and at
    every row of a batch.
    """
    key_S = _mix64_(seeds_S.to(torch.int64) * _GOLDEN + _mix64_(counters_S.to(torch.int64) + 1))
    column_V = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds_S.device)
    bits_SV = _mix64_(key_S[:, None] + column_V[None, :] * _GOLDEN)
    bits_SV = _shift_right(bits_SV, 64 - _UNIFORM_BITS)
    return (bits_SV.to(torch.float32) + 0.5) * (2.0**-_UNIFORM_BITS)


def apply_top_k_top_p(
    logits_SV: torch.Tensor, top_k_S: torch.Tensor | None, top_p_S: torch.Tensor | None
) -> torch.Tensor:
    """Set the logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    ``top_k_S`` (int, ``>= V`` disables) keeps the k largest logits (ties: the lower ids).
    ``top_p_S`` (float in (0, 1], 1 disables) then keeps the smallest prefix of the remaining
    tokens, by decreasing probability, whose mass reaches p (the most likely token always).
    """
    if top_k_S is None and top_p_S is None:
        return logits_SV
    # Stable descending sort: equal logits stay in id order, so ties keep the lower id.
    sorted_SV, order_SV = logits_SV.sort(dim=-1, descending=True, stable=True)
    if top_k_S is not None:
        rank_V = torch.arange(logits_SV.shape[-1], device=logits_SV.device)
        sorted_SV = sorted_SV.masked_fill(rank_V[None, :] >= top_k_S[:, None], float("-inf"))
    if top_p_S is not None:
        probs_SV = sorted_SV.softmax(dim=-1)
        mass_before_SV = probs_SV.cumsum(dim=-1) - probs_SV
        # top_p == 1 keeps everything even where the rounded cumulative mass reaches 1 early.
        drop_SV = (mass_before_SV >= top_p_S[:, None]) & (top_p_S[:, None] < 1.0)
        sorted_SV = sorted_SV.masked_fill(drop_SV, float("-inf"))
    return torch.full_like(logits_SV, float("-inf")).scatter_(-1, order_SV, sorted_SV)


def keyed_sample(
    scaled_SV: torch.Tensor,
    seeds_S: torch.Tensor,
    counters_S: torch.Tensor,
    top_k_S: torch.Tensor | None = None,
    top_p_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one id per row from ``softmax(scaled)`` after top-k / top-p filtering, with the
    noise of ``uniform_noise(seeds, counters)`` (Gumbel-max: ``argmax(z - log(-log u))``)."""
    filtered_SV = apply_top_k_top_p(scaled_SV, top_k_S, top_p_S)
    u_SV = uniform_noise(seeds_S, counters_S, scaled_SV.shape[-1])
    gumbel_SV = u_SV.log_().neg_().log_().neg_()
    return (filtered_SV + gumbel_SV).argmax(dim=-1)


@dataclass(kw_only=True, slots=True, frozen=True)
class SamplingInputs:
    """The per-row sampling settings of one step, on the sampler's device.

    Attributes:
        num_rows: S.
        all_greedy: every row is greedy (no randomness, no filtering).
        greedy_S: bool, row is greedy (None when no row is or every row is).
        temperature_S: float32, 1.0 on greedy rows (None when ``all_greedy``).
        top_k_S: int32, V where disabled (None when no row filters by top-k).
        top_p_S: float32, 1.0 where disabled (None when no row filters by top-p).
        seeded_rows: int64 indices of the rows with a request seed (None: none).
        seeds_S, counters_S: int64 keys of ``keyed_sample`` for every row: the request's seed
            and its number of generated tokens, or the step seed and the row index for rows
            without one (None when ``all_greedy``).
        step_seed: this step's draw from the engine's generator (FlashInfer's seed).
    """

    num_rows: int
    all_greedy: bool
    greedy_S: torch.Tensor | None
    temperature_S: torch.Tensor | None
    top_k_S: torch.Tensor | None
    top_p_S: torch.Tensor | None
    seeded_rows: torch.Tensor | None
    seeds_S: torch.Tensor | None
    counters_S: torch.Tensor | None
    step_seed: int


class SampledTokens:
    """One step's sampled ids and logprobs on their way to the host, without waiting for them.

    ``ids_S`` [S] int64 stays on the device: the next step, launched before these values reach
    the host, reads its fed tokens from it there. The constructor enqueues the copies to pinned
    host memory and an event on the device's current stream; ``tolist`` waits for that event
    only. On CPU the host tensors are the sampled ones.

    Args:
        ids_S: the sampled ids [S] int64 (``Sampler``'s output).
        logprobs_S: their logprobs [S] float32, on the same device (NaN: the row's logits were
            not finite).
    """

    __slots__ = ("_copied", "_host_ids_S", "_host_logprobs_S", "ids_S")

    def __init__(self, ids_S: torch.Tensor, logprobs_S: torch.Tensor) -> None:
        self.ids_S = ids_S
        self._copied: torch.cuda.Event | None = None
        if ids_S.device.type == "cuda":
            # A non-blocking copy to the host lands in pinned memory: the host does not wait.
            self._host_ids_S = ids_S.to("cpu", non_blocking=True)
            self._host_logprobs_S = logprobs_S.to("cpu", non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(ids_S.device))
        else:
            self._host_ids_S, self._host_logprobs_S = ids_S, logprobs_S

    @property
    def num_rows(self) -> int:
        """S, the sampling rows."""
        return self.ids_S.shape[0]

    def is_ready(self) -> bool:
        """Whether the copies have landed (``tolist`` would not wait); never waits."""
        return self._copied is None or self._copied.query()

    def tolist(self) -> tuple[list[int], list[float]]:
        """Wait for the copies; the ids and the logprobs as host lists."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_ids_S.tolist(), self._host_logprobs_S.tolist()


class Sampler:
    """Samples tokens and computes their logprobs (see the module docstring).

    Args:
        vocab_size: V, the logits' width.
        device: where the logits live.
        seed: seeds the engine's generator, which unseeded rows draw from.
        use_flashinfer: sample unseeded rows with FlashInfer; None: when on CUDA and
            flashinfer is installed.
        deterministic: logprobs by ``routing_kernels.batch_invariant.token_logprobs``, the
            function a trainer computes its own with (the engine's deterministic mode).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        device: torch.device | str,
        seed: int = 0,
        use_flashinfer: bool | None = None,
        deterministic: bool = False,
    ) -> None:
        self.vocab_size = vocab_size
        self.deterministic = deterministic
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._flashinfer_sampling: Any = None
        if use_flashinfer is None:
            use_flashinfer = (
                self.device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None
            )
        if use_flashinfer:
            if self.device.type != "cuda":
                raise ValueError(f"use_flashinfer: expected a CUDA device, got {self.device}")
            import flashinfer.sampling

            self._flashinfer_sampling = flashinfer.sampling
        logger.info(
            "sampling on %s: %s",
            self.device,
            "FlashInfer + keyed torch" if use_flashinfer else "torch",
        )

    @property
    def uses_flashinfer(self) -> bool:
        """Whether unseeded rows are sampled by FlashInfer."""
        return self._flashinfer_sampling is not None

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=dtype)
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
        return host.to(self.device, non_blocking=True)

    def prepare(
        self, params: Sequence[SamplingParams], num_generated: Sequence[int]
    ) -> SamplingInputs:
        """The device inputs for rows with settings ``params`` whose requests have generated
        ``num_generated`` tokens so far; draws this step's seed from the engine's generator."""
        assert len(params) == len(num_generated), (len(params), len(num_generated))
        step_seed = int(torch.randint(0, 2**63 - 1, (), generator=self.generator))
        greedy = [p.greedy for p in params]
        if all(greedy):
            return SamplingInputs(
                num_rows=len(params),
                all_greedy=True,
                greedy_S=None,
                temperature_S=None,
                top_k_S=None,
                top_p_S=None,
                seeded_rows=None,
                seeds_S=None,
                counters_S=None,
                step_seed=step_seed,
            )
        vocab = self.vocab_size
        use_top_k = any(0 < p.top_k < vocab and not g for p, g in zip(params, greedy))
        use_top_p = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not greedy[i]]
        return SamplingInputs(
            num_rows=len(params),
            all_greedy=False,
            greedy_S=self._to_device(greedy, torch.bool) if any(greedy) else None,
            temperature_S=self._to_device(
                [p.temperature if not g else 1.0 for p, g in zip(params, greedy)],
                torch.float32,
            ),
            top_k_S=self._to_device(
                [p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int32
            )
            if use_top_k
            else None,
            top_p_S=self._to_device([p.top_p for p in params], torch.float32)
            if use_top_p
            else None,
            seeded_rows=self._to_device(seeded, torch.int64) if seeded else None,
            seeds_S=self._to_device(
                # Any non-negative int seed: its low 64 bits, as an int64.
                [_signed(p.seed % (1 << 64)) if p.seed is not None else step_seed for p in params],
                torch.int64,
            ),
            counters_S=self._to_device(
                [
                    n if p.seed is not None else _UNSEEDED_COUNTER_BASE + i
                    for i, (p, n) in enumerate(zip(params, num_generated))
                ],
                torch.int64,
            ),
            step_seed=step_seed,
        )

    def __call__(
        self, logits_SV: torch.Tensor, inputs: SamplingInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids [S] int64 and their temperature-1 logprobs [S] float32 (on the device);
        a row with a non-finite logit gets id 0 and logprob NaN (the module docstring).

        Raises:
            ValueError: ``logits_SV`` is not float32 [S, V] matching ``inputs``.
        """
        if (
            logits_SV.dtype != torch.float32
            or logits_SV.dim() != 2
            or logits_SV.shape != (inputs.num_rows, self.vocab_size)
        ):
            raise ValueError(
                f"logits: expected float32 [{inputs.num_rows}, {self.vocab_size}], "
                f"got {logits_SV.dtype} {tuple(logits_SV.shape)}"
            )
        if inputs.all_greedy:
            ids_S = logits_SV.argmax(dim=-1)
        else:
            ids_S = self._sample(logits_SV, inputs)
        if self.deterministic:
            return ids_S, batch_invariant.token_logprobs(logits_SV, ids_S)
        logprobs_S = logits_SV.gather(1, ids_S[:, None])[:, 0] - logits_SV.logsumexp(dim=-1)
        # A logprob of finite logits is finite, so NaN marks the rows that were not.
        nonfinite_S = ~logits_SV.isfinite().all(dim=-1)
        return ids_S.masked_fill(nonfinite_S, 0), logprobs_S.masked_fill(nonfinite_S, math.nan)

    def _sample(self, logits_SV: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        scaled_SV = logits_SV / inputs.temperature_S[:, None]
        if self._flashinfer_sampling is None:
            ids_S = keyed_sample(
                scaled_SV,
                inputs.seeds_S,
                inputs.counters_S,
                inputs.top_k_S,
                inputs.top_p_S,
            )
        else:
            ids_S = self._flashinfer_sample(scaled_SV, inputs)
            if inputs.seeded_rows is not None:
                rows = inputs.seeded_rows
                ids_S[rows] = keyed_sample(
                    scaled_SV[rows],
                    inputs.seeds_S[rows],
                    inputs.counters_S[rows],
                    None if inputs.top_k_S is None else inputs.top_k_S[rows],
                    None if inputs.top_p_S is None else inputs.top_p_S[rows],
                )
        if inputs.greedy_S is not None:
            ids_S = torch.where(inputs.greedy_S, logits_SV.argmax(dim=-1), ids_S)
        return ids_S

    def _flashinfer_sample(self, scaled_SV: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        sampling = self._flashinfer_sampling
        # A scalar seed and offset: FlashInfer gives every row its own Philox subsequence.
        seed, offset = inputs.step_seed, 0
        if inputs.top_k_S is None and inputs.top_p_S is None:
            ids_S = sampling.sampling_from_logits(scaled_SV, seed=seed, offset=offset)
        elif inputs.top_k_S is None:
            ids_S = sampling.top_p_sampling_from_probs(
                scaled_SV.softmax(dim=-1), inputs.top_p_S, seed=seed, offset=offset
            )
        else:
            # A top-k of V (disabled rows) masks nothing in FlashInfer's top-k kernels.
            top_p = inputs.top_p_S if inputs.top_p_S is not None else 1.0
            ids_S = sampling.top_k_top_p_sampling_from_logits(
                scaled_SV, inputs.top_k_S, top_p, seed=seed, offset=offset
            )
        return ids_S.to(torch.int64)
