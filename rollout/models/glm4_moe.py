"""GLM4-MoE (GLM-4.5, GLM-4.5-Air): DeepSeek-V3 routing (sigmoid scores, selection on scores +
``e_score_correction_bias``, group-limited top-k, normalised weights times
``routed_scaling_factor``) with a float32 router, shared experts, the first
``first_k_dense_replace`` layers dense, partial rotary (``partial_rotary_factor``), q/k/v bias
(``attention_bias``), optional per-head q/k RMSNorm (``use_qk_norm``).

Checked against transformers' ``modeling_glm4_moe.py`` (5.17 and 5.23 agree). Checkpoints may
carry the multi-token-prediction layers after the last decoder layer
(``model.layers.{num_hidden_layers + i}``); generation does not use them and they are skipped,
as HF skips them.
"""

from __future__ import annotations

from typing import Any

from rollout.layers.moe import RoutingParams
from rollout.models.decoder import DecoderArgs, MoECausalLM, check_silu, head_dim_of
from rollout.models.weights import decoder_layer_of
from routing_kernels.routing_method import RoutingMethod

__all__ = ["Glm4MoeForCausalLM"]


class Glm4MoeForCausalLM(MoECausalLM):
    """GLM4-MoE."""

    architecture = "Glm4MoeForCausalLM"

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        check_silu(config)
        if not config.norm_topk_prob:
            # DEEPSEEK_V3 (routing_kernels.route and replay) always normalises the selected weights.
            raise ValueError(
                "norm_topk_prob: expected True for GLM4-MoE's DEEPSEEK_V3 routing, got False"
            )
        partial = float(config.rope_parameters.get("partial_rotary_factor", 1.0))
        grouped = config.n_group is not None and config.n_group > 1
        return DecoderArgs.from_hf_config(
            config,
            rotary_dim=int(head_dim_of(config) * partial),
            qkv_bias=config.attention_bias,
            qk_norm="head" if config.use_qk_norm else "none",
            dense_intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.moe_intermediate_size,
            routing=RoutingParams(
                method=RoutingMethod.DEEPSEEK_V3,
                top_k=config.num_experts_per_tok,
                num_experts=config.n_routed_experts,
                n_group=config.n_group if grouped else None,
                topk_group=config.topk_group if grouped else None,
                routed_scaling_factor=float(config.routed_scaling_factor),
            ),
            moe_layers=tuple(range(config.first_k_dense_replace, config.num_hidden_layers)),
            router_float32=True,
            shared_intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
            shared_name="shared_experts",
        )

    def canonical_name(self, name: str) -> str | None:
        layer = decoder_layer_of(name)
        return None if layer is not None and layer >= self.args.num_layers else name
