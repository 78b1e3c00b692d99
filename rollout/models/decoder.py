"""The MoE decoder shared by every supported family, configured by ``DecoderArgs``.

Legend: T tokens, H hidden size, V vocabulary, N query heads, G KV heads, D head dim,
R rotary dim, E experts, L experts held (E without expert parallelism), I expert intermediate
size.

All five families are pre-norm decoders: RMSNorm -> attention (fused q/k/v projection, optional
q/k RMSNorm, RoPE, paged attention) -> residual -> RMSNorm -> MLP (dense SwiGLU or sparse MoE)
-> residual; final RMSNorm; LM head. A family file only maps its HF config onto
``DecoderArgs`` and, where its checkpoints use other names, maps its parameter names onto the
canonical HF v5 names (``canonical_name``).

Parameter names mirror HF v5's (``model.layers.3.mlp.experts.gate_up_proj``), except the fused
projections: ``self_attn.qkv_proj`` (HF ``q_proj``, ``k_proj``, ``v_proj``) and ``gate_up_proj``
of dense and shared MLPs (HF ``gate_proj``, ``up_proj``). ``load_weights`` takes HF names, both
v5's fused expert tensors and the per-expert names ``save_pretrained`` writes
(``mlp.experts.{j}.gate_proj.weight``), and copies them in place.

Expert parallelism (``MoEParallelConfig.ep_size`` > 1, one model per rank): each MoE layer
holds only the rank's contiguous slice of the experts (``expert_slice``), so the fused expert
parameters are [L, ...] while their names stay HF's. ``load_weights`` still takes the tensors
of every expert (a trainer's full state dict): it copies the rank's rows of a fused tensor
[E, ...] and its experts' per-expert tensors, checks the shape of the others and skips them;
``checkpoint_rows`` tells a loader which parts of a checkpoint's tensors to read at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import Attention, AttentionSpec
from rollout.layers.linear import Linear
from rollout.layers.mlp import GatedMLP
from rollout.layers.moe import (
    Experts,
    MoEParallelConfig,
    Router,
    RoutingParams,
    SparseMoeBlock,
    expert_slice,
    shared_experts_overlap,
)
from rollout.layers.norm import RMSNorm
from rollout.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    rope_theta_from_parameters,
    rotate,
)

__all__ = [
    "DecoderArgs",
    "MoECausalLM",
    "check_silu",
    "decoder_layer_of",
    "head_dim_of",
]

QKNorm = Literal["none", "head", "full"]


@dataclass(kw_only=True, slots=True, frozen=True)
class DecoderArgs:
    """Everything the shared decoder needs, normalised from a family's HF config.

    Attributes:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim: the shape.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base; ``rotary_dim``: rotated channels per head (< head_dim: partial).
        qkv_bias: q/k/v projections have a bias; ``o_bias``: the output projection has one.
        qk_norm: ``"none"``; ``"head"`` (RMSNorm over each head's D channels: Qwen3, GLM4);
            ``"full"`` (RMSNorm over the whole q / k projection: OLMoE).
        clip_qkv: clamp q, k, v to [-clip, clip] after the q/k norms (OLMoE), or None.
        dense_intermediate_size: intermediate size of the dense (non-MoE) layers' MLP.
        moe_intermediate_size: I of each routed expert.
        routing: the routing method and its parameters.
        moe_layers: global decoder indices of the MoE layers, ascending; others are dense.
        router_float32: router logits computed in float32 with a float32 weight.
        shared_intermediate_size: I of the shared expert MLP (0: none).
        shared_name: HF attribute name of the shared MLP (``shared_expert`` / ``shared_experts``).
        shared_gate: the shared output is scaled by a sigmoid gate (Qwen2-MoE).
        tie_word_embeddings: the LM head reuses the embedding matrix.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"
    clip_qkv: float | None = None
    dense_intermediate_size: int = 0
    moe_intermediate_size: int
    routing: RoutingParams
    moe_layers: tuple[int, ...]
    router_float32: bool = False
    shared_intermediate_size: int = 0
    shared_name: str = "shared_experts"
    shared_gate: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, config: Any, **family: Any) -> DecoderArgs:
        """The fields every family reads alike from its HF config (the shape, RMSNorm epsilon,
        RoPE base, rotary over the whole head, tied embeddings), then ``family``'s own fields,
        which may also replace any of those."""
        head_dim = head_dim_of(config)
        shared = dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=rope_theta_from_parameters(config.rope_parameters),
            rotary_dim=head_dim,
            tie_word_embeddings=config.tie_word_embeddings,
        )
        return cls(**(shared | family))

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                "num_attention_heads: expected a multiple of num_key_value_heads="
                f"{self.num_kv_heads}, got {self.num_heads}"
            )
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm: expected 'none', 'head' or 'full', got {self.qk_norm!r}")
        if not self.moe_layers:
            raise ValueError("moe_layers: expected at least one MoE layer, got none")
        if list(self.moe_layers) != sorted(set(self.moe_layers)) or not all(
            0 <= i < self.num_layers for i in self.moe_layers
        ):
            raise ValueError(
                f"moe_layers: expected ascending distinct indices in [0, {self.num_layers}), "
                f"got {self.moe_layers}"
            )
        if len(self.moe_layers) < self.num_layers and self.dense_intermediate_size <= 0:
            raise ValueError(
                "intermediate_size: expected a positive size for the dense layers, "
                f"got {self.dense_intermediate_size}"
            )
        if self.moe_intermediate_size <= 0:
            raise ValueError(
                f"moe_intermediate_size: expected a positive int, got {self.moe_intermediate_size}"
            )
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv: expected None or a positive float, got {self.clip_qkv}")


def check_silu(config: Any) -> None:
    """Every supported family's MLPs are SwiGLU; the fused experts implement SiLU only."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: expected 'silu', got {act!r}")


def head_dim_of(config: Any) -> int:
    """``config.head_dim`` when set, else ``hidden_size // num_attention_heads`` (HF's rule)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Embedding(nn.Module):
    """Token embedding [V, H], created uninitialised like every other weight here.

    ``compute_dtype``: the activations' dtype when it is not the weight's (a policy keeping
    float32 master weights for a bfloat16 forward, ``rollout.load_policy``); None: the
    weight's. The rows are rounded to it, as an engine holding the weight in it has them.
    """

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, ids_T: torch.Tensor) -> torch.Tensor:
        rows_TH = F.embedding(ids_T, self.weight)
        return rows_TH if self.compute_dtype is None else rows_TH.to(self.compute_dtype)


class SelfAttention(nn.Module):
    """q/k/v projection, optional q/k norm and clipping, RoPE, paged attention, out projection.

    ``deterministic``: the rotation runs eager (exactly rounded ops) instead of compiled."""

    deterministic = False

    def __init__(self, args: DecoderArgs, layer_index: int) -> None:
        super().__init__()
        n, g, d = args.num_heads, args.num_kv_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, g, d
        self.clip_qkv = args.clip_qkv
        self.qk_norm = args.qk_norm
        self.qkv_proj = Linear(
            args.hidden_size,
            (n * d, g * d, g * d),
            shard_names=("q", "k", "v"),
            bias=args.qkv_bias,
        )
        self.o_proj = Linear(n * d, args.hidden_size, bias=args.o_bias)
        if args.qk_norm == "head":
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        elif args.qk_norm == "full":
            self.q_norm = RMSNorm(n * d, args.rms_norm_eps)
            self.k_norm = RMSNorm(g * d, args.rms_norm_eps)
        self.attn = Attention(layer_index)

    def forward(
        self,
        x_TH: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        t = x_TH.shape[0]
        n, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_TX, k_TX, v_TX = self.qkv_proj(x_TH).split((n * d, g * d, g * d), dim=-1)
        if self.qk_norm == "full":
            q_TX, k_TX = self.q_norm(q_TX), self.k_norm(k_TX)
        if self.clip_qkv is not None:
            q_TX = q_TX.clamp(-self.clip_qkv, self.clip_qkv)
            k_TX = k_TX.clamp(-self.clip_qkv, self.clip_qkv)
            v_TX = v_TX.clamp(-self.clip_qkv, self.clip_qkv)
        q_TND, k_TGD, v_TGD = (
            q_TX.view(t, n, d),
            k_TX.reshape(t, g, d),
            v_TX.reshape(t, g, d),
        )
        if self.qk_norm == "head":
            q_TND, k_TGD = self.q_norm(q_TND), self.k_norm(k_TGD)
        rotary = rotate if self.deterministic else apply_rotary
        q_TND = rotary(q_TND, cos_TR, sin_TR)
        k_TGD = rotary(k_TGD, cos_TR, sin_TR)
        o_TND = self.attn(q_TND, k_TGD, v_TGD, batch)
        return self.o_proj(o_TND.reshape(t, n * d))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; ``moe_index`` is None for a dense layer; an MoE layer holds
    the experts ``local_experts``."""

    def __init__(
        self,
        args: DecoderArgs,
        layer_index: int,
        moe_index: int | None,
        overlap: bool,
        local_experts: range,
    ) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.self_attn = SelfAttention(args, layer_index)
        self.mlp: nn.Module
        if moe_index is None:
            self.mlp = GatedMLP(args.hidden_size, args.dense_intermediate_size)
        else:
            self.mlp = SparseMoeBlock(
                hidden_size=args.hidden_size,
                intermediate_size=args.moe_intermediate_size,
                routing=args.routing,
                moe_index=moe_index,
                router_float32=args.router_float32,
                shared_intermediate_size=args.shared_intermediate_size,
                shared_name=args.shared_name,
                shared_gate=args.shared_gate,
                overlap=overlap,
                local_experts=local_experts,
            )
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        delta_TH: torch.Tensor,
        residual_TH: torch.Tensor | None,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream entering the layer is ``residual + delta`` (``delta`` alone for the first
        layer); returns ``(mlp output, stream after attention)``, whose sum leaves it. Each add is
        folded into the RMSNorm after it (one kernel on CUDA), in HF's order and rounding."""
        if residual_TH is None:
            h_TH, residual_TH = self.input_layernorm(delta_TH), delta_TH
        else:
            h_TH, residual_TH = self.input_layernorm(delta_TH, residual_TH)
        attn_TH = self.self_attn(h_TH, cos_TR, sin_TR, batch)
        h_TH, residual_TH = self.post_attention_layernorm(attn_TH, residual_TH)
        if self.moe_index is None:
            return self.mlp(h_TH), residual_TH
        capture_TK = None
        if batch.routing_capture is not None:
            capture_TK = batch.routing_capture[: h_TH.shape[0], self.moe_index]
        return self.mlp(h_TH, capture_TK), residual_TH


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and the rotary embedding (HF's ``model.``)."""

    def __init__(self, args: DecoderArgs, overlap: bool, local_experts: range) -> None:
        super().__init__()
        moe_index = {layer: i for i, layer in enumerate(args.moe_layers)}
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            [
                DecoderLayer(args, i, moe_index.get(i), overlap, local_experts)
                for i in range(args.num_layers)
            ]
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            head_dim=args.head_dim, rotary_dim=args.rotary_dim, base=args.rope_theta
        )


# The layers whose ops ``deterministic`` switches to ``routing_kernels.batch_invariant``.
_NUMERICS_LAYERS = (
    Linear,
    RMSNorm,
    GatedMLP,
    Router,
    Experts,
    SparseMoeBlock,
    SelfAttention,
    RotaryEmbedding,
)

_EXPERT_NAME = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)
_SHARD_NAME = re.compile(r"^(?P<prefix>.+\.)(?P<shard>q|k|v|gate|up)_proj\.(?P<kind>weight|bias)$")
_LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")


def decoder_layer_of(name: str) -> int | None:
    """The decoder-layer index in an HF parameter name (``model.layers.{i}.``), else None."""
    match = _LAYER_NAME.match(name)
    return int(match["layer"]) if match else None


class MoECausalLM(nn.Module):
    """A single-device MoE causal LM over a paged KV cache (subclassed once per family).

    Build it under the target dtype and device (``rollout.loader`` does): weights are created
    uninitialised there and filled by ``load_weights`` or a dummy init.

    Args:
        config: the HF ``PretrainedConfig`` of the checkpoint.
        device: where the model runs (decides shared-expert overlap, which needs CUDA).
        parallel: the expert-parallel configuration (default: single device, every expert, no
            EPLB); with ``ep_size`` > 1 the MoE layers hold the experts
            ``expert_slice(E, ep_rank, ep_size)`` only (ValueError when E does not split).
        deterministic: batch-invariant numerics (``routing_kernels.batch_invariant``) in every
            layer: matmuls, norms, activations, RoPE, routing weights and experts compute each
            token's result independently of the other tokens of the step (with an
            ``InvariantAttentionBackend`` for attention). Shared experts then run on the main
            stream.

    Attributes:
        config, args, local_experts (the experts each MoE layer holds), model, lm_head,
        deterministic.

    Subclasses set ``architecture`` (the HF ``architectures`` entry) and implement
    ``args_from_config``; they override ``canonical_name`` when their checkpoints use other
    parameter names than HF v5's in-memory ones.
    """

    architecture: ClassVar[str]

    def __init__(
        self,
        config: Any,
        *,
        device: torch.device | str,
        parallel: MoEParallelConfig | None = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.args = self.args_from_config(config)
        parallel = parallel if parallel is not None else MoEParallelConfig()
        self.local_experts = expert_slice(
            self.args.routing.num_experts, parallel.ep_rank, parallel.ep_size
        )
        overlap = (
            self.args.shared_intermediate_size > 0
            and not deterministic
            and shared_experts_overlap(device=device, parallel=parallel)
        )
        self.model = DecoderModel(self.args, overlap, self.local_experts)
        self.lm_head = Linear(self.args.hidden_size, self.args.vocab_size)
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if overlap:
            aux_stream = torch.cuda.Stream(torch.device(device))
            for block in self._moe_blocks():
                block.aux_stream = aux_stream
        self.deterministic = deterministic
        for module in self.modules():
            if isinstance(module, _NUMERICS_LAYERS):
                module.deterministic = deterministic

    @classmethod
    def args_from_config(cls, config: Any) -> DecoderArgs:
        """Map the family's HF config onto ``DecoderArgs``; ValueError for what is unsupported."""
        raise NotImplementedError

    def canonical_name(self, name: str) -> str | None:
        """The HF v5 name for a checkpoint name, or None to skip the tensor."""
        return name

    # ---- what the runner needs -----------------------------------------------------------

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Global decoder-layer indices of the MoE layers (the capture buffer's layer axis)."""
        return self.args.moe_layers

    @property
    def routing_params(self) -> RoutingParams:
        """Routing method, top_k, num_experts and the DEEPSEEK_V3 parameters."""
        return self.args.routing

    @property
    def attention_spec(self) -> AttentionSpec:
        """Attention shape for the KV cache and the attention backend."""
        a = self.args
        return AttentionSpec(
            num_layers=a.num_layers,
            num_heads=a.num_heads,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            scale=a.head_dim**-0.5,
        )

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Give layer ``i`` the view ``kv_cache[i]`` of the cache [layers, P, 2, S, G, D]."""
        a = self.args
        if (
            kv_cache.dim() != 6
            or kv_cache.shape[0] != a.num_layers
            or kv_cache.shape[2] != 2
            or (kv_cache.shape[4:] != (a.num_kv_heads, a.head_dim))
        ):
            raise ValueError(
                f"kv_cache: expected [{a.num_layers}, blocks, 2, block_size, {a.num_kv_heads}, "
                f"{a.head_dim}], got {tuple(kv_cache.shape)}"
            )
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attn.kv_cache = kv_cache[i]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, H] of every token of the step (after the last norm)."""
        delta_TH = self.model.embed_tokens(batch.input_ids)
        cos_TR, sin_TR = self.model.rotary_emb.cos_sin(batch.positions, delta_TH.dtype)
        residual_TH = None
        for layer in self.model.layers:
            delta_TH, residual_TH = layer(delta_TH, residual_TH, cos_TR, sin_TR, batch)
        hidden_TH, _ = self.model.norm(delta_TH, residual_TH)
        return hidden_TH

    def compute_logits(self, hidden_XH: torch.Tensor) -> torch.Tensor:
        """LM-head logits [*, V] in the model dtype (the runner casts to float32)."""
        return self.lm_head(hidden_XH)

    def _moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers if layer.moe_index is not None]

    # ---- weights -------------------------------------------------------------------------

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
