"""Load an HF-format MoE checkpoint folder: config, model on the device, weights, tokenizer.

``load_checkpoint(path, dtype=..., device=..., load_format=...)`` reads ``config.json``, picks
the model class by its ``architectures`` (``rollout.models.registry``), builds the model
directly on the device in the dtype (weights uninitialised, no CPU round trip), then either
copies the ``*.safetensors`` tensors in through ``model.load_weights`` and checks that every
parameter was written (``load_format="safetensors"``), or draws random weights on the device
(``load_format="dummy"``: benchmarks of large shapes from ``config.json`` alone). The tokenizer
comes from ``tokenizer.json`` via ``tokenizers`` when the folder has one; end-of-sequence ids
from ``generation_config.json``, else ``config.json``.

Expert parallelism (``parallel``, a ``rollout.engine.expert_parallel.MoEParallelConfig``, one
model per rank): the model allocates only its rank's experts, and the loader reads only what the
model holds: per-expert tensors of other ranks' experts are never read, and of a fused expert
tensor only this rank's rows (``MoECausalLM.checkpoint_rows``, safetensors' lazy slices). Dummy
weights are drawn per expert from a seed of its own, so a rank's experts are exactly those of a
single-rank model of the same seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
import torch
from safetensors import safe_open
from transformers import AutoConfig

from rollout.models.decoder import MoECausalLM
from rollout.models.registry import model_class

if TYPE_CHECKING:
    from rollout.engine.expert_parallel import MoEParallelConfig

__all__ = [
    "LoadedCheckpoint",
    "dummy_init_",
    "eos_token_ids",
    "iter_safetensors",
    "load_checkpoint",
    "load_hf_config",
    "load_tokenizer",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("safetensors", "dummy")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(kw_only=True, slots=True, frozen=True)
class LoadedCheckpoint:
    """A loaded checkpoint.

    Attributes:
        model: the model, on ``device`` in ``dtype``, in inference mode (no grads).
        hf_config: the HF ``PretrainedConfig``.
        tokenizer: ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None when absent.
        eos_token_ids: end-of-sequence ids (possibly empty).
        dtype: the weights' dtype; ``device``: where they live.
    """

    model: MoECausalLM
    hf_config: Any
    tokenizer: tokenizers.Tokenizer | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: expected valid JSON, got a parse error: {exc}") from exc


def load_hf_config(path: str | Path) -> Any:
    """The HF config of a checkpoint folder, after checking its architecture is supported.

    Raises:
        ValueError: no such folder or no ``config.json``; an unsupported architecture (the
            message lists the supported ones).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: expected a checkpoint folder with config.json, got {str(path)!r}")
    model_class(_read_json(folder / "config.json").get("architectures"))
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: torch.device) -> torch.dtype:
    """``"auto"``: the checkpoint's dtype on CUDA, float32 elsewhere; else the named dtype."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        stored = (
            getattr(hf_config, "dtype", None)
            or getattr(hf_config, "torch_dtype", None)
            or "float32"
        )
        resolved = (
            stored
            if isinstance(stored, torch.dtype)
            else _DTYPES.get(str(stored).removeprefix("torch."))
        )
    else:
        resolved = _DTYPES.get(str(dtype).removeprefix("torch."))
    if resolved not in _DTYPES.values():
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return resolved


def load_tokenizer(path: str | Path) -> tokenizers.Tokenizer | None:
    """``tokenizer.json`` of the folder through ``tokenizers``, or None when there is none."""
    file = Path(path) / "tokenizer.json"
    return tokenizers.Tokenizer.from_file(str(file)) if file.is_file() else None


def eos_token_ids(path: str | Path, hf_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids: ``generation_config.json``'s ``eos_token_id`` when present, else the
    config's (an int or a list in either)."""
    generation = Path(path) / "generation_config.json"
    eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]))


def iter_safetensors(
    path: str | Path,
    device: torch.device,
    *,
    select: Callable[[list[str]], Mapping[str, slice | None]] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of every ``*.safetensors`` file of the folder, read onto ``device``.

    Args:
        select: given a file's tensor names, what to read of each: None all of it, an empty
            slice nothing (the tensor is not yielded), else those rows of its first dimension
            (read lazily: the other rows never leave the file). None: read everything.

    Raises:
        ValueError: the folder has no ``*.safetensors`` file.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: expected *.safetensors files in {str(path)!r}, found none")
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            names = list(f.keys())
            parts = {} if select is None else select(names)
            for name in names:
                rows = parts.get(name)
                if rows is None:
                    yield name, f.get_tensor(name)
                elif rows.stop > rows.start:
                    # .to: a no-op where the slice is read onto the device already.
                    yield name, f.get_slice(name)[rows].to(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create tensors in ``dtype`` within the block (the model builds its weights uninitialised)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _expert_seed(seed: int, name: str, expert: int) -> int:
    """The seed of expert ``expert``'s rows of fused expert parameter ``name``."""
    return zlib.crc32(f"{seed}:{name}:{expert}".encode())


@torch.no_grad()
def dummy_init_(model: MoECausalLM, *, seed: int = 0) -> None:
    """Random weights drawn on the model's device: norms 1, biases and correction biases 0,
    routers N(0, (2 / sqrt(H))^2) so router logits spread over a few units (decisive routing),
    everything else N(0, 0.02^2). Each routed expert's weights come from a seed of their own
    (``_expert_seed``) and everything else from one stream of ``seed``, so the weights do not
    depend on which experts the model holds (expert parallelism)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    expert_generator = torch.Generator(device=device)
    router_std = 2.0 / math.sqrt(model.args.hidden_size)
    local = model.local_experts
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            for j, expert in enumerate(local):
                expert_generator.manual_seed(_expert_seed(seed, name, expert))
                param[j].normal_(0.0, 0.02, generator=expert_generator)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        elif leaf in ("bias", "e_score_correction_bias"):
            param.zero_()
        elif name.endswith("mlp.gate.weight"):
            param.normal_(0.0, router_std, generator=generator)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    load_format: str = "safetensors",
    seed: int = 0,
    parallel: MoEParallelConfig | None = None,
    deterministic: bool = False,
) -> LoadedCheckpoint:
    """Build the checkpoint's model on ``device`` in ``dtype`` and fill its weights.

    Args:
        path: the checkpoint folder (``config.json``, ``*.safetensors``, optional tokenizer).
        dtype: ``"auto"`` (checkpoint dtype on CUDA, float32 on CPU), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a torch dtype.
        device: default CUDA when available, else CPU.
        load_format: ``"safetensors"`` or ``"dummy"`` (random weights, ``seed``).
        parallel: the experts the model holds (only those are allocated and read); None:
            every expert.
        deterministic: build the model with batch-invariant numerics (``MoECausalLM``).

    Raises:
        ValueError: a bad argument, an unsupported architecture, an unknown or mis-shaped
            tensor in the checkpoint, or parameters the checkpoint does not provide (listed).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: expected one of {LOAD_FORMATS}, got {load_format!r}")
    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    hf_config = load_hf_config(path)
    resolved = resolve_dtype(dtype, hf_config, device)
    cls = model_class(hf_config.architectures)
    with _default_dtype(resolved), torch.device(device):
        model = cls(hf_config, device=device, parallel=parallel, deterministic=deterministic)
    model.eval()
    if load_format == "dummy":
        dummy_init_(model, seed=seed)
    else:
        written = model.load_weights(
            iter_safetensors(path, device, select=model.checkpoint_rows), selected=True
        )
        missing = sorted({name for name, _ in model.named_parameters()} - written)
        if missing:
            shown = ", ".join(missing[:20]) + (
                f", ... ({len(missing)} in all)" if len(missing) > 20 else ""
            )
            raise ValueError(
                f"weights: expected every parameter in the checkpoint, missing {shown}"
            )
    logger.info(
        "loaded %s (%s) on %s in %s, experts [%d, %d) of %d",
        cls.architecture,
        load_format,
        device,
        resolved,
        model.local_experts.start,
        model.local_experts.stop,
        model.routing_params.num_experts,
    )
    return LoadedCheckpoint(
        model=model,
        hf_config=hf_config,
        tokenizer=load_tokenizer(path),
        eos_token_ids=eos_token_ids(path, hf_config),
        dtype=resolved,
        device=device,
    )
