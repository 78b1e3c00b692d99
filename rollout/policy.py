"""``rollout.load_policy``: the engine's own model as a trainable ``torch.nn.Module``.

::

    policy = rollout.load_policy("path/to/checkpoint", deterministic=True)
    ctl = replay.patch(policy)                       # R3 works as on an HF model
    with ctl.replay(traces, attention_mask=mask_BS):
        logits_BSV = policy(input_ids_BS, attention_mask=mask_BS)
    llm.update_weights(policy.state_dict().items())  # HF names; bitwise in the same dtype

The policy is the engine's ``MoECausalLM`` (the same classes, the same checkpoint loading)
with gradients on, run over whole sequences instead of a paged KV cache: every batch row (or
packed sequence) becomes one sequence of a ``ForwardBatch`` attended by a
``SequenceAttentionBackend``, padding tokens run as sequences of their own that attend to
nothing. With ``deterministic=True`` every layer uses ``routing_kernels.batch_invariant``,
exactly as ``rollout.LLM(deterministic=True)`` does, so on the same tokens and weights the
policy's logits (and, through ``batch_invariant.token_logprobs``, logprobs) equal the engine's
bit for bit: in one forward, whatever the padding, packing or batch. The backward uses
torch's ordinary formulas (``batch_invariant.autograd``).

Layout of a forward's ``[B, S]`` tokens (``_segments``): without masks each row is one
sequence; with ``attention_mask`` each row's unmasked tokens are one sequence and must be
contiguous (left or right padding); with ``position_ids`` (and optionally ``attention_mask``
for padding) a row's unmasked tokens hold several packed sequences, a new one starting
wherever the position id is not the previous token's plus one (HF's packing rule), each
starting at position 0.

Parameters: the engine's names (``self_attn.qkv_proj``, ``mlp.gate_up_proj`` fused), while
``state_dict`` / ``load_state_dict`` / ``save_pretrained`` speak HF's (``q_proj``, ``k_proj``,
``v_proj``, ``gate_proj``, ``up_proj``), so HF transformers, the engine's loader and
``LLM.update_weights`` read them. Replay finds the MoE layers through ``replay_moe_layers`` and
``replay_routing`` (the explicit interface ``replay.discovery`` checks for).

Legend: B batch rows, S positions per row, T = B * S flat tokens, V vocabulary.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from rollout.forward_batch import ForwardBatch
from rollout.hub import resolve_model
from rollout.layers.invariant_attention import SequenceAttentionBackend
from rollout.layers.linear import Linear
from rollout.loader import load_checkpoint, load_hf_config, resolve_dtype
from rollout.models.decoder import MoECausalLM

__all__ = ["Policy", "load_policy"]


def load_policy(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    deterministic: bool = True,
    parameter_dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Policy:
    """The checkpoint's model as a trainable ``Policy`` built by the engine's own code.

    Args:
        model: the checkpoint folder or a Hugging Face Hub id (as for ``rollout.LLM``).
        dtype: as ``rollout.LLM``'s (``"auto"``: the checkpoint's dtype on CUDA, float32 on
            CPU): the parameters' and the forward's dtype. Use the engine's dtype for bitwise
            agreement with it.
        device: None (CUDA when available, else CPU), ``"cpu"``, ``"cuda[:N]"``.
        deterministic: batch-invariant numerics, equal to ``rollout.LLM(deterministic=True)``.
        parameter_dtype: keep the parameters in this dtype (e.g. float32 master weights for
            the optimizer) while the forward computes in ``dtype``: every op rounds its weights
            to ``dtype`` first, exactly as an engine holding them in ``dtype`` (and a weight
            sync's ``copy_`` into its parameters) does. None: ``dtype``. Needs
            ``deterministic`` (the batch-invariant ops round the weights; torch's would not).
        revision: for a Hub id, its branch, tag or commit (``rollout.resolve_model``).

    Raises:
        ValueError: what ``rollout.LLM`` raises for a bad checkpoint, dtype or device, or a
            ``parameter_dtype`` without ``deterministic``.
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(deterministic).__name__}")
    model = resolve_model(model, revision=revision)
    if parameter_dtype is None:
        checkpoint = load_checkpoint(model, dtype=dtype, device=device, deterministic=deterministic)
        return Policy(checkpoint.model)
    if not deterministic:
        raise ValueError(
            f"parameter_dtype: expected None with deterministic=False (only the batch-invariant "
            f"ops round weights to the compute dtype), got {parameter_dtype}"
        )
    where = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    compute = resolve_dtype(dtype, load_hf_config(model), where)
    checkpoint = load_checkpoint(
        model, dtype=parameter_dtype, device=device, deterministic=deterministic
    )
    if checkpoint.dtype != compute:
        checkpoint.model.model.embed_tokens.compute_dtype = compute
    return Policy(checkpoint.model)


class Policy(nn.Module):
    """A ``MoECausalLM`` trained whole-sequence (module docstring); build with ``load_policy``.

    Attributes:
        config: the HF config; ``model``, ``lm_head``: the decoder's modules (parameters are
        registered under their engine names); ``deterministic``.
    """

    def __init__(self, decoder: MoECausalLM) -> None:
        super().__init__()
        self.config = decoder.config
        self.model = decoder.model
        self.lm_head = decoder.lm_head
        # Held outside the module tree: its parameters are this module's already.
        object.__setattr__(self, "_decoder", decoder)
        self.deterministic = decoder.deterministic
        self._attention = SequenceAttentionBackend(
            decoder.attention_spec, deterministic=decoder.deterministic
        )
        for name, param in self.named_parameters():
            # The correction bias is a buffer in HF, moved by load balancing, not by gradients.
            param.requires_grad_(not name.endswith("e_score_correction_bias"))
        self.train()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, S, V]`` in the model dtype of every position (padding included: their
        values are unspecified) for ``input_ids`` ``[B, S]`` (see the module docstring for the
        masks).

        Raises:
            ValueError: bad shapes, token ids outside the vocabulary, non-contiguous sequences
                in a row, or a packed sequence not starting at position 0.
        """
        decoder: MoECausalLM = self._decoder
        ids_BS = _check_ids(input_ids, decoder.args.vocab_size)
        batch_size, seq_len = ids_BS.shape
        runs = _segments(ids_BS.shape, attention_mask, position_ids)
        batch = self._forward_batch(ids_BS.reshape(-1), runs)
        hidden_TH = decoder(batch)
        return decoder.compute_logits(hidden_TH).view(batch_size, seq_len, -1)

    def _forward_batch(self, ids_T: torch.Tensor, runs: list[tuple[int, bool]]) -> ForwardBatch:
        """One attention sequence per run ``(tokens, is_sequence)``; padding runs get context
        length 0 and position 0."""
        device = ids_T.device
        counts = np.array([count for count, _ in runs], dtype=np.int64)
        real = np.array([is_sequence for _, is_sequence in runs], dtype=bool)
        starts = np.concatenate([[0], np.cumsum(counts)])
        first_T = np.repeat(starts[:-1], counts)
        positions_T = np.where(np.repeat(real, counts), np.arange(starts[-1]) - first_T, 0)
        query_start = torch.from_numpy(starts.astype(np.int32))
        seq_lens = torch.from_numpy(np.where(real, counts, 0).astype(np.int32))
        tables = torch.zeros((len(runs), 1), dtype=torch.int32)
        batch = ForwardBatch(
            input_ids=ids_T,
            positions=torch.from_numpy(positions_T).to(device),
            slot_mapping=torch.full_like(ids_T, -1),
            query_start_loc=query_start.to(device),
            seq_lens=seq_lens.to(device),
            block_tables=tables.to(device),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            block_tables_cpu=tables,
            is_decode=False,
            attn_backend=self._attention,
        )
        batch.attn_state = self._attention.plan(batch)
        return batch

    # ------------------------------------------------------------------ replay interface

    def replay_moe_layers(self) -> tuple[tuple[int, str, str, str], ...]:
        """``(decoder-layer index, MoE block, router, experts)`` names of every MoE layer, in
        model order (``replay.discovery``'s declared-structure interface). The router returns
        ``(logits, weights, ids)``; the experts are called as ``experts(hidden, ids, weights)``."""
        decoder: MoECausalLM = self._decoder
        return tuple(
            (
                i,
                f"model.layers.{i}.mlp",
                f"model.layers.{i}.mlp.gate",
                f"model.layers.{i}.mlp.experts",
            )
            for i in decoder.moe_layers
        )

    def replay_routing(self) -> dict[str, Any]:
        """The routing replay recomputes gate weights with: ``method`` (a
        ``routing_kernels.RoutingMethod``), ``routed_scaling_factor``, ``n_group``,
        ``topk_group``, ``num_experts``, ``top_k``."""
        routing = self._decoder.routing_params
        return {
            "method": routing.method,
            "routed_scaling_factor": routing.routed_scaling_factor,
            "n_group": routing.n_group,
            "topk_group": routing.topk_group,
            "num_experts": routing.num_experts,
            "top_k": routing.top_k,
        }

    # ------------------------------------------------------------------ weights in HF names

    def _hf_shards(self) -> dict[str, list[tuple[str, slice]]]:
        """Engine name of each fused parameter -> the HF names and rows of its parts."""
        shards = {}
        for module_name, module in self.named_modules():
            if not isinstance(module, Linear) or len(module.shards) < 2:
                continue
            prefix = module_name.rsplit(".", 1)[0]
            for kind in ("weight", "bias"):
                if getattr(module, kind) is not None:
                    shards[f"{module_name}.{kind}"] = [
                        (f"{prefix}.{shard}_proj.{kind}", slice(start, end))
                        for shard, (start, end) in module.shards.items()
                    ]
        return shards

    def state_dict(  # type: ignore[override]
        self, *, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, torch.Tensor]:
        """The parameters by HF name: fused q/k/v and gate/up parameters as views of their
        parts (``q_proj.weight``, ...), every other one under its own (HF) name."""
        out = OrderedDict() if destination is None else destination
        shards = self._hf_shards()
        for name, tensor in super().state_dict(keep_vars=keep_vars).items():
            for hf_name, rows in shards.get(name, [(name, slice(None))]):
                out[prefix + hf_name] = tensor[rows]
        return out

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """Copy HF-named (or engine-named) tensors into the parameters in place.

        Raises:
            ValueError: an unknown name or a mis-shaped tensor; with ``strict``, parameters
                left unwritten (named).
        """
        if assign:
            raise ValueError("assign: expected False (parameters are copied in place), got True")
        written = self._decoder.load_weights(state_dict.items())
        missing = sorted({name for name, _ in self.named_parameters()} - written)
        if strict and missing:
            raise ValueError(f"state_dict: expected every parameter, missing {missing[:10]}")
        return nn.modules.module._IncompatibleKeys(missing, [])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write an HF checkpoint folder (``config.json``, ``model.safetensors`` in HF names)
        that HF transformers, ``rollout.LLM`` and ``load_policy`` load."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: tensor.detach().to("cpu").contiguous()
            for name, tensor in self.state_dict().items()
        }
        if self._decoder.args.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.config.save_pretrained(folder)


# ---------------------------------------------------------------------- layout


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids: expected int64 [batch, seq_len] with seq_len >= 1, got "
            f"{input_ids.dtype} {tuple(input_ids.shape)}"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids: expected ids in [0, {vocab_size}), got {low if low < 0 else high}"
        )
    return input_ids


def _host_array(name: str, value: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (input_ids'), got {tuple(value.shape)}")
    return value.detach().to("cpu").numpy()


def _segments(
    shape: torch.Size,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> list[tuple[int, bool]]:
    """The flat (row-major) tokens as consecutive runs ``(tokens, is_sequence)``: a sequence,
    or padding, covering every token of every row."""
    batch_size, seq_len = shape
    mask_BS = (
        np.ones(tuple(shape), dtype=bool)
        if attention_mask is None
        else _host_array("attention_mask", attention_mask, tuple(shape)) != 0
    )
    pos_BS = None if position_ids is None else _host_array("position_ids", position_ids, shape)
    runs: list[tuple[int, bool]] = []
    for b in range(batch_size):
        cols = np.flatnonzero(mask_BS[b])
        if cols.size and cols[-1] - cols[0] + 1 != cols.size:
            raise ValueError(
                f"attention_mask: expected row {b}'s unmasked tokens contiguous (padding only "
                f"before or after them), got gaps"
            )
        starts = [0]
        if pos_BS is not None and cols.size:
            positions = pos_BS[b, cols]
            starts = [0, *(np.flatnonzero(positions[1:] != positions[:-1] + 1) + 1).tolist()]
            first = positions[starts]
            if np.any(first != 0):
                raise ValueError(
                    f"position_ids: expected every packed sequence of row {b} to start at "
                    f"position 0, got first positions {first.tolist()}"
                )
        if cols.size == 0:
            runs.append((seq_len, False))
            continue
        if cols[0] > 0:
            runs.append((int(cols[0]), False))
        ends = [*starts[1:], cols.size]
        runs.extend((end - start, True) for start, end in zip(starts, ends, strict=True))
        if cols[-1] + 1 < seq_len:
            runs.append((int(seq_len - cols[-1] - 1), False))
    return runs
