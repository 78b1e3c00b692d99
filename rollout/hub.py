"""``resolve_model``: a checkpoint folder, or a Hugging Face Hub id turned into one.

``rollout.LLM``, the GRPO trainer's ``model:`` and ``rollout.load_policy`` take either a local
folder (config.json, ``*.safetensors``, tokenizer.json) or a Hub id (``"Qwen/Qwen3-30B-A3B"``)
with an optional ``revision`` (branch, tag or commit hash), as vLLM and transformers do. An
existing path is always the folder; anything else that is a valid Hub id goes through
``huggingface_hub.snapshot_download``, so the files live in (and are reused from) the standard
Hugging Face cache: ``$HF_HUB_CACHE``, by default ``$HF_HOME/hub``, by default
``~/.cache/huggingface/hub``. With ``HF_HUB_OFFLINE=1`` nothing is downloaded: the id must
already be in that cache, and a missing one raises naming the cache folder that was looked in.
Only the files the engine and the trainer read are fetched (configs, tokenizer files,
safetensors), not other weight formats a repository may carry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

__all__ = ["CHECKPOINT_FILES", "is_hub_id", "resolve_model"]

logger = logging.getLogger(__name__)

# What a checkpoint needs: config.json, generation_config.json, tokenizer files, safetensors
# (single or sharded with their index). Repositories often add .bin / .gguf / .pth copies.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def is_hub_id(model: str) -> bool:
    """Whether ``model`` is spelled like a Hub repository id (``name`` or ``org/name``)."""
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The absolute local folder of ``model``: an existing path as it is, else a Hub id's
    snapshot in the Hugging Face cache (downloaded there first when online and missing).

    Args:
        model: a checkpoint folder, or a Hub id ``org/name`` (a path-like is always a folder).
        revision: for a Hub id, a branch, tag or commit hash (None: ``main``); must be None
            for a folder.
        cache_dir: the Hub cache (None: huggingface_hub's, i.e. ``HF_HUB_CACHE`` /
            ``HF_HOME``).
        local_files_only: only look in the cache (None: when ``HF_HUB_OFFLINE`` is set).

    Raises:
        ValueError: neither an existing path nor a valid Hub id; a ``revision`` with a folder;
            an id or revision the cache (offline) or the Hub (online) does not have. The
            message names what was looked for and where.
        TypeError: ``model`` or ``revision`` of a wrong type.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model: expected a folder or a Hub id (str or os.PathLike), got "
            f"{type(model).__name__} {model!r}"
        )
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision: expected None or a str, got {type(revision).__name__}")
    if revision == "":
        raise ValueError("revision: expected None or a branch, tag or commit hash, got ''")
    path = Path(model).expanduser()
    if path.exists() or not isinstance(model, str) or not is_hub_id(model):
        if not path.exists():
            raise ValueError(
                f"model: expected a checkpoint folder or a Hugging Face Hub id (org/name), "
                f"got {os.fspath(model)!r}: no such folder ({path.absolute()})"
            )
        if revision is not None:
            raise ValueError(
                f"revision: expected None for the local folder {path.absolute()} (a revision "
                f"selects a Hub snapshot), got {revision!r}"
            )
        return path.absolute()
    return _snapshot(model, revision, cache_dir, local_files_only)


def _snapshot(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
) -> Path:
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).absolute()
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    wanted = f"{repo_id!r} at revision {revision or 'main'!r}"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=list(CHECKPOINT_FILES),
        )
    except LocalEntryNotFoundError as err:
        storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        why = (
            "offline (HF_HUB_OFFLINE or local_files_only): nothing was downloaded"
            if offline
            else f"the Hub could not be reached ({err.__cause__ or err})"
        )
        raise ValueError(
            f"model: expected a checkpoint folder or a Hugging Face Hub id in the cache, got "
            f"{repo_id!r}: no folder {Path(repo_id).absolute()}, and no snapshot of {wanted} "
            f"in the Hub cache {cache} (looked in {storage}/refs and {storage}/snapshots); "
            f"{why}"
        ) from err
    except RevisionNotFoundError as err:
        raise ValueError(
            f"revision: expected a branch, tag or commit of {repo_id!r} on the Hub, "
            f"got {revision!r}"
        ) from err
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"model: expected a checkpoint folder or a Hugging Face Hub id, got {repo_id!r}: "
            f"no folder {Path(repo_id).absolute()} and no such repository on the Hub (a "
            f"private or gated one needs `hf auth login` or HF_TOKEN)"
        ) from err
    logger.info("model %s: %s", wanted, folder)
    return Path(folder)
