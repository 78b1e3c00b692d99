"""Mixtral: GQA, every layer sparse, top-k then softmax over the k (RENORMALIZE; HF computes
softmax -> top-k -> renormalise, the same math).

Checked against transformers' ``modeling_mixtral.py`` (5.17 and 5.23 agree). Checkpoints name
the MoE block ``block_sparse_moe`` and the experts' projections ``w1`` (gate), ``w3`` (up) and
``w2`` (down); ``canonical_name`` maps them onto HF v5's names, as HF's own loader does.
"""

from __future__ import annotations

import re
from typing import Any

from rollout.layers.moe import RoutingParams
from rollout.models.decoder import DecoderArgs, MoECausalLM, check_silu
from routing_kernels.routing_method import RoutingMethod

__all__ = ["MixtralForCausalLM"]

_EXPERT_W = re.compile(r"\.experts\.(\d+)\.w([123])\.weight$")
_W_PROJ = {"1": "gate", "2": "down", "3": "up"}


class MixtralForCausalLM(MoECausalLM):
    """Mixtral."""

    architecture = "MixtralForCausalLM"

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        check_silu(config)
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError(
                f"sliding_window: expected None (sliding-window attention is not implemented), "
                f"got {config.sliding_window}"
            )
        return DecoderArgs.from_hf_config(
            config,
            moe_intermediate_size=config.intermediate_size,
            routing=RoutingParams(
                method=RoutingMethod.RENORMALIZE,
                top_k=config.num_experts_per_tok,
                num_experts=config.num_local_experts,
            ),
            moe_layers=tuple(range(config.num_hidden_layers)),
        )

    def canonical_name(self, name: str) -> str | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT_W.sub(lambda m: f".experts.{m[1]}.{_W_PROJ[m[2]]}_proj.weight", name)
