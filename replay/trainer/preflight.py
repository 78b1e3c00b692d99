"""Checks of a run's config against the model folder it names, before any worker starts.

``config.py`` validates values and their relations alone; some constraints also need the
checkpoint: its context length, its tokenizer (how long the task's prompts are). Unchecked,
they fail 20 s or more later inside a Ray worker (the rollout engine refusing every request).
``load_config`` runs ``check_against_model`` on the config it returns, so ``train_grpo.py``
stops before ``ray.init``. Errors are ValueError naming the field, the expected and the actual
value.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers

from replay.trainer.task_registry import make_task
from replay.trainer.tasks import TINY_ADDITION_SPEC, char_tokenizer
from rollout.hub import is_hub_id, resolve_model
from rollout.loader import load_hf_config, load_tokenizer

if TYPE_CHECKING:
    from replay.trainer.config import TrainConfig

__all__ = ["check_against_model"]


def check_against_model(config: TrainConfig) -> None:
    """Check what ``config`` asks of its model folder (it is read, never written):

    - ``model`` is a checkpoint folder with config.json (of a supported architecture) and
      tokenizer.json, or a Hugging Face Hub id whose snapshot has them (``model_revision``;
      ``rollout.resolve_model``: downloaded into the Hugging Face cache now, unless
      HF_HUB_OFFLINE), or, with ``model_init: random_addition``, a place without config.json
      where the random addition model will be written;
    - ``rollout.max_model_len`` is at most the model's ``max_position_embeddings``;
    - the task's longest prompt, tokenized by the model's tokenizer, plus
      ``rollout.max_tokens`` fits the context length (``rollout.max_model_len``, else the
      model's ``max_position_embeddings``) and, when ``rollout.kv_cache_blocks`` fixes it, the
      KV cache (every token but the last generated one takes a slot).
    """
    path = Path(config.model)
    if config.model_init == "existing" and path.exists() and config.model_revision is not None:
        raise ValueError(
            f"model_revision: expected null for the local folder {str(path)!r} (a revision "
            f"selects a Hub snapshot), got {config.model_revision!r}"
        )
    if config.model_init == "existing" and not path.exists() and is_hub_id(config.model):
        # Raises naming the folder and the Hub cache it looked in.
        path = resolve_model(config.model, revision=config.model_revision)
    if path.exists() and not path.is_dir():
        raise ValueError(f"model: expected a checkpoint folder, got {str(path)!r} (a file)")
    if (path / "config.json").is_file():
        max_positions = int(load_hf_config(path).max_position_embeddings)
        limit_source = f"{path / 'config.json'}: max_position_embeddings {max_positions}"
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ValueError(
                f"model: expected tokenizer.json in {str(path)!r} (the task's prompts are "
                f"text), got none"
            )
    elif config.model_init == "random_addition":
        max_positions = TINY_ADDITION_SPEC.max_position_embeddings
        limit_source = f"max_position_embeddings {max_positions} of the random addition model"
        tokenizer = char_tokenizer()
    else:
        state = "no config.json in it" if path.is_dir() else "no such folder"
        raise ValueError(
            f"model: expected a checkpoint folder with config.json, got {str(path)!r} ({state}; "
            f"model_init: random_addition writes a random addition model there)"
        )
    _check_lengths(config, max_positions, limit_source, tokenizer)


def _check_lengths(
    config: TrainConfig, max_positions: int, limit_source: str, tokenizer: tokenizers.Tokenizer
) -> None:
    rollout = config.rollout
    if rollout.max_model_len is not None and rollout.max_model_len > max_positions:
        raise ValueError(
            f"rollout.max_model_len: expected <= the model's max_position_embeddings "
            f"{max_positions} ({limit_source}), got {rollout.max_model_len}"
        )
    context, context_source = (
        (max_positions, limit_source)
        if rollout.max_model_len is None
        else (rollout.max_model_len, "rollout.max_model_len")
    )
    prompt, bound = make_task(config.task).longest_prompt()
    prompt_tokens = len(tokenizer.encode(prompt).ids)
    if prompt_tokens + rollout.max_tokens > context:
        raise ValueError(
            f"rollout.max_tokens: expected <= {context - prompt_tokens} (context length "
            f"{context} ({context_source}) - the task's longest prompt {prompt!r} of "
            f"{prompt_tokens} tokens with task.{bound}), got {rollout.max_tokens}"
        )
    if rollout.kv_cache_blocks is not None:
        needed = -(-(prompt_tokens + rollout.max_tokens - 1) // rollout.block_size)
        if rollout.kv_cache_blocks < needed:
            raise ValueError(
                f"rollout.kv_cache_blocks: expected >= {needed} (blocks of rollout.block_size "
                f"{rollout.block_size} for the longest request: prompt {prompt_tokens} + "
                f"max_tokens {rollout.max_tokens} - 1 tokens), got {rollout.kv_cache_blocks}"
            )
