"""replay.trainer.grpo against the formulas, written out token by token in plain Python."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from replay.trainer.grpo import group_advantages, policy_loss, token_logprobs


def random_batch(rng: torch.Generator, batch: int = 5, seq: int = 9) -> dict[str, torch.Tensor]:
    """Logprob tensors with garbage (huge values) outside the answer mask, which must not count."""
    lengths = torch.randint(4, seq + 1, (batch,), generator=rng)
    starts = torch.stack([torch.randint(1, int(n) - 1, (1,), generator=rng)[0] for n in lengths])
    positions = torch.arange(seq)[None, :]
    mask = (positions >= starts[:, None]) & (positions < lengths[:, None])
    garbage = torch.full((batch, seq), 1e4)

    def logp(scale: float) -> torch.Tensor:
        values = -torch.rand(batch, seq, generator=rng, dtype=torch.float64) * scale
        return torch.where(mask, values, garbage.double())

    return {
        "logp": logp(3.0).requires_grad_(True),
        "old": logp(3.0),
        "rollout": logp(3.0),
        "ref": logp(3.0),
        "adv": torch.randn(batch, generator=rng, dtype=torch.float64),
        "mask": mask,
    }


def answer_tokens(mask: torch.Tensor, b: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if mask[b, t]]


# ---------------------------------------------------------------------- advantages


def test_group_advantages_match_mean_and_sample_std(rng: torch.Generator) -> None:
    # float64: in float32 an advantage near zero (a reward near its group's mean) carries
    # ~1e-7 of cancellation error, beyond a 1e-5 relative check of the semantics.
    rewards = torch.rand(12, generator=rng, dtype=torch.float64)
    got = group_advantages(rewards, 4)
    for g in range(3):
        group = [float(r) for r in rewards[4 * g : 4 * g + 4]]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert got[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-5)
    centred = group_advantages(rewards, 4, normalize_std=False)
    for g in range(3):
        group = [float(r) for r in rewards[4 * g : 4 * g + 4]]
        for i, r in enumerate(group):
            assert centred[4 * g + i].item() == pytest.approx(r - statistics.fmean(group), abs=1e-6)


def test_group_advantages_equal_rewards_give_zero() -> None:
    assert torch.equal(group_advantages(torch.ones(6), 3), torch.zeros(6))


@pytest.mark.parametrize(
    ("rewards", "group_size", "pattern"),
    [
        (torch.ones(5), 2, "multiple of group_size"),
        (torch.ones(4), 1, "group_size: expected an int >= 2"),
        (torch.ones(2, 2), 2, "1-D float tensor"),
        (torch.tensor([1.0, float("nan")]), 2, "finite"),
    ],
)
def test_group_advantages_errors(rewards: torch.Tensor, group_size: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        group_advantages(rewards, group_size)


# ---------------------------------------------------------------------- token logprobs


def test_token_logprobs_is_log_softmax_of_the_previous_position(rng: torch.Generator) -> None:
    logits = torch.randn(2, 5, 7, generator=rng)
    ids = torch.randint(0, 7, (2, 5), generator=rng)
    got = token_logprobs(logits, ids)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    for b in range(2):
        assert got[b, 0].item() == 0.0
        for t in range(1, 5):
            row = [float(x) for x in logits[b, t - 1]]
            log_z = math.log(sum(math.exp(x) for x in row))
            assert got[b, t].item() == pytest.approx(row[int(ids[b, t])] - log_z, abs=1e-5)


# ---------------------------------------------------------------------- the loss


def reference_token_loss(
    d: dict[str, torch.Tensor],
    *,
    low: float,
    high: float,
    agg: str,
    tis_cap: float | None,
    kl_coef: float,
) -> torch.Tensor:
    """The per-token GRPO loss, summed in Python loops."""
    mask = d["mask"]
    per_seq, total_tokens = [], 0
    loss_tokens = torch.zeros((), dtype=torch.float64)
    for b in range(mask.shape[0]):
        tokens = answer_tokens(mask, b)
        seq_sum = torch.zeros((), dtype=torch.float64)
        for t in tokens:
            ratio = torch.exp(d["logp"][b, t] - d["old"][b, t])
            a = d["adv"][b]
            term = -torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
            if tis_cap is not None:
                term = term * min(math.exp(float(d["old"][b, t] - d["rollout"][b, t])), tis_cap)
            if kl_coef:
                delta = d["ref"][b, t] - d["logp"][b, t]
                term = term + kl_coef * (torch.exp(delta) - delta - 1)
            seq_sum = seq_sum + term
        loss_tokens = loss_tokens + seq_sum
        total_tokens += len(tokens)
        per_seq.append(seq_sum / len(tokens))
    if agg == "token_mean":
        return loss_tokens / total_tokens
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("tis_cap", [None, 1.5])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_token_ratio_loss_and_gradient(
    rng: torch.Generator, agg: str, tis_cap: float | None, kl_coef: float
) -> None:
    d = random_batch(rng)
    # Move old logprobs close to the current ones so both clipped and unclipped tokens occur.
    d["old"] = torch.where(
        d["mask"],
        d["logp"].detach() + 0.3 * torch.randn(d["mask"].shape, generator=rng, dtype=torch.float64),
        d["old"],
    )
    terms = policy_loss(
        d["logp"],
        d["old"],
        d["adv"],
        d["mask"],
        clip_low=0.2,
        clip_high=0.28,
        loss_agg=agg,
        logp_rollout_BS=d["rollout"] if tis_cap else None,
        tis_cap=tis_cap,
        logp_ref_BS=d["ref"] if kl_coef else None,
        kl_coef=kl_coef,
    )
    (grad,) = torch.autograd.grad(terms.loss, d["logp"])
    want = reference_token_loss(d, low=0.2, high=0.28, agg=agg, tis_cap=tis_cap, kl_coef=kl_coef)
    (want_grad,) = torch.autograd.grad(want, d["logp"])
    assert terms.loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(grad[~d["mask"]] == 0)
    assert (terms.kl_ref is not None) == bool(kl_coef)
    assert (terms.tis_weight_mean is not None) == bool(tis_cap)


def test_clip_fraction_and_ratio_mean_count_tokens(rng: torch.Generator) -> None:
    d = random_batch(rng)
    d["old"] = torch.where(
        d["mask"],
        d["logp"].detach() + 0.5 * torch.randn(d["mask"].shape, generator=rng, dtype=torch.float64),
        d["old"],
    )
    terms = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], clip_low=0.1, clip_high=0.1)
    clipped = ratios = count = 0
    for b in range(d["mask"].shape[0]):
        a = float(d["adv"][b])
        for t in answer_tokens(d["mask"], b):
            r = math.exp(float(d["logp"][b, t].detach() - d["old"][b, t]))
            clipped += (min(max(r, 0.9), 1.1) * a) < (r * a)
            ratios += r
            count += 1
    assert terms.clip_fraction == pytest.approx(clipped / count)
    assert terms.ratio_mean == pytest.approx(ratios / count)


@pytest.mark.parametrize("tis_cap", [None, 1.2])
def test_sequence_ratio_gspo(rng: torch.Generator, tis_cap: float | None) -> None:
    d = random_batch(rng)
    d["old"] = torch.where(
        d["mask"],
        d["logp"].detach() + 0.2 * torch.randn(d["mask"].shape, generator=rng, dtype=torch.float64),
        d["old"],
    )
    terms = policy_loss(
        d["logp"],
        d["old"],
        d["adv"],
        d["mask"],
        ratio="sequence",
        clip_low=0.05,
        clip_high=0.05,
        logp_rollout_BS=d["rollout"] if tis_cap else None,
        tis_cap=tis_cap,
    )
    losses = []
    for b in range(d["mask"].shape[0]):
        tokens = answer_tokens(d["mask"], b)
        s = torch.exp(sum(d["logp"][b, t] - d["old"][b, t] for t in tokens) / len(tokens))
        a = d["adv"][b]
        loss = -torch.minimum(s * a, s.clamp(0.95, 1.05) * a)
        if tis_cap:
            mean_log_w = sum(float(d["old"][b, t] - d["rollout"][b, t]) for t in tokens) / len(
                tokens
            )
            loss = loss * min(math.exp(mean_log_w), tis_cap)
        losses.append(loss)
    want = torch.stack(losses).mean()
    assert terms.loss.item() == pytest.approx(want.item(), rel=1e-9)
    (grad,) = torch.autograd.grad(terms.loss, d["logp"])
    (want_grad,) = torch.autograd.grad(want, d["logp"])
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_on_policy_gradient_is_the_policy_gradient(rng: torch.Generator) -> None:
    # With old = current (ratio 1) the gradient of token_mean is -A / num_tokens per token.
    d = random_batch(rng)
    terms = policy_loss(d["logp"], d["logp"].detach(), d["adv"], d["mask"])
    (grad,) = torch.autograd.grad(terms.loss, d["logp"])
    num_tokens = int(d["mask"].sum())
    want = torch.where(d["mask"], -d["adv"][:, None] / num_tokens, torch.zeros_like(grad))
    torch.testing.assert_close(grad, want)
    assert terms.ratio_mean == pytest.approx(1.0) and terms.clip_fraction == 0.0


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_micro_batches_with_shared_normalizers_sum_to_the_batch_loss(
    rng: torch.Generator, agg: str
) -> None:
    d = random_batch(rng, batch=6)
    full = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg=agg).loss
    num_tokens, num_sequences = float(d["mask"].sum()), 6.0
    parts = [
        policy_loss(
            d["logp"][s],
            d["old"][s],
            d["adv"][s],
            d["mask"][s],
            loss_agg=agg,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        ).loss
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


def test_tis_statistics(rng: torch.Generator) -> None:
    d = random_batch(rng)
    terms = policy_loss(
        d["logp"], d["old"], d["adv"], d["mask"], logp_rollout_BS=d["rollout"], tis_cap=1.5
    )
    weights = [
        math.exp(float(d["old"][b, t] - d["rollout"][b, t]))
        for b in range(d["mask"].shape[0])
        for t in answer_tokens(d["mask"], b)
    ]
    assert terms.tis_weight_mean == pytest.approx(statistics.fmean(min(w, 1.5) for w in weights))
    assert terms.tis_truncated_fraction == pytest.approx(statistics.fmean(w > 1.5 for w in weights))


def test_loss_errors(rng: torch.Generator) -> None:
    d = random_batch(rng)
    args = (d["logp"], d["old"], d["adv"], d["mask"])
    with pytest.raises(ValueError, match="tis_cap: expected it together with logp_rollout_BS"):
        policy_loss(*args, tis_cap=2.0)
    with pytest.raises(ValueError, match="kl_coef: expected > 0 exactly when logp_ref_BS"):
        policy_loss(*args, logp_ref_BS=d["ref"])
    with pytest.raises(ValueError, match=r"logp_old_BS: expected shape \(5, 9\)"):
        policy_loss(d["logp"], d["old"][:, :3], d["adv"], d["mask"])
    with pytest.raises(ValueError, match=r"advantages_B: expected shape \(5,\)"):
        policy_loss(d["logp"], d["old"], d["adv"][:2], d["mask"])
    with pytest.raises(ValueError, match="mask_BS: expected dtype torch.bool"):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"].float())
    empty = d["mask"].clone()
    empty[3] = False
    with pytest.raises(
        ValueError, match="at least one answer token per sequence, got none in sequence 3"
    ):
        policy_loss(d["logp"], d["old"], d["adv"], empty)
    with pytest.raises(ValueError, match="ratio: expected 'token' or 'sequence'"):
        policy_loss(*args, ratio="tokens")  # type: ignore[arg-type]
