"""Tiny random MoE models for tests, examples and the main job; nothing is downloaded.

``make_tiny_moe(family, path, seed=0, **overrides)`` builds a small model with transformers'
own config and model classes (``build_tiny_moe``: the model in memory), makes its routing
decisive, saves it with ``save_pretrained`` (float32 safetensors, config.json,
generation_config.json) and adds a byte-level BPE tokenizer trained locally on a built-in text
(``tokenizer.json``) whose vocabulary is the model's. The same ``seed`` gives the same files.
``FAMILIES`` are the families the engine runs; ``HF_ONLY_FAMILIES`` those only HF transformers
(and so replay) runs.

Routing is made decisive so that engines agreeing to float rounding also agree on the routers'
choices: router weights are redrawn with std ``ROUTER_STD / sqrt(hidden_size)`` (logits spread
over a few units instead of ~0.1), and the LM head likewise, so greedy choices rarely hinge on
near-ties. The ``e_score_correction_bias`` of GLM4-MoE and DeepSeek-V3 is drawn too, so the
bias path is exercised.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = [
    "FAMILIES",
    "HF_ONLY_FAMILIES",
    "TOKENIZER_TEXT",
    "build_tiny_moe",
    "flashinfer_overrides",
    "make_tiny_moe",
    "train_tiny_tokenizer",
]

ROUTER_STD = 3.0
LM_HEAD_STD = 2.0
EOS_TOKEN = "<|endoftext|>"
TARGET_VOCAB = 384

# Shapes shared by every family: 64 hidden, 4 query heads over 2 KV heads of 16, 3 layers.
_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
    tie_word_embeddings=False,
    bos_token_id=None,
    pad_token_id=None,
)

# family -> (HF config class, family-specific config): the families the engine runs.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            intermediate_size=96,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            intermediate_size=96,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=16, num_experts_per_tok=4, intermediate_size=32, norm_topk_prob=False),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            head_dim=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            intermediate_size=96,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            attention_bias=True,
            use_qk_norm=True,
            partial_rotary_factor=0.5,
        ),
    ),
}

# Families HF transformers runs (replay patches them) and the engine does not.
HF_ONLY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
    ),
}

TOKENIZER_TEXT = """\
Mixture-of-experts language models route every token through a few experts chosen by a
router. During reinforcement learning the rollout engine samples answers while the trainer
updates the policy; when the two engines pick different experts for the same token, the
probabilities they assign drift apart and training becomes unstable. Rollout routing replay
records which experts the inference engine chose and makes the trainer use exactly those,
recomputing the gate weights from its own router logits so that the router keeps learning.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
The answer is 42. Seven times six is forty-two; 3.14159 is close to pi, and 2.71828 to e.
Once upon a time, in a small village by the sea, there lived an old fisherman who told the
children stories about the stars, the tides and the strange lights under the water.
"""


def train_tiny_tokenizer(vocab_size: int = TARGET_VOCAB) -> tokenizers.Tokenizer:
    """A byte-level BPE with ``EOS_TOKEN`` as id 0, trained on ``TOKENIZER_TEXT`` (deterministic).

    Its vocabulary may come out smaller than ``vocab_size`` when the text runs out of merges.
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def _decisive_routing_(
    model: torch.nn.Module, hidden_size: int, generator: torch.Generator, *, lm_head: bool
) -> None:
    router_std = ROUTER_STD / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                tensor.normal_(0.0, router_std, generator=generator)
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.1, generator=generator)
            elif name == "lm_head.weight" and lm_head:
                tensor.normal_(0.0, LM_HEAD_STD / math.sqrt(hidden_size), generator=generator)


def build_tiny_moe(
    family: str,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    decisive_lm_head: bool = True,
    **overrides: Any,
) -> transformers.PreTrainedModel:
    """A tiny random ``family`` model in memory (float32, CPU, train mode) with decisive routing.

    Args:
        family: one of ``FAMILIES`` (qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe) or
            ``HF_ONLY_FAMILIES`` (deepseek_v3).
        seed: seeds the weights (the same seed, the same weights; the global RNG is left
            untouched).
        attn_implementation, experts_implementation: HF's choices of kernels (None: its
            default).
        decisive_lm_head: redraw the LM head large too (greedy tokens rarely hinge on
            near-ties); False keeps HF's initialisation (smaller logits and gradients).
        overrides: HF config fields replacing the defaults (e.g. ``num_hidden_layers=4``);
            without ``vocab_size``, the vocabulary is ``TARGET_VOCAB`` ids.

    Raises:
        ValueError: an unknown family.
    """
    tables = {**FAMILIES, **HF_ONLY_FAMILIES}
    if family not in tables:
        raise ValueError(f"family: expected one of {sorted(tables)}, got {family!r}")
    config_name, family_kwargs = tables[family]
    kwargs = {**_COMMON, "vocab_size": TARGET_VOCAB, **family_kwargs, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    implementations = {
        name: value
        for name, value in (
            ("attn_implementation", attn_implementation),
            ("experts_implementation", experts_implementation),
        )
        if value is not None
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, **implementations)
        generator = torch.Generator().manual_seed(seed + 1)
        _decisive_routing_(model, config.hidden_size, generator, lm_head=decisive_lm_head)
    return model


def make_tiny_moe(family: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``family`` checkpoint with a tokenizer to ``path``; return the path.

    Args:
        family: one of ``FAMILIES`` or ``HF_ONLY_FAMILIES`` (``build_tiny_moe``).
        path: folder to create (or overwrite files in).
        seed: seeds the weights (the global RNG is left untouched).
        overrides: HF config fields replacing the defaults (e.g. ``num_hidden_layers=4``).

    Raises:
        ValueError: an unknown family, or a ``vocab_size`` override smaller than the
            tokenizer's vocabulary.
    """
    tokenizer = train_tiny_tokenizer()
    vocab = tokenizer.get_vocab_size()
    kwargs = {"vocab_size": vocab, "eos_token_id": tokenizer.token_to_id(EOS_TOKEN), **overrides}
    if kwargs["vocab_size"] < vocab:
        raise ValueError(
            f"vocab_size: expected >= the tokenizer's {vocab}, got {kwargs['vocab_size']}"
        )
    model = build_tiny_moe(family, seed=seed, **kwargs)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def flashinfer_overrides(family: str) -> dict[str, Any]:
    """``make_tiny_moe`` overrides giving ``family``'s heads a size FlashInfer's attention
    kernels support (64: the default 16 is too small): hidden size 256 over the 4 query heads,
    or ``head_dim=64`` where the family sets its head size explicitly."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return {"head_dim": 64} if "head_dim" in FAMILIES[family][1] else {"hidden_size": 256}
