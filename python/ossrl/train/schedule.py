"""Learning-rate schedules of the warm-up and RL phases."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def scheduled_lr(peak: float, i: int, n: int, cfg: TrainConfig, warmup: int) -> float:
    """The learning rate of step i (1-based) of a phase of n steps: linear warm-up over ``warmup``
    steps, then cosine decay to ``cfg.min_lr_ratio * peak`` at step n (``lr_schedule="constant"``:
    no decay). A function of the step alone, so a resumed run continues on the same curve."""
    if warmup and i <= warmup:
        return peak * i / warmup
    if cfg.lr_schedule == "constant" or n <= warmup:
        return peak
    progress = min(max((i - warmup) / (n - warmup), 0.0), 1.0)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
