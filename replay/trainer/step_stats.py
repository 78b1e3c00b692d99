"""A learner step's bookkeeping: its micro-batches (``Chunk``), what each pass computed for
them, the minibatches they form, and the step's metrics (``StepStats``, ``Totals``), merged over
ranks when several train (see ``replay.trainer.learner``).

Legend: B answers, S token positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from replay.layout import BatchLayout
from replay.metrics import extreme_token_fraction, kl_k3, router_agreement
from replay.routed_experts import RoutedExperts
from replay.trainer.batch import TrainBatch
from replay.trainer.grpo import LossTerms

__all__ = ["Chunk", "Minibatch", "StepStats", "Totals"]


class Chunk:
    """One micro-batch of a step and what the passes computed for it."""

    def __init__(
        self, *, indices: np.ndarray, tensors: TrainBatch, advantages: torch.Tensor
    ) -> None:
        self.indices = indices
        self.tensors = tensors
        self.advantages = advantages
        self.layout: BatchLayout | None = None
        self.rollout_traces: list[RoutedExperts] | None = None
        self.replay_traces: list[RoutedExperts] | None = None
        self.native_traces: list[RoutedExperts] | None = None
        self.used_traces: list[RoutedExperts] | None = None
        self.logp_old: torch.Tensor | None = None
        self.logp_ref: torch.Tensor | None = None


@dataclasses.dataclass(slots=True)
class Minibatch:
    """One optimizer step's share of this rank: its micro-batches and the normalisers of the
    loss, counted over the whole minibatch (every rank's share)."""

    parts: list[Chunk]
    num_tokens: float
    num_sequences: float


@dataclasses.dataclass(slots=True)
class StepStats:
    """What a step's metrics are computed from: one rank's answers, or all ranks' merged."""

    logp_rollout: torch.Tensor
    logp_train: torch.Tensor
    rollout_traces: list[RoutedExperts] | None
    used_traces: list[RoutedExperts] | None
    native_traces: list[RoutedExperts] | None
    totals: Totals
    train_tokens: int

    @classmethod
    def collect(cls, parts: list[Chunk], totals: Totals) -> StepStats:
        rollout_values, train_values = [], []
        for part in parts:
            mask = part.tensors.answer_mask_BS
            assert part.logp_old is not None
            rollout_values.append(part.tensors.rollout_logp_BS[mask])
            train_values.append(part.logp_old[mask])

        def traces(name: str) -> list[RoutedExperts] | None:
            if getattr(parts[0], name) is None:
                return None
            return [t for p in parts for t in getattr(p, name)]

        return cls(
            logp_rollout=torch.cat(rollout_values),
            logp_train=torch.cat(train_values),
            rollout_traces=traces("rollout_traces"),
            used_traces=traces("used_traces"),
            native_traces=traces("native_traces"),
            totals=totals,
            train_tokens=sum(part.tensors.num_tokens for part in parts),
        )

    def to_cpu(self) -> StepStats:
        return dataclasses.replace(
            self, logp_rollout=self.logp_rollout.cpu(), logp_train=self.logp_train.cpu()
        )

    @classmethod
    def merge(cls, ranks: list[StepStats]) -> StepStats:
        """All ranks' stats, in rank order."""

        def traces(name: str) -> list[RoutedExperts] | None:
            if getattr(ranks[0], name) is None:
                return None
            return [t for r in ranks for t in getattr(r, name)]

        return cls(
            logp_rollout=torch.cat([r.logp_rollout for r in ranks]),
            logp_train=torch.cat([r.logp_train for r in ranks]),
            rollout_traces=traces("rollout_traces"),
            used_traces=traces("used_traces"),
            native_traces=traces("native_traces"),
            totals=Totals.merge([r.totals for r in ranks]),
            train_tokens=sum(r.train_tokens for r in ranks),
        )

    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "kl_k3": kl_k3(self.logp_rollout, self.logp_train),
            "extreme_token_fraction": extreme_token_fraction(
                self.logp_rollout, self.logp_train, tau=2.0
            ),
            **self.totals.summary(),
        }
        if self.rollout_traces is not None:
            assert self.used_traces is not None
            used = router_agreement(self.rollout_traces, self.used_traces)
            metrics["router_agreement"] = used.overall
            metrics["router_agreement_per_layer"] = list(used.per_layer)
            if self.native_traces is not None:
                native = router_agreement(self.rollout_traces, self.native_traces)
                metrics["router_agreement_native"] = native.overall
                metrics["router_agreement_native_per_layer"] = list(native.per_layer)
        return metrics


class Totals:
    """Loss statistics of a step.

    Each micro-batch's loss is already normalized by its minibatch's totals, so losses are
    summed within a minibatch and averaged over minibatches; the ratio statistics are means
    over units (tokens, or sequences for GSPO), weighted by each micro-batch's units.
    """

    _LOSSES = ("loss", "policy_loss", "kl_ref")

    def __init__(self) -> None:
        self.units = 0.0
        self.weighted: dict[str, float] = {}
        self.minibatch: dict[str, float] = {}
        self.losses: dict[str, list[float]] = {}
        self.grad_norms: list[float] = []

    def add(self, terms: LossTerms, *, units: float) -> None:
        losses = {
            "loss": float(terms.loss.detach()),
            "policy_loss": terms.policy_loss,
            "kl_ref": terms.kl_ref,
        }
        for name, value in losses.items():
            if value is not None:
                self.minibatch[name] = self.minibatch.get(name, 0.0) + value
        self.units += units
        ratios = {
            "clip_fraction": terms.clip_fraction,
            "ratio_mean": terms.ratio_mean,
            "tis_weight_mean": terms.tis_weight_mean,
            "tis_truncated_fraction": terms.tis_truncated_fraction,
        }
        for name, value in ratios.items():
            if value is not None:
                self.weighted[name] = self.weighted.get(name, 0.0) + units * value

    def end_minibatch(self, grad_norm: float) -> None:
        for name, value in self.minibatch.items():
            self.losses.setdefault(name, []).append(value)
        self.minibatch = {}
        self.grad_norms.append(grad_norm)

    @classmethod
    def merge(cls, ranks: list[Totals]) -> Totals:
        """All ranks' statistics: each rank's losses are parts of its minibatches' losses
        (normalised by the whole minibatch), so they add up; the gradient norm is global."""
        merged = cls()
        for totals in ranks:
            merged.units += totals.units
            for name, value in totals.weighted.items():
                merged.weighted[name] = merged.weighted.get(name, 0.0) + value
            for name, values in totals.losses.items():
                have = merged.losses.setdefault(name, [0.0] * len(values))
                merged.losses[name] = [a + b for a, b in zip(have, values, strict=True)]
        merged.grad_norms = list(ranks[0].grad_norms)
        return merged

    def summary(self) -> dict[str, float]:
        out = {name: float(np.mean(values)) for name, values in self.losses.items()}
        out.update({name: total / self.units for name, total in self.weighted.items()})
        out["grad_norm"] = float(np.mean(self.grad_norms))
        return out
