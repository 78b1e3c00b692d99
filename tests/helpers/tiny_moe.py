"""Tiny HF transformers MoE models of every family replay supports, built in memory for replay
tests by ``rollout.testing.build_tiny_moe`` (its family table, its decisive routing).

Every family here gets hidden 32, a vocabulary of 61 ids, 8 experts, top-2, eager attention and
eager experts, float32, eval mode, and HF's default initialisation but for the routers (the
gradient checks' absolute tolerances are set for that scale of weights); the rest (3 decoder
layers, the dense ones, shared experts, groups, scaling) is the family's entry in
``rollout.testing``.
"""

from __future__ import annotations

from torch import nn

from rollout.testing import FAMILIES as ENGINE_FAMILIES
from rollout.testing import HF_ONLY_FAMILIES, build_tiny_moe

FAMILIES = (*ENGINE_FAMILIES, *HF_ONLY_FAMILIES)
VOCAB = 61
HIDDEN = 32
NUM_EXPERTS = 8
TOP_K = 2

# What the tests expect, written out by hand from the HF modeling files and the configs of
# rollout.testing (not from the code under test): MoE decoder layers, routing method name and
# routed_scaling_factor.
EXPECTED = {
    "qwen3_moe": ((0, 2), "RENORMALIZE_NAIVE", 1.0),  # mlp_only_layers [1]
    "qwen2_moe": ((1, 2), "DEFAULT", 1.0),  # mlp_only_layers [0]
    "mixtral": ((0, 1, 2), "RENORMALIZE", 1.0),
    "olmoe": ((0, 1, 2), "DEFAULT", 1.0),
    "glm4_moe": ((1, 2), "DEEPSEEK_V3", 2.5),  # first_k_dense_replace 1
    "deepseek_v3": ((1, 2), "DEEPSEEK_V3", 1.5),  # first_k_dense_replace 1
}

# The config field of the number of routed experts, by family.
_EXPERTS_FIELD = ("num_experts", "num_local_experts", "n_routed_experts")


def tiny_moe(family: str, *, seed: int = 0, **config_overrides: object) -> nn.Module:
    """A tiny ``<Family>ForCausalLM`` in eval mode with decisive routing; same seed, same model."""
    _, family_config = {**ENGINE_FAMILIES, **HF_ONLY_FAMILIES}[family]
    (experts_field,) = [name for name in _EXPERTS_FIELD if name in family_config]
    overrides = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        experts_field: NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "eos_token_id": None,
        "initializer_range": 0.02,
        **config_overrides,
    }
    model = build_tiny_moe(
        family,
        seed=seed,
        attn_implementation="eager",
        experts_implementation="eager",
        decisive_lm_head=False,
        **overrides,
    )
    return model.eval()


def routers(model: nn.Module) -> list[nn.Module]:
    """The routers of the MoE blocks, in model order."""
    return [m.gate for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules of the MoE blocks, in model order."""
    return [
        m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module)
    ]
