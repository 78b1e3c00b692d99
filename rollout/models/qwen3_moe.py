"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head q/k RMSNorm, softmax top-k
(``norm_topk_prob`` -> RENORMALIZE_NAIVE, else DEFAULT), no shared expert, dense layers from
``mlp_only_layers`` / ``decoder_sparse_step``.

Checked against transformers' ``modeling_qwen3_moe.py`` (5.17 and 5.23 agree).
"""

from __future__ import annotations

from typing import Any

from rollout.models.decoder import DecoderArgs, MoECausalLM, check_silu
from rollout.models.qwen2_moe import (
    check_no_sliding_window,
    qwen_moe_layers,
    qwen_routing,
)

__all__ = ["Qwen3MoeForCausalLM"]


class Qwen3MoeForCausalLM(MoECausalLM):
    """Qwen3-MoE."""

    architecture = "Qwen3MoeForCausalLM"

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        check_silu(config)
        check_no_sliding_window(config)
        return DecoderArgs.from_hf_config(
            config,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm="head",
            dense_intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.moe_intermediate_size,
            routing=qwen_routing(config),
            moe_layers=qwen_moe_layers(config),
        )
