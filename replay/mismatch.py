"""Training/inference mismatch of rollout samples under a trainer's forward, with or without R3.

``measure_mismatch`` runs the trainer's (patched) HF model over rollout samples, either with
native routing or replaying each sample's rollout trace, and reports the quantities the R3
paper tracks: k3 KL(rollout || train) and the extreme-token fraction F(tau) over the
generated tokens, and router agreement between the rollout's trace and the ids the trainer's
experts actually received (read at the experts modules, so a replay bug shows up as < 1).

Legend: S sequence length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from replay.controller import ReplayController
from replay.expert_tap import ExpertsTap
from replay.layout import BatchLayout
from replay.metrics import extreme_token_fraction, kl_k3, router_agreement
from replay.routed_experts import RoutedExperts

__all__ = ["Mismatch", "RolloutSample", "measure_mismatch"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutSample:
    """One rollout sequence as the engine returned it (plain data)."""

    token_ids: tuple[int, ...]  # prompt + generated
    prompt_len: int
    logprobs: np.ndarray  # [generated] float32 behaviour-policy logprobs
    trace: RoutedExperts  # rows 0 .. len(token_ids) - 2 (start 0)

    @classmethod
    def from_output(
        cls, output: Any, *, moe_layers: Sequence[int], num_experts: int
    ) -> RolloutSample:
        """From a ``rollout.RequestOutput`` (or anything with its ``prompt_token_ids``,
        ``token_ids``, ``logprobs`` and ``routed_experts`` from row 0)."""
        if output.routed_experts is None:
            raise ValueError(
                "output.routed_experts: expected the request's routing (generate with "
                "capture_routing=True and return_routed_experts=True), got None"
            )
        return cls(
            token_ids=tuple(output.prompt_token_ids) + tuple(output.token_ids),
            prompt_len=len(output.prompt_token_ids),
            logprobs=np.asarray(output.logprobs, dtype=np.float32),
            trace=RoutedExperts(output.routed_experts, moe_layers, num_experts),
        )

    def __post_init__(self) -> None:
        generated = len(self.token_ids) - self.prompt_len
        if not 1 <= self.prompt_len < len(self.token_ids):
            raise ValueError(
                f"prompt_len: expected in [1, {len(self.token_ids)}) (some tokens generated), "
                f"got {self.prompt_len}"
            )
        if len(self.logprobs) != generated:
            raise ValueError(
                f"logprobs: expected {generated} values (one per generated token), "
                f"got {len(self.logprobs)}"
            )
        if self.trace.start != 0 or self.trace.num_rows != len(self.token_ids) - 1:
            raise ValueError(
                f"trace: expected start 0 and {len(self.token_ids) - 1} rows, got start "
                f"{self.trace.start} and {self.trace.num_rows} rows"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Mismatch:
    """Rollout vs trainer over the generated tokens of a set of samples."""

    kl_k3: float
    extreme_token_fraction: float  # F(tau)
    router_agreement: float  # over every (token, MoE layer) row of the samples
    tokens: int  # generated tokens compared


def measure_mismatch(
    model: torch.nn.Module,
    ctl: ReplayController,
    samples: Sequence[RolloutSample],
    *,
    replay: bool,
    tau: float = 2.0,
    progress: bool = False,
) -> Mismatch:
    """Forward each sample through ``model`` (no grad), natively or replaying its trace;
    ``progress`` shows a tqdm bar over the samples."""
    if not samples:
        raise ValueError("samples: expected at least one rollout sample, got none")
    device = next(model.parameters()).device
    logp_rollout, logp_train, used = [], [], []
    desc = f"scoring, {'replayed (r3)' if replay else 'native routing'}"
    for sample in tqdm(samples, desc=desc, unit="seq", disable=not progress):
        input_ids_1S = torch.tensor([sample.token_ids], device=device)
        with torch.no_grad(), ExpertsTap(ctl) as tap:
            if replay:
                with ctl.replay([sample.trace]):
                    logits_1SV = model(input_ids_1S).logits
            else:
                logits_1SV = model(input_ids_1S).logits
        (used_trace,) = tap.traces(BatchLayout.dense(1, len(sample.token_ids)))
        used.append(used_trace)
        logp_SV = torch.log_softmax(logits_1SV[0].float(), dim=-1)
        targets_G = torch.tensor(sample.token_ids[sample.prompt_len :], device=device)
        rows_GV = logp_SV[sample.prompt_len - 1 : len(sample.token_ids) - 1]
        logp_train.append(rows_GV.gather(1, targets_G[:, None])[:, 0].cpu())
        logp_rollout.append(torch.from_numpy(np.asarray(sample.logprobs, dtype=np.float32)))
    rollout_G, train_G = torch.cat(logp_rollout), torch.cat(logp_train)
    return Mismatch(
        kl_k3=kl_k3(rollout_G, train_G),
        extreme_token_fraction=extreme_token_fraction(rollout_G, train_G, tau=tau),
        router_agreement=router_agreement([s.trace for s in samples], used).overall,
        tokens=len(rollout_G),
    )
