"""The tiny-model factory of ``rollout.testing`` and the tests' paged batch builder."""

from __future__ import annotations

import pytest
import torch
from paged_batch import PagedBatchBuilder
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from rollout.layers.attention import AttentionSpec, TorchAttentionBackend
from rollout.loader import load_tokenizer
from rollout.testing import EOS_TOKEN, FAMILIES, make_tiny_moe

# Families whose HF model supports dense layers, and where the tiny model has them.
DENSE_LAYERS = {"qwen3_moe": [1], "qwen2_moe": [0], "glm4_moe": [0], "mixtral": [], "olmoe": []}


def test_deterministic_per_seed_and_global_rng_untouched(tmp_path):
    state = torch.random.get_rng_state()
    first = load_file(str(make_tiny_moe("glm4_moe", tmp_path / "a", seed=5) / "model.safetensors"))
    assert torch.equal(torch.random.get_rng_state(), state)
    again = load_file(str(make_tiny_moe("glm4_moe", tmp_path / "b", seed=5) / "model.safetensors"))
    other = load_file(str(make_tiny_moe("glm4_moe", tmp_path / "c", seed=6) / "model.safetensors"))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(
        first["model.layers.1.mlp.gate.weight"], other["model.layers.1.mlp.gate.weight"]
    )
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "c" / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_checkpoint(tmp_path, family):
    path = make_tiny_moe(family, tmp_path / family)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family
    assert config.dtype in ("float32", torch.float32)
    tokenizer = load_tokenizer(path)
    assert tokenizer.get_vocab_size() == config.vocab_size
    assert tokenizer.token_to_id(EOS_TOKEN) == config.eos_token_id
    text = "Rollout routing replay, 42 times."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    dense = [i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")]
    assert dense == DENSE_LAYERS[family]
    assert 2 <= config.num_hidden_layers <= 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routing_is_decisive(tmp_path, family, rng):
    path = make_tiny_moe(family, tmp_path / family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out: logits.append(out[0]))
        for layer in model.model.layers
        if hasattr(layer.mlp, "experts")
    ]
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (4, 32), generator=rng))
    for hook in hooks:
        hook.remove()
    k = model.config.num_experts_per_tok
    scores = torch.cat(logits).float()
    if family == "glm4_moe":  # selection on sigmoid scores plus the correction bias
        biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]]
        scores = torch.cat(
            [torch.sigmoid(x.float()) + b for x, b in zip(logits, biases, strict=True)]
        )
    top = scores.sort(dim=-1, descending=True).values
    near_ties = (top[:, k - 1] - top[:, k] < 1e-4).float().mean().item()
    assert near_ties <= 0.01, f"{family}: {near_ties:.3%} of rows nearly tie at the k-th expert"


def test_overrides_and_bad_arguments(tmp_path):
    path = make_tiny_moe("qwen3_moe", tmp_path / "q", num_hidden_layers=4, num_experts=16)
    config = AutoConfig.from_pretrained(path)
    assert (config.num_hidden_layers, config.num_experts) == (4, 16)
    with pytest.raises(ValueError, match="family"):
        make_tiny_moe("llama", tmp_path / "l")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_moe("mixtral", tmp_path / "m", vocab_size=100)


def test_paged_batch_builder():
    spec = AttentionSpec(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, scale=8**-0.5)
    builder = PagedBatchBuilder(
        TorchAttentionBackend(spec, block_size=4),
        num_blocks=8,
        block_size=4,
        capture=(3, 2, torch.int16),
        seed=1,
    )
    batch = builder.step([("a", [5, 6, 7, 8, 9]), ("b", [1, 2])])
    batch.validate(num_moe_layers=3, top_k=2)
    assert not batch.is_decode
    assert batch.query_start_loc.tolist() == [0, 5, 7] and batch.seq_lens.tolist() == [5, 2]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    blocks_a = builder.blocks["a"]
    assert len(blocks_a) == 2 and batch.block_tables[0, :2].tolist() == blocks_a
    assert batch.block_tables[1, 1].item() == -1
    expected_slots = [blocks_a[p // 4] * 4 + p % 4 for p in range(5)] + [
        builder.blocks["b"][0] * 4 + p for p in (0, 1)
    ]
    assert batch.slot_mapping.tolist() == expected_slots
    assert len(set(expected_slots)) == 7
    buffer = batch.capture.buffer
    assert buffer.shape == (7, 3, 2) and bool((buffer == 32767).all())
    decode = builder.step([("a", [10]), ("b", [3])])
    assert (
        decode.is_decode
        and decode.positions.tolist() == [5, 2]
        and decode.seq_lens.tolist() == [6, 3]
    )
    assert decode.attn_state.seq_lens == (6, 3)
    with pytest.raises(ValueError, match="num_blocks"):
        builder.step([("c", list(range(40)))])
