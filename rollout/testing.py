"""Tiny random MoE checkpoints for tests, examples and the main job; nothing is downloaded.

``make_tiny_moe(family, path, seed=0, **overrides)`` builds a small model with transformers'
own config and model classes, makes its routing decisive, saves it with ``save_pretrained``
(float32 safetensors, config.json, generation_config.json) and adds a byte-level BPE tokenizer
trained locally on a built-in text (``tokenizer.json``) whose vocabulary is the model's.
The same ``seed`` gives the same files.

Routing is made decisive so that engines agreeing to float rounding also agree on the routers'
choices: router weights are redrawn with std ``ROUTER_STD / sqrt(hidden_size)`` (logits spread
over a few units instead of ~0.1), and the LM head likewise, so greedy choices rarely hinge on
near-ties. GLM4-MoE's ``e_score_correction_bias`` is drawn too, so the bias path is exercised.

``PagedBatchBuilder`` stands in for the block manager and input preparation in tests: it hands
out KV blocks and turns a step's chunks of tokens into a planned ``ForwardBatch``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rollout.capture import RoutedExpertsCapturer
from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import AttentionBackend

__all__ = [
    "FAMILIES",
    "TOKENIZER_TEXT",
    "PagedBatchBuilder",
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

# family -> (HF config class, HF model class, family-specific config).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
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
        "Qwen2MoeForCausalLM",
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
        "MixtralForCausalLM",
        dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=16, num_experts_per_tok=4, intermediate_size=32, norm_topk_prob=False),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
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
    model: torch.nn.Module, hidden_size: int, generator: torch.Generator
) -> None:
    router_std = ROUTER_STD / math.sqrt(hidden_size)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("mlp.gate.weight"):
                tensor.normal_(0.0, router_std, generator=generator)
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.1, generator=generator)
            elif name == "lm_head.weight":
                tensor.normal_(0.0, LM_HEAD_STD / math.sqrt(hidden_size), generator=generator)


def make_tiny_moe(family: str, path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``family`` checkpoint with a tokenizer to ``path``; return the path.

    Args:
        family: one of ``FAMILIES`` (qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe).
        path: folder to create (or overwrite files in).
        seed: seeds the weights (the global RNG is left untouched).
        overrides: HF config fields replacing the defaults (e.g. ``num_hidden_layers=4``).

    Raises:
        ValueError: an unknown family, or a ``vocab_size`` override smaller than the
            tokenizer's vocabulary.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    config_name, model_name, family_kwargs = FAMILIES[family]
    tokenizer = train_tiny_tokenizer()
    vocab = tokenizer.get_vocab_size()
    kwargs = {
        **_COMMON,
        **family_kwargs,
        "vocab_size": vocab,
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
    }
    kwargs.update(overrides)
    if kwargs["vocab_size"] < vocab:
        raise ValueError(
            f"vocab_size: expected >= the tokenizer's {vocab}, got {kwargs['vocab_size']}"
        )
    config = getattr(transformers, config_name)(**kwargs)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
        generator = torch.Generator().manual_seed(seed + 1)
        _decisive_routing_(model, config.hidden_size, generator)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def flashinfer_overrides(family: str) -> dict[str, Any]:
    """``make_tiny_moe`` overrides giving ``family``'s heads a size FlashInfer's attention
    kernels support (64: the default 16 is too small): hidden size 256 over the 4 query heads,
    or ``head_dim=64`` where the family sets its head size explicitly."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    return {"head_dim": 64} if "head_dim" in FAMILIES[family][2] else {"hidden_size": 256}


class PagedBatchBuilder:
    """A minimal stand-in for the block manager and input preparation, for tests.

    Hands out KV blocks from a shuffled free list (so block tables are not contiguous) and
    turns one step's chunks ``[(seq_id, new_token_ids), ...]`` into a planned ``ForwardBatch``:
    each chunk continues its sequence (a prompt, a prefill chunk or one decode token).

    Args:
        backend: the attention backend that plans each batch.
        num_blocks: KV blocks available; ``block_size``: tokens per block.
        device: where the batch's device tensors go (host mirrors stay on the CPU).
        capture: ``(num_moe_layers, top_k, dtype)`` to attach a fresh capturer to each batch
            (a row per token), its buffer filled with the dtype's largest value (an id no model
            has), or None.
        seed: shuffles the free list.
    """

    def __init__(
        self,
        backend: AttentionBackend,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        capture: tuple[int, int, torch.dtype] | None = None,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.block_size = block_size
        self.device = torch.device(device)
        self.capture = capture
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free_blocks: list[int] = order.tolist()
        self.blocks: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    def step(
        self,
        chunks: Sequence[tuple[Hashable, Sequence[int]]],
        *,
        pad_to: int | None = None,
        cuda_graph: bool = False,
    ) -> ForwardBatch:
        """The planned batch for this step's chunks (every chunk non-empty).

        ``pad_to`` pads a decode step to that many sequences the way a CUDA-graph bucket is
        padded: each padding row has token 0, position 0, slot -1, length 0 and no blocks.
        ``cuda_graph`` is passed to the backend's ``plan``.
        """
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        tables_rows: list[list[int]] = []
        for seq_id, tokens in chunks:
            if not tokens:
                raise ValueError(f"chunks: expected non-empty token lists, got none for {seq_id!r}")
            start = self.lengths.get(seq_id, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(seq_id, [])
            while len(blocks) * self.block_size < end:
                if not self.free_blocks:
                    raise ValueError("num_blocks: expected enough KV blocks for the test, ran out")
                blocks.append(self.free_blocks.pop())
            self.lengths[seq_id] = end
            ids.extend(tokens)
            for pos in range(start, end):
                positions.append(pos)
                slots.append(
                    blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            tables_rows.append(list(blocks))
        is_decode = all(len(tokens) == 1 for _, tokens in chunks)
        if pad_to is not None:
            if not is_decode or pad_to < len(chunks):
                raise ValueError(
                    f"pad_to: expected a decode step of at most {pad_to} sequences, "
                    f"got {len(chunks)} chunks (decode: {is_decode})"
                )
            for _ in range(pad_to - len(chunks)):
                ids.append(0)
                positions.append(0)
                slots.append(-1)
                starts.append(starts[-1] + 1)
                seq_lens.append(0)
                tables_rows.append([])
        width = max(1, max((len(row) for row in tables_rows), default=0))
        tables = torch.full((len(tables_rows), width), -1, dtype=torch.int32)
        for i, row in enumerate(tables_rows):
            tables[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        query_start_loc = torch.tensor(starts, dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        dev = self.device
        capturer = None
        if self.capture is not None:
            layers, top_k, dtype = self.capture
            capturer = RoutedExpertsCapturer(len(ids), layers, top_k, device=dev, dtype=dtype)
            capturer.buffer.fill_(torch.iinfo(dtype).max)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=query_start_loc.to(dev),
            seq_lens=lens.to(dev),
            block_tables=tables.to(dev),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=lens,
            block_tables_cpu=tables,
            is_decode=is_decode,
            attn_backend=self.backend,
            capture=capturer,
        )
        batch.attn_state = self.backend.plan(batch, cuda_graph=cuda_graph)
        return batch
