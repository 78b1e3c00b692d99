"""HF architecture name -> model class."""

from __future__ import annotations

from collections.abc import Sequence

from rollout.models.decoder import MoECausalLM
from rollout.models.glm4_moe import Glm4MoeForCausalLM
from rollout.models.mixtral import MixtralForCausalLM
from rollout.models.olmoe import OlmoeForCausalLM
from rollout.models.qwen2_moe import Qwen2MoeForCausalLM
from rollout.models.qwen3_moe import Qwen3MoeForCausalLM

__all__ = ["MODEL_CLASSES", "model_class"]

MODEL_CLASSES: dict[str, type[MoECausalLM]] = {
    cls.architecture: cls
    for cls in (
        Qwen3MoeForCausalLM,
        Qwen2MoeForCausalLM,
        MixtralForCausalLM,
        OlmoeForCausalLM,
        Glm4MoeForCausalLM,
    )
}


def model_class(architectures: str | Sequence[str] | None) -> type[MoECausalLM]:
    """The class for the first supported entry of a config's ``architectures``.

    Raises:
        ValueError: none is supported; the message lists the supported architectures.
    """
    names = [architectures] if isinstance(architectures, str) else list(architectures or ())
    for name in names:
        if name in MODEL_CLASSES:
            return MODEL_CLASSES[name]
    raise ValueError(f"architectures: expected one of {sorted(MODEL_CLASSES)}, got {names or None}")
