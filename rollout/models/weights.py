"""HF-named tensors into a decoder's parameters, in place: the weight half of ``MoECausalLM``.

Parameter names mirror HF v5's (``model.layers.3.mlp.experts.gate_up_proj``), except the fused
projections: ``self_attn.qkv_proj`` (HF ``q_proj``, ``k_proj``, ``v_proj``) and ``gate_up_proj``
of dense and shared MLPs (HF ``gate_proj``, ``up_proj``). ``load_weights`` takes HF names, both
v5's fused expert tensors and the per-expert names ``save_pretrained`` writes
(``mlp.experts.{j}.gate_proj.weight``), and copies them in place.

Expert parallelism (one model per rank, ``rollout.engine.expert_parallel``): each MoE layer
holds only the rank's contiguous slice of the experts, so the fused expert parameters are
[L, ...] while their names stay HF's. ``load_weights`` still takes the tensors of every expert
(a trainer's full state dict): it copies the rank's rows of a fused tensor [E, ...] and its
experts' per-expert tensors, checks the shape of the others and skips them;
``checkpoint_rows`` tells a loader which parts of a checkpoint's tensors to read at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from rollout.layers.linear import Linear
from rollout.layers.moe import Experts

__all__ = ["CheckpointWeights", "decoder_layer_of"]

_EXPERT_NAME = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)
_SHARD_NAME = re.compile(r"^(?P<prefix>.+\.)(?P<shard>q|k|v|gate|up)_proj\.(?P<kind>weight|bias)$")
_LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")


def decoder_layer_of(name: str) -> int | None:
    """The decoder-layer index in an HF parameter name (``model.layers.{i}.``), else None."""
    match = _LAYER_NAME.match(name)
    return int(match["layer"]) if match else None


class CheckpointWeights:
    """``checkpoint_rows`` and ``load_weights`` for an ``nn.Module`` decoder (mixed into
    ``rollout.models.decoder.MoECausalLM``): it maps a checkpoint name to HF v5's with
    ``canonical_name`` (None: skip the tensor) and has ``args.tie_word_embeddings``."""

    def _experts_param(self, name: str) -> Experts | None:
        """The ``Experts`` module when ``name`` is one of its fused parameters, else None."""
        module_name, _, leaf = name.rpartition(".")
        if leaf not in ("gate_up_proj", "down_proj"):
            return None
        module = self.get_submodule(module_name)
        return module if isinstance(module, Experts) else None

    def _target(self, name: str, params: dict[str, nn.Parameter], *, selected: bool) -> _Target:
        """Where the tensor of canonical HF name ``name`` goes (``selected``: a fused expert
        tensor holds this model's experts only, as ``checkpoint_rows`` selects them)."""
        if name in params:
            shape = tuple(params[name].shape)
            experts = self._experts_param(name)
            if experts is None or experts.holds_all or selected:
                return _Target(name, (), None, shape, None)
            local = experts.local
            rows = slice(local.start, local.stop)
            return _Target(name, (), rows, (experts.num_experts, *shape[1:]), None)
        match = _EXPERT_NAME.match(name)
        if match:
            prefix, expert, proj = match["prefix"], int(match["expert"]), match["proj"]
            experts = self.get_submodule(prefix) if f"{prefix}.down_proj" in params else None
            if isinstance(experts, Experts) and expert < experts.num_experts:
                size = experts.intermediate_size
                hidden = experts.down_proj.shape[1]
                shape = (hidden, size) if proj == "down" else (size, hidden)
                if expert not in experts.local:
                    return _Target(None, (), None, shape, None)  # another rank's expert
                j = expert - experts.local.start
                if proj == "down":
                    return _Target(f"{prefix}.down_proj", (j,), None, shape, (expert,))
                rows = slice(0, size) if proj == "gate" else slice(size, 2 * size)
                return _Target(f"{prefix}.gate_up_proj", (j, rows), None, shape, (expert, proj))
        match = _SHARD_NAME.match(name)
        if match:
            fused = "qkv_proj" if match["shard"] in ("q", "k", "v") else "gate_up_proj"
            target = f"{match['prefix']}{fused}.{match['kind']}"
            if target in params:
                module = self.get_submodule(f"{match['prefix']}{fused}")
                start, end = module.shards[match["shard"]]
                shape = (end - start, *params[target].shape[1:])
                return _Target(target, (slice(start, end),), None, shape, match["shard"])
        raise ValueError(f"weights: unknown parameter name {name!r} for {type(self).__name__}")

    def _pieces(self, name: str) -> set:
        """The pieces that make up parameter ``name`` (all must be written to load it)."""
        module_name, _, leaf = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, Linear) and len(module.shards) > 1:
            return set(module.shards)
        if isinstance(module, Experts) and leaf == "gate_up_proj":
            return {(j, proj) for j in module.local for proj in ("gate", "up")}
        if isinstance(module, Experts) and leaf == "down_proj":
            return {(j,) for j in module.local}
        return {None}

    def checkpoint_rows(self, hf_names: Iterable[str]) -> dict[str, slice | None]:
        """For each checkpoint tensor name, the part of it this model needs, so that a loader
        reads no more: None for all of it; an empty slice for none (a tensor the family skips,
        or under expert parallelism an expert of another rank); else the rows of the first
        dimension to read (a fused expert tensor [E, ...]: this rank's experts). Give the parts
        read to ``load_weights(..., selected=True)``.

        Raises:
            ValueError: an unknown name (as ``load_weights`` does).
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        rows: dict[str, slice | None] = {}
        for hf_name in hf_names:
            name = self.canonical_name(hf_name)
            if name is None or name.endswith(".rotary_emb.inv_freq"):
                rows[hf_name] = slice(0, 0)
                continue
            target = self._target(name, params, selected=False)
            rows[hf_name] = slice(0, 0) if target.param is None else target.source_rows
        return rows

    @torch.no_grad()
    def load_weights(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        selected: bool = False,
    ) -> set[str]:
        """Copy HF-named tensors into the parameters in place (``copy_``: dtype and device are
        converted, storage never reallocated, so CUDA graphs stay valid).

        Accepts HF v5 names (fused ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj``
        [E, H, I]), the per-expert names checkpoints carry (``mlp.experts.{j}.gate_proj.weight``
        [I, H], ``up_proj``, ``down_proj`` [H, I]) and the family's own checkpoint names. Under
        expert parallelism a fused tensor still has all E experts (this rank's rows are
        copied) and the per-expert tensors of other ranks' experts are checked and skipped.

        Args:
            named_tensors: (HF name, tensor) pairs, consumed one at a time.
            selected: the tensors are the parts ``checkpoint_rows`` selected: fused expert
                tensors hold this model's L experts only (what a loader reads).

        Returns:
            the names (as in ``named_parameters()``) of the parameters this call wrote
            completely, for the loader's missing-weights check: under expert parallelism those
            whose held part was written completely, so every rank reports the same names for
            a full state dict.

        Raises:
            ValueError: an unknown name, or a tensor whose shape does not match its target,
                naming it.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        aliases = {n: n for n in params}
        if self.args.tie_word_embeddings:
            aliases["lm_head.weight"] = "model.embed_tokens.weight"
        written: dict[str, set] = {}
        for hf_name, tensor in named_tensors:
            name = self.canonical_name(hf_name)
            # Old checkpoints carry RoPE frequency buffers; they are recomputed, never loaded.
            if name is None or name.endswith(".rotary_emb.inv_freq"):
                continue
            target = self._target(name, params, selected=selected)
            if tuple(tensor.shape) != target.source_shape:
                where = target.param or "an expert of another expert-parallel rank"
                raise ValueError(
                    f"weights: {hf_name!r} expected shape {target.source_shape} for {where}, "
                    f"got {tuple(tensor.shape)}"
                )
            if target.param is None:
                continue
            param = params[target.param]
            dst = param[target.index] if target.index else param
            dst.copy_(tensor if target.source_rows is None else tensor[target.source_rows])
            name = aliases[target.param]
            pieces = written.setdefault(name, set())
            pieces.update(self._pieces(name) if target.piece is None else {target.piece})
        return {name for name, pieces in written.items() if pieces >= self._pieces(name)}


class _Target(NamedTuple):
    """Where one HF tensor goes: ``param[index] <- tensor[source_rows]`` after checking that the
    tensor has ``source_shape``; ``param`` None: nothing (another rank's expert); ``piece``:
    which piece of the parameter it writes (None: all of it)."""

    param: str | None
    index: tuple
    source_rows: slice | None
    source_shape: tuple[int, ...]
    piece: Any
