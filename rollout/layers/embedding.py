"""The token embedding of the decoder.

Legend: T tokens, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Embedding"]


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
