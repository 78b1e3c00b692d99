"""The toy task: multi-digit addition with a character-level tokenizer, and its small MoE model.

A problem ``12+34=`` has the answer ``46``; the policy must write the answer and then its end
of sequence token. ``AdditionTask.reward`` gives 1 for exactly the answer followed by eos and,
with ``partial_credit > 0``, ``partial_credit`` times the fraction of answer characters right
at their position otherwise.

The tokenizer (``char_tokenizer``) has one token per character: ``<eos>`` (id 0), ``<unk>``,
the ten digits, ``+`` and ``=``; saved as ``tokenizer.json`` next to the model so the rollout
engine decodes with it. ``build_addition_model`` makes a random Qwen3-MoE of this vocabulary
(the starting point of ``examples/sft_addition.py``) and ``make_addition_model`` saves one
(smoke tests; ``TINY_ADDITION_SPEC`` is the model ``model_init: random_addition`` writes).
The task is the entry ``addition`` of ``replay.trainer.task_registry.TASKS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import Regex, decoders, models, pre_tokenizers

__all__ = [
    "EOS_TOKEN",
    "TINY_ADDITION_SPEC",
    "AdditionModelSpec",
    "AdditionTask",
    "Problem",
    "build_addition_model",
    "char_tokenizer",
    "make_addition_model",
    "save_addition_model",
]

EOS_TOKEN = "<eos>"
_UNK_TOKEN = "<unk>"
_CHARS = "0123456789+="


def char_tokenizer() -> tokenizers.Tokenizer:
    """One token per character of ``0-9 + =``, ``<eos>`` (id 0, special) and ``<unk>``.

    Decoding joins characters without spaces and skips ``<eos>``.
    """
    vocab = {token: i for i, token in enumerate([EOS_TOKEN, _UNK_TOKEN, *_CHARS])}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=_UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return tokenizer


@dataclass(kw_only=True, slots=True, frozen=True)
class Problem:
    """``a + b``: the prompt ``"a+b="`` and the answer ``str(a + b)``."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


class AdditionTask:
    """Addition problems with operands of ``min_digits``..``max_digits`` digits.

    Args:
        min_digits, max_digits: operand lengths, each drawn uniformly, then the operand
            uniformly among numbers of that length (0 counts as one digit).
        partial_credit: reward scale in [0, 1) for a wrong answer's correct characters.
    """

    def __init__(self, *, min_digits: int = 1, max_digits: int = 3, partial_credit: float = 0.0):
        for name, value in (("min_digits", min_digits), ("max_digits", max_digits)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if max_digits < min_digits:
            raise ValueError(f"max_digits: expected >= min_digits ({min_digits}), got {max_digits}")
        if not 0 <= partial_credit < 1:
            raise ValueError(f"partial_credit: expected a float in [0, 1), got {partial_credit!r}")
        self.min_digits = min_digits
        self.max_digits = max_digits
        self.partial_credit = float(partial_credit)

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """``n`` problems drawn with ``rng``."""
        return [Problem(a=self._operand(rng), b=self._operand(rng)) for _ in range(n)]

    def _operand(self, rng: np.random.Generator) -> int:
        digits = int(rng.integers(self.min_digits, self.max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def reward(self, problem: Problem, completion: str, *, finished: bool) -> float:
        """1.0 for ``completion == answer`` with ``finished`` (the policy wrote eos), else
        ``partial_credit`` times the fraction of positions where the completion's character
        equals the answer's, out of the longer of the two."""
        answer = problem.answer
        if finished and completion == answer:
            return 1.0
        if self.partial_credit == 0 or not completion:
            return 0.0
        matches = sum(a == b for a, b in zip(completion, answer, strict=False))
        return self.partial_credit * matches / max(len(answer), len(completion))

    def longest_prompt(self) -> tuple[str, str]:
        """The longest prompt (both operands of ``max_digits`` nines) and its bound."""
        largest = 10**self.max_digits - 1
        return Problem(a=largest, b=largest).prompt, f"max_digits {self.max_digits}"

    def rewards(
        self, problems: Sequence[Problem], completions: Sequence[str], finished: Sequence[bool]
    ) -> np.ndarray:
        """float32 rewards of aligned problems, completions and finished flags."""
        if not len(problems) == len(completions) == len(finished):
            raise ValueError(
                f"completions: expected {len(problems)} (one per problem), got "
                f"{len(completions)} completions and {len(finished)} finished flags"
            )
        values = [
            self.reward(p, c, finished=f)
            for p, c, f in zip(problems, completions, finished, strict=True)
        ]
        return np.asarray(values, dtype=np.float32)


@dataclass(kw_only=True, slots=True, frozen=True)
class AdditionModelSpec:
    """Shape of the toy Qwen3-MoE policy (every decoder layer is an MoE layer).

    The defaults are the GPU toy model: 4 layers, 32 experts, top-4, hidden 256 over 4 heads of
    64 (FlashInfer's attention needs head_dim 64). ``router_std`` scales the router weights'
    initialisation (``router_std / sqrt(hidden_size)``); the other weights use HF's default.
    """

    num_layers: int = 4
    num_experts: int = 32
    top_k: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    moe_intermediate_size: int = 128
    max_position_embeddings: int = 64
    vocab_size: int = 16
    router_std: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "num_experts",
            "top_k",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "moe_intermediate_size",
            "max_position_embeddings",
            "vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: expected <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: expected a divisor of num_heads ({self.num_heads}), "
                f"got {self.num_kv_heads}"
            )
        vocab = char_tokenizer().get_vocab_size()
        if self.vocab_size < vocab:
            raise ValueError(
                f"vocab_size: expected >= the tokenizer's {vocab}, got {self.vocab_size}"
            )
        if not self.router_std > 0:
            raise ValueError(f"router_std: expected a float > 0, got {self.router_std!r}")

    def hf_config(self) -> transformers.Qwen3MoeConfig:
        """The transformers config of this shape, eos = ``<eos>``."""
        return transformers.Qwen3MoeConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            moe_intermediate_size=self.moe_intermediate_size,
            intermediate_size=4 * self.hidden_size,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            norm_topk_prob=True,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=None,
            pad_token_id=None,
            eos_token_id=char_tokenizer().token_to_id(EOS_TOKEN),
        )


# The model ``model_init: random_addition`` writes: small enough for CPU smoke runs.
TINY_ADDITION_SPEC = AdditionModelSpec(
    num_layers=2,
    num_experts=8,
    top_k=2,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
)


def build_addition_model(
    spec: AdditionModelSpec | None = None, *, seed: int = 0
) -> transformers.Qwen3MoeForCausalLM:
    """A random ``spec`` model (float32, CPU); the same ``seed`` gives the same weights and the
    global RNG is left untouched."""
    spec = AdditionModelSpec() if spec is None else spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3MoeForCausalLM(spec.hf_config())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(
                    0.0, spec.router_std / math.sqrt(spec.hidden_size), generator=generator
                )
    return model


def make_addition_model(
    path: str | Path, spec: AdditionModelSpec | None = None, *, seed: int = 0
) -> transformers.Qwen3MoeForCausalLM:
    """``build_addition_model`` saved to ``path`` (float32 safetensors, config, generation
    config, ``tokenizer.json``); returns the model."""
    model = build_addition_model(spec, seed=seed)
    save_addition_model(model, path)
    return model


def save_addition_model(model: transformers.PreTrainedModel, path: str | Path) -> Path:
    """``model.save_pretrained(path)`` plus the character tokenizer; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return folder
