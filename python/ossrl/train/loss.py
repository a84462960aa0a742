"""The GRPO-family objective with a correction for rollout/training mismatch.

Follows the public literature (see DESIGN.md, "The loss"):
- group-relative advantages per trajectory, A_i = (r_i - mean_g r) / (std_g r + eps); Dr. GRPO
  drops the division (``scale="none"``);
- token-level PPO clip on ratio = exp(logp_new - logp_old), with asymmetric bounds (DAPO's
  "clip higher"), aggregated over all loss tokens of the batch rather than per sequence;
- truncated importance sampling: each token's loss is multiplied by the detached
  w = min(exp(logp_old - logp_rollout), C), because the rollout engine's log-probs differ
  from the trainer's (other kernels, stale weights, paused-and-resumed trajectories);
- an optional KL penalty to a reference policy (the k3 estimator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """Advantages for rewards laid out as consecutive groups of ``group_size`` samples per prompt.

    scale="std" is GRPO; scale="none" is Dr. GRPO (mean-centred only).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    r = rewards.double().view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        std = r.std(dim=1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        a = a / (std + eps)
    return a.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def signal_groups(rewards: list[float], group_size: int) -> list[int]:
    """Indices of the groups whose rewards are not all equal: the others have every advantage
    0 and teach the policy nothing (DAPO's dynamic sampling filters them out)."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {group_size}")
    groups = (rewards[k:k + group_size] for k in range(0, len(rewards), group_size))
    return [g for g, r in enumerate(groups) if max(r) > min(r)]


@dataclass
class LossConfig:
    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.28  # ratio upper bound 1 + clip_high (DAPO clip-higher)
    tis_cap: float = 2.0  # C in w = min(exp(logp_old - logp_rollout), C); <= 0 disables
    kl_coef: float = 0.05  # weight of the k3 KL estimate to the reference policy (the post-warm-up one)


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    logp_rollout: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig = LossConfig(),
    logp_ref: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped policy-gradient loss with truncated importance sampling.

    All tensors are per token, same shape: logp_new (differentiable), logp_old (the trainer's
    log-probs before the first update), logp_rollout (what the sampler reported), advantages
    (the trajectory's advantage on each of its tokens), mask (1 where the policy generated the
    token; prompt and tool-result tokens are 0). Returns the loss (mean over loss tokens) and
    detached statistics: tis_weight_mean, tis_truncated_frac, clip_frac, kl, mismatch_kl (k3 estimate
    of KL(rollout || trainer) over the sampled tokens, from logp_old), logprob_gap_max (the largest
    |logp_old - logp_rollout| of a sampled token), loss_tokens.
    """
    shapes = {t.shape for t in (logp_new, logp_old, logp_rollout, advantages, mask)}
    if len(shapes) != 1:
        raise ValueError(f"policy_loss: all per-token tensors must share one shape, got {sorted(map(tuple, shapes))}")
    m = mask.to(logp_new.dtype)
    n = m.sum().clamp(min=1)
    old, adv = logp_old.detach(), advantages.detach()
    ratio = torch.exp(logp_new - old)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv
    pg = -torch.minimum(unclipped, clipped)

    with torch.no_grad():
        if cfg.tis_cap > 0:
            raw = torch.exp(old - logp_rollout.detach())
            w = raw.clamp(max=cfg.tis_cap)
            truncated = ((raw > cfg.tis_cap).to(m.dtype) * m).sum() / n
        else:
            w, truncated = torch.ones_like(pg), torch.zeros(())
        clip_frac = ((unclipped != clipped).to(m.dtype) * m).sum() / n
        # rollout/training mismatch of the sampled tokens, before the update: k3 estimate of
        # KL(rollout || trainer) (samples come from the rollout; r = p_trainer / p_rollout)
        gap = (old - logp_rollout.detach()) * m
        # k3 >= 0 exactly; for tiny gaps expm1(g) - g can round just below 0: clamp per token
        mismatch = ((torch.expm1(gap) - gap).clamp(min=0) * m).sum() / n
        gap_max = gap.abs().max() if gap.numel() else torch.zeros(())

    per_token = w * pg
    kl_mean = torch.zeros((), dtype=logp_new.dtype, device=logp_new.device)
    if cfg.kl_coef and logp_ref is not None:
        d = logp_ref.detach() - logp_new
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative estimate of KL(new || ref)
        per_token = per_token + cfg.kl_coef * kl
        kl_mean = (kl.detach() * m).sum() / n
    loss = (per_token * m).sum() / n
    stats = {
        "tis_weight_mean": float((w * m).sum() / n),
        "tis_truncated_frac": float(truncated),
        "clip_frac": float(clip_frac),
        "kl": float(kl_mean),
        "mismatch_kl": float(mismatch),
        "logprob_gap_max": float(gap_max),
        "loss_tokens": float(m.sum()),
    }
    return loss, stats
