"""The GRPO-family loss against hand-computed float64 values."""

import math

import pytest
import torch

from ossrl.train import LossConfig, group_advantages, policy_loss


def test_group_advantages_grpo_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    a = group_advantages(r, 2, eps=0.0)
    # groups (1,0) (0,1) (2,2): mean 0.5, 0.5, 2; population std 0.5, 0.5, 0 -> (2.0 - 2) / 0 guarded
    torch.testing.assert_close(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(a[4:]).all()  # eps=0 on a constant group: the caller chose no guard
    torch.testing.assert_close(group_advantages(r, 2)[4:], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(r, 3, scale="none"), r - torch.tensor([1 / 3] * 3 + [5 / 3] * 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 2, scale="max")


def hand_loss(new, old, roll, adv, mask, clip_low, clip_high, cap):
    total, n, truncated = 0.0, 0, 0
    for ln, lo, lr, a, m in zip(new, old, roll, adv, mask):
        if not m:
            continue
        ratio = math.exp(ln - lo)
        obj = min(ratio * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a)
        raw = math.exp(lo - lr)
        truncated += raw > cap
        total += min(raw, cap) * -obj
        n += 1
    return total / n, truncated / n


def test_policy_loss_matches_hand_computation():
    new = [-1.0, -0.5, -2.0, -0.1, -3.0, -0.7]
    old = [-1.2, -0.4, -1.0, -0.1, -1.0, -0.9]
    roll = [-1.1, -2.0, -1.0, -0.3, -1.5, -0.9]
    adv = [1.0, 1.0, -1.0, 0.5, -2.0, 0.3]
    mask = [1, 1, 1, 0, 1, 1]  # one context token carries no loss
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, tis_cap=2.0)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    ln = t(new).requires_grad_()
    loss, stats = policy_loss(ln, t(old), t(roll), t(adv), t(mask), cfg)
    ref, trunc = hand_loss(new, old, roll, adv, mask, 0.2, 0.28, 2.0)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    assert stats["tis_truncated_frac"] == pytest.approx(trunc)
    assert stats["tis_truncated_frac"] > 0  # token 2 has exp(1.6) > 2
    assert stats["loss_tokens"] == 5
    # gradient: only unclipped, masked-in tokens move, scaled by w * A * ratio / n
    (g,) = torch.autograd.grad(loss, ln)
    assert g[3] == 0
    eps = 1e-6
    for i in range(6):
        bumped = list(new)
        bumped[i] += eps
        fd = (hand_loss(bumped, old, roll, adv, mask, 0.2, 0.28, 2.0)[0] - ref) / eps
        assert g[i].item() == pytest.approx(fd, abs=1e-5)


def test_tis_disabled_and_kl():
    n = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    same = n.detach().clone()
    loss, stats = policy_loss(n, same, same - 5, torch.ones(2, dtype=torch.float64), torch.ones(2), LossConfig(tis_cap=0))
    assert loss.item() == pytest.approx(-1.0)  # ratio 1, advantage 1, no weight
    assert stats["tis_weight_mean"] == 1.0
    ref = torch.tensor([-1.5, -2.0], dtype=torch.float64)
    loss, stats = policy_loss(n, same, same, torch.zeros(2, dtype=torch.float64), torch.ones(2), LossConfig(kl_coef=0.1), logp_ref=ref)
    k3 = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2
    assert stats["kl"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)


def test_policy_loss_shape_mismatch():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="share one shape"):
        policy_loss(a, a, a, a, torch.zeros(4))


def test_signal_groups_keeps_groups_with_unequal_rewards():
    from ossrl.train.loss import signal_groups

    rewards = [1, 1, 0, 0] + [0, 0, 0, 0] + [1, 1, 1, 1] + [0.5] * 4 + [0, 1, 0, 0]
    assert signal_groups(rewards, 4) == [0, 4]
    assert signal_groups([], 4) == []
    # the groups it drops are exactly those with every advantage 0
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4).view(-1, 4)
    assert [g for g in range(5) if adv[g].abs().max() > 0] == [0, 4]
    with pytest.raises(ValueError, match="whole groups"):
        signal_groups([1, 0, 1], 2)


def test_mismatch_metrics_equal_a_direct_float64_computation():
    """mismatch_kl: the k3 estimate of KL(rollout || trainer) over the sampled tokens (samples
    come from the rollout, r = p_trainer / p_rollout); logprob_gap_max: the largest |gap|."""
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(40, generator=g, dtype=torch.float64) * 3
    rollout = old + torch.randn(40, generator=g, dtype=torch.float64) * 0.2
    mask = (torch.rand(40, generator=g) < 0.7).double()
    mask[5] = 0
    rollout[5] = old[5] + 9.0  # a huge gap on a token that is not sampled: ignored
    _, st = policy_loss(old.clone().requires_grad_(), old, rollout, torch.ones(40, dtype=torch.float64), mask)
    sel = mask.bool()
    r = torch.exp(old[sel] - rollout[sel])
    want = float((r - 1 - torch.log(r)).mean())
    assert st["mismatch_kl"] == pytest.approx(want, rel=1e-12) and st["mismatch_kl"] >= 0
    assert st["logprob_gap_max"] == pytest.approx(float((old[sel] - rollout[sel]).abs().max()), rel=1e-12)
    _, same = policy_loss(old.clone().requires_grad_(), old, old, torch.ones(40, dtype=torch.float64), mask)
    assert same["mismatch_kl"] == 0.0 and same["logprob_gap_max"] == 0.0  # no mismatch at all
