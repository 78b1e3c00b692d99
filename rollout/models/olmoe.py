"""OLMoE: q/k RMSNorm over the whole projection (not per head), optional ``clip_qkv``, softmax
top-k (``norm_topk_prob`` -> RENORMALIZE_NAIVE, else DEFAULT), every layer sparse.

Checked against transformers' ``modeling_olmoe.py`` (5.17 and 5.23 agree).
"""

from __future__ import annotations

from typing import Any

from rollout.layers.moe import RoutingParams
from rollout.models.decoder import DecoderArgs, MoECausalLM, check_silu, head_dim_of
from routing_kernels.routing_method import RoutingMethod

__all__ = ["OlmoeForCausalLM"]


class OlmoeForCausalLM(MoECausalLM):
    """OLMoE."""

    architecture = "OlmoeForCausalLM"

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        check_silu(config)
        head_dim = head_dim_of(config)
        # HF sizes k_norm as (hidden // heads) * kv_heads: only consistent with that head_dim.
        if head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(
                f"head_dim: expected hidden_size // num_attention_heads = "
                f"{config.hidden_size // config.num_attention_heads} for OLMoE, got {head_dim}"
            )
        method = RoutingMethod.RENORMALIZE_NAIVE if config.norm_topk_prob else RoutingMethod.DEFAULT
        return DecoderArgs.from_hf_config(
            config,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm="full",
            clip_qkv=config.clip_qkv,
            moe_intermediate_size=config.intermediate_size,
            routing=RoutingParams(
                method=method, top_k=config.num_experts_per_tok, num_experts=config.num_experts
            ),
            moe_layers=tuple(range(config.num_hidden_layers)),
        )
