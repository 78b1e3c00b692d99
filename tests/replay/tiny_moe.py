"""Tiny HF transformers MoE models of every supported family, built in memory for replay tests.

Hidden 32, 3 decoder layers (a dense one where the family has dense layers), 8 experts, top-2,
eager attention and eager experts, float32. Router weights are redrawn large so routing is
decisive (top-k margins far above float rounding), and GLM4/DeepSeek get a non-zero
correction bias so that selection and weights differ as in real checkpoints.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3")
VOCAB = 61
HIDDEN = 32

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

_CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        head_dim=8, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
    )),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
    )),
    "mixtral": ("MixtralConfig", dict(
        head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
    )),
    "olmoe": ("OlmoeConfig", dict(
        intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
    )),
    "glm4_moe": ("Glm4MoeConfig", dict(
        head_dim=8, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        first_k_dense_replace=1, n_shared_experts=1,
    )),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=1.5, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    )),
}

# What the tests expect, written out by hand from the HF modeling files (not from the code
# under test): MoE decoder layers, routing method name and routed_scaling_factor.
EXPECTED = {
    "qwen3_moe": ((1, 2), "RENORMALIZE_NAIVE", 1.0),
    "qwen2_moe": ((0, 2), "DEFAULT", 1.0),
    "mixtral": ((0, 1, 2), "RENORMALIZE", 1.0),
    "olmoe": ((0, 1, 2), "DEFAULT", 1.0),
    "glm4_moe": ((1, 2), "DEEPSEEK_V3", 2.5),
    "deepseek_v3": ((1, 2), "DEEPSEEK_V3", 1.5),
}
NUM_EXPERTS = 8
TOP_K = 2


def tiny_moe(family: str, *, seed: int = 0, **config_overrides: object) -> nn.Module:
    """A tiny ``<Family>ForCausalLM`` in eval mode with decisive routing; same seed, same model."""
    config_class, family_config = _CONFIGS[family]
    config = getattr(transformers, config_class)(**{**_COMMON, **family_config, **config_overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", experts_implementation="eager"
        )
    with torch.no_grad():
        for block in model.modules():
            router = getattr(block, "gate", None)
            if isinstance(getattr(block, "experts", None), nn.Module) and router is not None:
                router.weight.normal_(0.0, 3.0 / HIDDEN**0.5, generator=generator)
                bias = getattr(router, "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return model.eval()


def routers(model: nn.Module) -> list[nn.Module]:
    """The routers of the MoE blocks, in model order."""
    return [m.gate for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules of the MoE blocks, in model order."""
    return [
        m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)
    ]
