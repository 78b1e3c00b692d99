"""A bias-optional linear layer whose weight may be the concatenation of several HF weights.

Legend: T tokens, I input features, O output features.

Weights are created uninitialised (``torch.empty``) in the ambient default dtype and device, so
a 30B-shaped model is built directly on the GPU without an init pass; the loader fills them.
A fused layer (q/k/v, gate/up) records its ``shards``: the name and row range of each HF
weight it holds, which ``load_weights`` uses to copy HF tensors into the right rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routing_kernels import batch_invariant

__all__ = ["Linear"]


class Linear(nn.Module):
    """``y_TO = x_TI @ weight.T (+ bias)`` with ``weight`` [O, I].

    Args:
        in_features: I.
        out_features: O per shard, in order; the weight stacks the shards' rows.
        shard_names: a name per shard (e.g. ``("q", "k", "v")``); one unnamed shard by default.
        bias: whether the layer has a bias [O].

    ``deterministic`` (set by ``MoECausalLM``): ``routing_kernels.batch_invariant.linear``, whose
    result for a row does not depend on the other rows.
    """

    deterministic = False

    def __init__(
        self,
        in_features: int,
        out_features: int | tuple[int, ...],
        *,
        shard_names: tuple[str, ...] | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        sizes = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        names = shard_names if shard_names is not None else ("",) * len(sizes)
        if len(names) != len(sizes):
            raise ValueError(f"shard_names: expected {len(sizes)} names, got {names}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.shards: dict[str, tuple[int, int]] = {
            name: (start, start + size)
            for name, start, size in zip(names, starts, sizes, strict=True)
        }
        self.in_features = in_features
        self.out_features = sum(sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )

    def forward(self, x_TI: torch.Tensor) -> torch.Tensor:
        if self.deterministic:
            return batch_invariant.linear(x_TI, self.weight, self.bias)
        return F.linear(x_TI, self.weight, self.bias)
