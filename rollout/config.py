"""Engine settings: the static ``EngineConfig`` and the run-time ``EngineState``.

``EngineConfig`` holds what the user chose when building ``rollout.LLM`` and never changes.
``EngineState`` holds what the engine discovers while starting (how many KV blocks fit, the
eos ids of the checkpoint, the resolved context length), so the config stays immutable
(STYLE.md point 6). The ``check_*`` helpers are the validators both this module and
``rollout.sampling_params`` use; each returns the normalised value or raises TypeError (wrong
Python type) / ValueError (out of range) naming the field, the expected and the actual value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("safetensors", "dummy")
DATA_PARALLEL_MODES = ("replicas", "dp_attention")
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as an int, requiring ``value >= minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_optional_int(name: str, value: object, *, minimum: int) -> int | None:
    """Like ``check_int`` but ``None`` passes through."""
    return None if value is None else check_int(name, value, minimum=minimum)


def check_float(
    name: str, value: object, *, low: float, high: float, low_open: bool = False
) -> float:
    """Return ``value`` as a float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__} {value!r}")
    value = float(value)
    above_low = value > low if low_open else value >= low
    # NaN fails both comparisons, so it is rejected here too.
    if not (above_low and value <= high and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name}: expected a finite float in {interval}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of the strings ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_token_ids(name: str, value: object) -> tuple[int, ...]:
    """Return ``value`` (an iterable of non-negative ints, not a str) as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name}: expected a sequence of ints, got {type(value).__name__} {value!r}"
        )
    ids = tuple(value)
    for i, token_id in enumerate(ids):
        check_int(f"{name}[{i}]", token_id, minimum=0)
    return ids


@dataclass(kw_only=True, slots=True, frozen=True)
class EngineConfig:
    """Static settings of one engine (the keyword arguments of ``rollout.LLM``).

    Args:
        model: folder of the HF-format checkpoint (config.json + *.safetensors); a path-like
            is stored as a str. Existence is checked by the loader, not here.
        dtype: ``"auto"`` (checkpoint dtype on CUDA, float32 on CPU) or a float dtype name.
        device: ``None`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        max_num_seqs: most sequences running at once (and so in one batch).
        max_num_batched_tokens: most tokens fed forward in one step (the chunked-prefill budget).
        max_model_len: longest sequence (prompt + generated); ``None`` takes the model's
            ``max_position_embeddings`` (see ``resolve_max_model_len``).
        block_size: tokens per KV-cache block.
        kv_cache_blocks: fixes the number of KV blocks; ``None`` sizes the cache from memory.
        gpu_memory_utilization: fraction of device memory the engine may use, in (0, 1].
        enable_prefix_caching: reuse the KV of full blocks shared with earlier requests.
        enforce_eager: no CUDA graphs.
        seed: seed of the engine's own random state (dummy weights, unseeded requests).
        load_format: ``"safetensors"`` or ``"dummy"`` (random weights from config.json).
        capture_routing: record each token's routed experts (issue 4).
        data_parallel_size: engine ranks (processes) serving requests; 1 is the in-process
            engine (``rollout.engine.data_parallel`` runs more).
        data_parallel_mode: ``"replicas"`` (independent engines, requests spread across ranks)
            or ``"dp_attention"`` (attention per rank, MoE layers over the tokens of all ranks,
            each rank computing a 1/N slice of the experts: ``dp_attention``). With
            ``data_parallel_size`` > 1, ``"dp_attention"`` runs eager: ``enforce_eager`` is set
            to True (its collectives change shape every step, which CUDA graphs cannot replay).
        deterministic: batch-invariant numerics (``routing_kernels.batch_invariant``): a
            sequence's logits and logprobs do not depend on its batch mates, chunked-prefill
            boundaries, prefix-cache hits or recompute, and equal those of
            ``rollout.load_policy(..., deterministic=True)`` bit for bit. Not with
            ``data_parallel_mode="dp_attention"`` (its reduce-scatter sums ranks' partials).
    """

    model: str
    dtype: str = "auto"
    device: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    load_format: str = "safetensors"
    capture_routing: bool = False
    data_parallel_size: int = 1
    data_parallel_mode: str = "replicas"
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(
                f"model: expected a path (str or os.PathLike), got {type(self.model).__name__}"
            )
        # The dataclass is frozen: normalised values are stored through object.__setattr__.
        object.__setattr__(self, "model", os.fspath(self.model))
        if not self.model:
            raise ValueError("model: expected a non-empty path, got ''")
        check_choice("dtype", self.dtype, DTYPES)
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(
                f"device: expected None or a str, got {type(self.device).__name__} {self.device!r}"
            )
        if self.device is not None and not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(
                f"device: expected None, 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        check_int("max_num_seqs", self.max_num_seqs, minimum=1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        check_optional_int("max_model_len", self.max_model_len, minimum=2)
        check_int("block_size", self.block_size, minimum=1)
        check_optional_int("kv_cache_blocks", self.kv_cache_blocks, minimum=1)
        object.__setattr__(
            self,
            "gpu_memory_utilization",
            check_float(
                "gpu_memory_utilization",
                self.gpu_memory_utilization,
                low=0.0,
                high=1.0,
                low_open=True,
            ),
        )
        check_bool("enable_prefix_caching", self.enable_prefix_caching)
        check_bool("enforce_eager", self.enforce_eager)
        check_int("seed", self.seed, minimum=0)
        check_choice("load_format", self.load_format, LOAD_FORMATS)
        check_bool("capture_routing", self.capture_routing)
        check_int("data_parallel_size", self.data_parallel_size, minimum=1)
        check_choice("data_parallel_mode", self.data_parallel_mode, DATA_PARALLEL_MODES)
        check_bool("deterministic", self.deterministic)
        if self.deterministic and self.dp_attention:
            raise ValueError(
                "data_parallel_mode: expected 'replicas' with deterministic=True (dp_attention "
                "sums the ranks' expert outputs in a collective), got 'dp_attention'"
            )
        if self.dp_attention:
            object.__setattr__(self, "enforce_eager", True)

    @property
    def dp_attention(self) -> bool:
        """Whether the ranks cooperate in the MoE layers (``data_parallel_mode="dp_attention"``
        with more than one rank): every rank steps in lockstep with the others."""
        return self.data_parallel_size > 1 and self.data_parallel_mode == "dp_attention"

    def resolve_max_model_len(self, max_position_embeddings: int) -> int:
        """The context length to use: ``max_model_len`` if set, else the model's limit.

        Raises ValueError when ``max_model_len`` exceeds the model's ``max_position_embeddings``.
        """
        limit = check_int("max_position_embeddings", max_position_embeddings, minimum=2)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len: expected <= the model's max_position_embeddings {limit}, "
                f"got {self.max_model_len}"
            )
        return self.max_model_len


@dataclass(kw_only=True, slots=True)
class EngineState:
    """Values the engine discovers at start-up (validated when built, mutable afterwards).

    Args:
        num_kv_blocks: KV-cache blocks allocated (``kv_cache_blocks`` or memory-based sizing).
        max_model_len: resolved context length (``EngineConfig.resolve_max_model_len``).
        eos_token_ids: ids that end a sequence unless ``ignore_eos`` (from the checkpoint's
            generation/model config; may be empty).
    """

    num_kv_blocks: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_int("num_kv_blocks", self.num_kv_blocks, minimum=1)
        check_int("max_model_len", self.max_model_len, minimum=2)
        self.eos_token_ids = check_token_ids("eos_token_ids", self.eos_token_ids)
