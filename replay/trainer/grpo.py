"""The GRPO objective: group-relative advantages and the clipped, mask-aware policy loss.

Tensors are ``[B, S]`` over a right-padded batch of ``B`` sequences of ``S`` token positions;
position ``t`` of a logprob tensor holds the log-probability of token ``t`` given tokens
``< t`` (position 0 has none and is never in a mask). ``mask_BS`` selects the answer
(generated) tokens the loss is over.

Per token, with ``A`` the sequence's advantage and ``r = exp(logp - logp_old)``:

- token ratio (PPO/GRPO): ``l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)``;
- sequence ratio (GSPO): ``s = exp(mean_t(logp - logp_old))`` over the answer's tokens and
  ``l = -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A)`` per sequence;
- truncated importance sampling (TIS) against the rollout engine's logprobs: each token's
  (GSPO: each sequence's) loss is weighted by ``w = min(exp(logp_old - logp_rollout), cap)``
  (GSPO: the geometric mean over the answer, ``exp(mean_t(logp_old - logp_rollout))``),
  a constant (no gradient);
- KL to a reference policy (k3): ``kl_t = exp(logp_ref - logp) - (logp_ref - logp) - 1``,
  added as ``kl_coef * kl`` with the same aggregation as the token loss.

Aggregation: ``token_mean`` sums over the masked tokens and divides by ``num_tokens``;
``seq_mean`` averages each sequence over its tokens, sums and divides by ``num_sequences``
(GSPO's per-sequence loss always so). The normalizers default to this batch's counts; pass
the minibatch's totals when a minibatch is split into micro-batches for gradient
accumulation, so that the summed micro-batch losses equal the minibatch loss.

Legend: B sequences, S token positions, V vocabulary, G group size, P prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from routing_kernels import batch_invariant

__all__ = ["LossTerms", "group_advantages", "policy_loss", "token_logprobs"]


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages of rewards laid out group after group.

    ``rewards`` is ``[P * G]``: the ``G`` answers of prompt ``p`` are ``rewards[p*G:(p+1)*G]``.
    Each advantage is its reward minus the group's mean, divided by ``std + eps`` when
    ``normalize_std`` (the sample standard deviation, ``n - 1`` in the denominator, as in
    DeepSeekMath's GRPO and TRL). A group whose rewards are all equal gets zero advantages.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.ndim != 1 or not rewards.dtype.is_floating_point:
        raise ValueError(
            f"rewards: expected a 1-D float tensor, got shape {tuple(rewards.shape)} "
            f"dtype {rewards.dtype}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: expected an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards: expected a multiple of group_size {group_size} values, got {rewards.numel()}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: expected finite values, got a NaN or infinity")
    rewards_PG = rewards.reshape(-1, group_size)
    centred_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if normalize_std:
        centred_PG = centred_PG / (rewards_PG.std(dim=1, keepdim=True) + eps)
    return centred_PG.reshape(-1)


def token_logprobs(
    logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor, *, invariant: bool = False
) -> torch.Tensor:
    """Log-probability of every token given the ones before it, in float32, ``[B, S]``.

    Position ``t >= 1`` holds ``log_softmax(logits[:, t - 1])[input_ids[:, t]]``; position 0
    is 0 (no prediction). Computed as the gathered logit minus the log-sum-exp, so no
    ``[B, S, V]`` log-softmax is materialised beyond the float32 logits. ``invariant``: by
    ``routing_kernels.batch_invariant.token_logprobs``, the function a deterministic rollout
    engine's sampler uses (equal logits rows give equal bits).
    """
    if logits_BSV.ndim != 3 or input_ids_BS.shape != logits_BSV.shape[:2]:
        raise ValueError(
            f"input_ids_BS: expected shape {tuple(logits_BSV.shape[:2])} (logits' first two "
            f"dims, logits 3-D), got {tuple(input_ids_BS.shape)} with logits "
            f"{tuple(logits_BSV.shape)}"
        )
    logits_BSV = logits_BSV[:, :-1].float()
    next_BS = input_ids_BS[:, 1:]
    if invariant:
        return torch.nn.functional.pad(batch_invariant.token_logprobs(logits_BSV, next_BS), (1, 0))
    picked_BS = logits_BSV.gather(-1, next_BS.unsqueeze(-1)).squeeze(-1)
    logp_BS = picked_BS - torch.logsumexp(logits_BSV, dim=-1)
    return torch.nn.functional.pad(logp_BS, (1, 0))


@dataclass(kw_only=True, slots=True, frozen=True)
class LossTerms:
    """The loss to back-propagate and detached statistics of it.

    Attributes:
        loss: the scalar objective (policy loss plus ``kl_coef`` times the KL term).
        policy_loss: the clipped surrogate part.
        kl_ref: the aggregated k3 KL to the reference (None without a reference).
        clip_fraction: fraction of tokens (GSPO: sequences) whose clipped term was the minimum
            and differed from the unclipped one (no gradient flows through them).
        ratio_mean: mean of the ratio over the masked tokens (GSPO: over sequences).
        tis_weight_mean: mean TIS weight (None without TIS).
        tis_truncated_fraction: fraction of TIS weights capped (None without TIS).
    """

    loss: torch.Tensor
    policy_loss: float
    kl_ref: float | None
    clip_fraction: float
    ratio_mean: float
    tis_weight_mean: float | None
    tis_truncated_fraction: float | None


def policy_loss(
    logp_BS: torch.Tensor,
    logp_old_BS: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BS: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio: Literal["token", "sequence"] = "token",
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean",
    logp_rollout_BS: torch.Tensor | None = None,
    tis_cap: float | None = None,
    logp_ref_BS: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> LossTerms:
    """The GRPO / GSPO loss of one (micro-)batch; see the module docstring for the formulas.

    Args:
        logp_BS: the current policy's logprobs (with gradient).
        logp_old_BS: the logprobs of the policy the ratio is taken against (no gradient).
        advantages_B: one advantage per sequence.
        mask_BS: bool, the answer tokens; every sequence must have at least one.
        clip_low, clip_high: the clip range ``[1 - clip_low, 1 + clip_high]``.
        ratio: ``"token"`` or ``"sequence"`` (GSPO).
        loss_agg: ``"token_mean"`` or ``"seq_mean"`` (ignored by GSPO: per sequence).
        logp_rollout_BS, tis_cap: the rollout engine's logprobs and the TIS cap (both or none).
        logp_ref_BS, kl_coef: the reference policy's logprobs and the KL weight (both or none).
        num_tokens, num_sequences: normalizers (default: this batch's masked tokens and
            sequences).
    """
    mask_BS = _check_inputs(
        logp_BS, logp_old_BS, advantages_B, mask_BS, logp_rollout_BS, logp_ref_BS
    )
    if (logp_rollout_BS is None) != (tis_cap is None):
        raise ValueError(
            f"tis_cap: expected it together with logp_rollout_BS, got tis_cap={tis_cap} and "
            f"logp_rollout_BS {'missing' if logp_rollout_BS is None else 'given'}"
        )
    if (logp_ref_BS is None) != (kl_coef == 0):
        raise ValueError(
            f"kl_coef: expected > 0 exactly when logp_ref_BS is given, got kl_coef={kl_coef} and "
            f"logp_ref_BS {'missing' if logp_ref_BS is None else 'given'}"
        )
    if ratio not in ("token", "sequence"):
        raise ValueError(f"ratio: expected 'token' or 'sequence', got {ratio!r}")
    if loss_agg not in ("token_mean", "seq_mean"):
        raise ValueError(f"loss_agg: expected 'token_mean' or 'seq_mean', got {loss_agg!r}")
    mask_f_BS = mask_BS.to(logp_BS.dtype)
    tokens_B = mask_f_BS.sum(dim=1)
    num_tokens = float(tokens_B.sum()) if num_tokens is None else num_tokens
    num_sequences = float(mask_BS.shape[0]) if num_sequences is None else num_sequences
    low, high = 1.0 - clip_low, 1.0 + clip_high
    log_ratio_BS = (logp_BS - logp_old_BS.detach()) * mask_f_BS

    def seq_mean(values_BS: torch.Tensor) -> torch.Tensor:
        return (values_BS * mask_f_BS).sum(dim=1) / tokens_B

    def aggregate(values_BS: torch.Tensor) -> torch.Tensor:
        if loss_agg == "token_mean":
            return (values_BS * mask_f_BS).sum() / num_tokens
        return seq_mean(values_BS).sum() / num_sequences

    tis_weight = None
    if logp_rollout_BS is not None:
        log_w_BS = (logp_old_BS - logp_rollout_BS).detach() * mask_f_BS
        log_w = seq_mean(log_w_BS) if ratio == "sequence" else log_w_BS
        tis_weight = torch.exp(log_w).clamp(max=tis_cap)
        truncated = torch.exp(log_w) > tis_cap

    if ratio == "token":
        ratio_BS = torch.exp(log_ratio_BS)
        adv_B1 = advantages_B[:, None]
        unclipped_BS = ratio_BS * adv_B1
        clipped_BS = ratio_BS.clamp(low, high) * adv_B1
        loss_BS = -torch.minimum(unclipped_BS, clipped_BS)
        if tis_weight is not None:
            loss_BS = loss_BS * tis_weight
        policy = aggregate(loss_BS)
        is_clipped = (clipped_BS < unclipped_BS) & mask_BS
        count = mask_BS.sum()
        clip_fraction = float(is_clipped.sum() / count)
        ratio_mean = float((ratio_BS.detach() * mask_f_BS).sum() / count)
        selected = mask_BS
    else:
        seq_ratio_B = torch.exp(log_ratio_BS.sum(dim=1) / tokens_B)
        unclipped_B = seq_ratio_B * advantages_B
        clipped_B = seq_ratio_B.clamp(low, high) * advantages_B
        loss_B = -torch.minimum(unclipped_B, clipped_B)
        if tis_weight is not None:
            loss_B = loss_B * tis_weight
        policy = loss_B.sum() / num_sequences
        clip_fraction = float((clipped_B < unclipped_B).double().mean())
        ratio_mean = float(seq_ratio_B.detach().double().mean())
        selected = torch.ones_like(advantages_B, dtype=torch.bool)

    loss = policy
    kl_value = None
    if logp_ref_BS is not None:
        delta_BS = (logp_ref_BS.detach() - logp_BS) * mask_f_BS
        kl_BS = torch.exp(delta_BS) - delta_BS - 1
        kl = aggregate(kl_BS)
        loss = loss + kl_coef * kl
        kl_value = float(kl.detach())

    tis_mean = tis_truncated = None
    if tis_weight is not None:
        tis_mean = float(tis_weight[selected].double().mean())
        tis_truncated = float(truncated[selected].double().mean())
    return LossTerms(
        loss=loss,
        policy_loss=float(policy.detach()),
        kl_ref=kl_value,
        clip_fraction=clip_fraction,
        ratio_mean=ratio_mean,
        tis_weight_mean=tis_mean,
        tis_truncated_fraction=tis_truncated,
    )


def _check_inputs(
    logp_BS: torch.Tensor,
    logp_old_BS: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BS: torch.Tensor,
    logp_rollout_BS: torch.Tensor | None,
    logp_ref_BS: torch.Tensor | None,
) -> torch.Tensor:
    """Shapes and dtypes of the loss inputs; returns the mask as bool."""
    tensors = {
        "logp_BS": logp_BS,
        "logp_old_BS": logp_old_BS,
        "advantages_B": advantages_B,
        "mask_BS": mask_BS,
        "logp_rollout_BS": logp_rollout_BS,
        "logp_ref_BS": logp_ref_BS,
    }
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if logp_BS.ndim != 2 or not logp_BS.dtype.is_floating_point:
        raise ValueError(
            f"logp_BS: expected a 2-D float tensor, got shape {tuple(logp_BS.shape)} "
            f"dtype {logp_BS.dtype}"
        )
    for name in ("logp_old_BS", "mask_BS", "logp_rollout_BS", "logp_ref_BS"):
        value = tensors[name]
        if value is not None and value.shape != logp_BS.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(logp_BS.shape)} (as logp_BS), "
                f"got {tuple(value.shape)}"
            )
    if advantages_B.shape != logp_BS.shape[:1]:
        raise ValueError(
            f"advantages_B: expected shape ({logp_BS.shape[0]},) (one per sequence), "
            f"got {tuple(advantages_B.shape)}"
        )
    if mask_BS.dtype != torch.bool:
        raise ValueError(f"mask_BS: expected dtype torch.bool, got {mask_BS.dtype}")
    empty = (~mask_BS.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(
            f"mask_BS: expected at least one answer token per sequence, got none in sequence "
            f"{int(empty[0])}"
        )
    return mask_BS
