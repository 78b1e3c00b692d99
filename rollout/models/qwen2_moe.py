"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v bias, softmax top-k, a shared expert scaled
by a sigmoid gate, dense layers from ``mlp_only_layers`` / ``decoder_sparse_step``.

Checked against transformers' ``modeling_qwen2_moe.py`` (5.17 and 5.23 agree).
"""

from __future__ import annotations

from typing import Any

from rollout.layers.moe import RoutingParams
from rollout.models.decoder import DecoderArgs, MoECausalLM, check_silu
from routing_kernels.routing_method import RoutingMethod

__all__ = ["Qwen2MoeForCausalLM", "qwen_moe_layers", "qwen_routing"]


def qwen_moe_layers(config: Any) -> tuple[int, ...]:
    """HF's rule: layer ``i`` is sparse unless listed in ``mlp_only_layers``, and only every
    ``decoder_sparse_step``-th layer (``(i + 1) % step == 0``) is."""
    only_dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1)
    if not isinstance(step, int) or step <= 0:
        raise ValueError(f"decoder_sparse_step: expected a positive int, got {step!r}")
    if config.num_experts <= 0:
        raise ValueError(
            f"num_experts: expected a positive int for an MoE model, got {config.num_experts}"
        )
    return tuple(
        i for i in range(config.num_hidden_layers) if i not in only_dense and (i + 1) % step == 0
    )


def qwen_routing(config: Any) -> RoutingParams:
    """Softmax top-k; renormalised over the k when ``norm_topk_prob``."""
    method = RoutingMethod.RENORMALIZE_NAIVE if config.norm_topk_prob else RoutingMethod.DEFAULT
    return RoutingParams(
        method=method, top_k=config.num_experts_per_tok, num_experts=config.num_experts
    )


def check_no_sliding_window(config: Any) -> None:
    """Sliding-window attention is not implemented."""
    if getattr(config, "use_sliding_window", False):
        raise ValueError(
            "use_sliding_window: expected False (sliding-window attention is not implemented), "
            "got True"
        )


class Qwen2MoeForCausalLM(MoECausalLM):
    """Qwen2-MoE."""

    architecture = "Qwen2MoeForCausalLM"

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        check_silu(config)
        check_no_sliding_window(config)
        return DecoderArgs.from_hf_config(
            config,
            qkv_bias=getattr(config, "qkv_bias", True),
            dense_intermediate_size=config.intermediate_size,
            moe_intermediate_size=config.moe_intermediate_size,
            routing=qwen_routing(config),
            moe_layers=qwen_moe_layers(config),
            shared_intermediate_size=config.shared_expert_intermediate_size,
            shared_name="shared_expert",
            shared_gate=True,
        )
