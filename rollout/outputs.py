"""What the engine hands back: ``RequestOutput`` per request, the model's ``RoutingSpec`` and
the engine's counters (``EngineStats``).

Rollout returns plain numpy arrays and these frozen records; ``replay`` wraps them (DESIGN.md:
rollout never imports replay, so this ``RoutingSpec`` is rollout's own description of the
model's routing, built from the model's ``routing_params``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rollout.engine.sequence import FinishReason, Sequence
from rollout.layers.moe import RoutingParams
from routing_kernels.expert_ids import numpy_id_dtype
from routing_kernels.routing_method import RoutingMethod

__all__ = ["EngineStats", "RequestOutput", "RoutingSpec"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RoutingSpec:
    """How the model routes, and the layer axis of routed-expert rows.

    Attributes:
        moe_layers: global decoder-layer indices of the MoE layers, ascending (dense layers
            have no rows).
        num_experts: routed experts per MoE layer.
        top_k: experts each token is routed to.
        method: the routing method (``routing_kernels.RoutingMethod``).
        n_group, topk_group: DEEPSEEK_V3's group-limited selection (None: no grouping).
        routed_scaling_factor: DEEPSEEK_V3's weight scale (1.0 for every other method).
    """

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    method: RoutingMethod
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        layers = tuple(self.moe_layers)
        if not layers or list(layers) != sorted(set(layers)) or min(layers) < 0:
            raise ValueError(
                f"moe_layers: expected distinct ascending non-negative indices, got {layers}"
            )
        object.__setattr__(self, "moe_layers", layers)
        # RoutingParams validates the rest (method, top_k range, grouping, scale).
        self.routing_params()

    @classmethod
    def from_model(cls, moe_layers: tuple[int, ...], routing: RoutingParams) -> RoutingSpec:
        """The spec of a model with MoE layers ``moe_layers`` routed by ``routing``."""
        return cls(
            moe_layers=moe_layers,
            num_experts=routing.num_experts,
            top_k=routing.top_k,
            method=routing.method,
            n_group=routing.n_group,
            topk_group=routing.topk_group,
            routed_scaling_factor=routing.routed_scaling_factor,
        )

    def routing_params(self) -> RoutingParams:
        """The same routing as the model layers' ``RoutingParams``."""
        return RoutingParams(
            method=self.method,
            top_k=self.top_k,
            num_experts=self.num_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    @property
    def num_moe_layers(self) -> int:
        """Length of the layer axis of routed-expert rows."""
        return len(self.moe_layers)

    @property
    def id_dtype(self) -> np.dtype:
        """The compact dtype of expert ids (DESIGN.md): uint8, int16 or int32."""
        return numpy_id_dtype(self.num_experts)


@dataclass(kw_only=True, slots=True, frozen=True)
class RequestOutput:
    """One finished request.

    Attributes:
        request_id: the engine's id of the request (unique per engine, increasing).
        prompt_token_ids: the prompt.
        token_ids: the generated tokens (a stop token included).
        text: ``token_ids`` decoded when the checkpoint has a tokenizer, else None.
        logprobs: float32 [len(token_ids)], the log-probability of each generated token under
            the temperature-1 softmax of the model's float32 logits (the behaviour policy).
        finish_reason: "stop" (eos or a stop token), "length" (max_tokens) or "abort".
        num_cached_tokens: prompt tokens served from the prefix cache.
        routed_experts: with ``SamplingParams(return_routed_experts=True)`` on an engine with
            ``capture_routing``, the routing rows ``s .. N-2`` of the N prompt + generated
            tokens (``s = routed_experts_start``; row t is the routing of the forward that
            consumed token t, the last token was never fed): [N - 1 - s, num_moe_layers,
            top_k] in ``RoutingSpec.id_dtype``, layers in ``RoutingSpec.moe_layers`` order,
            each row's ids distinct and best first. None otherwise.
    """

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    logprobs: np.ndarray
    finish_reason: FinishReason
    num_cached_tokens: int
    routed_experts: np.ndarray | None = None

    @classmethod
    def from_sequence(
        cls, seq: Sequence, *, text: str | None, routed_experts: np.ndarray | None = None
    ) -> RequestOutput:
        """The output of a finished sequence."""
        assert seq.finish_reason is not None, f"{seq} has not finished"
        return cls(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.generated_token_ids,
            text=text,
            logprobs=np.asarray(seq.logprobs, dtype=np.float32),
            finish_reason=seq.finish_reason,
            num_cached_tokens=seq.num_cached_tokens,
            routed_experts=routed_experts,
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class EngineStats:
    """Counters of an engine since it started.

    Attributes:
        num_kv_blocks, block_size: the KV cache.
        max_model_len: the context length.
        num_preemptions: sequences preempted (recomputed later) for lack of KV blocks.
        prefix_cache_queries: prompt tokens looked up in the prefix cache.
        prefix_cache_hits: of those, tokens served from it.
        cuda_graph_sizes: decode batch sizes with a CUDA graph (empty: eager).
    """

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    cuda_graph_sizes: tuple[int, ...]

    @property
    def prefix_cache_hit_rate(self) -> float:
        """``prefix_cache_hits / prefix_cache_queries`` (0 before any query)."""
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0
