"""The MoE decoder shared by every supported family, configured by ``DecoderArgs``.

Legend: T tokens, H hidden size, V vocabulary, N query heads, G KV heads, D head dim,
R rotary dim, E experts, L experts held (E without expert parallelism), I expert intermediate
size.

All five families are pre-norm decoders: RMSNorm -> attention (fused q/k/v projection, optional
q/k RMSNorm, RoPE, paged attention) -> residual -> RMSNorm -> MLP (dense SwiGLU or sparse MoE)
-> residual; final RMSNorm; LM head. A family file only maps its HF config onto
``DecoderArgs`` and, where its checkpoints use other names, maps its parameter names onto the
canonical HF v5 names (``canonical_name``). Parameter names and weight loading:
``rollout.models.weights``.

The model is single-device. Expert parallelism is applied from outside: built with a
``rollout.engine.expert_parallel.MoEParallelConfig`` its MoE layers hold only that rank's slice
of the experts, and the engine sets their ``dispatch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from rollout.forward_batch import ForwardBatch
from rollout.layers.attention import Attention, AttentionSpec
from rollout.layers.embedding import Embedding
from rollout.layers.linear import Linear
from rollout.layers.mlp import GatedMLP
from rollout.layers.moe import (
    Experts,
    Router,
    RoutingParams,
    SparseMoeBlock,
    shared_experts_overlap,
)
from rollout.layers.norm import RMSNorm
from rollout.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    rope_theta_from_parameters,
    rotate,
)
from rollout.models.weights import CheckpointWeights

if TYPE_CHECKING:
    from rollout.engine.expert_parallel import MoEParallelConfig

__all__ = [
    "DecoderArgs",
    "MoECausalLM",
    "check_silu",
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
        return self.mlp(h_TH, batch.capture), residual_TH


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and the rotary embedding (HF's ``model.``)."""

    def __init__(self, args: DecoderArgs, local_experts: range) -> None:
        super().__init__()
        moe_index = {layer: i for i, layer in enumerate(args.moe_layers)}
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(args, i, moe_index.get(i), local_experts) for i in range(args.num_layers)]
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


class MoECausalLM(CheckpointWeights, nn.Module):
    """A single-device MoE causal LM over a paged KV cache (subclassed once per family).

    Build it under the target dtype and device (``rollout.loader`` does): weights are created
    uninitialised there and filled by ``load_weights`` or a dummy init.

    Args:
        config: the HF ``PretrainedConfig`` of the checkpoint.
        device: where the model runs (with ``deterministic``, it decides shared-expert overlap:
            ``shared_experts_overlap``).
        parallel: the experts the MoE layers hold: ``parallel.local_experts(E)`` (ValueError
            when E does not split); None: every expert.
        deterministic: batch-invariant numerics (``routing_kernels.batch_invariant``) in every
            layer: matmuls, norms, activations, RoPE, routing weights and experts compute each
            token's result independently of the other tokens of the step (with an
            ``InvariantAttentionBackend`` for attention). Shared experts then run on the main
            stream.

    Attributes:
        config, args, local_experts (the experts each MoE layer holds), model, lm_head,
        deterministic.

    Weights: ``load_weights`` and ``checkpoint_rows`` (``rollout.models.weights``).

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
        num_experts = self.args.routing.num_experts
        self.local_experts = (
            range(num_experts) if parallel is None else parallel.local_experts(num_experts)
        )
        self.model = DecoderModel(self.args, self.local_experts)
        self.lm_head = Linear(self.args.hidden_size, self.args.vocab_size)
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.args.shared_intermediate_size and shared_experts_overlap(
            device=device, deterministic=deterministic
        ):
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
