"""Training: the GRPO-family loss, sequence packing, tasks and the colocated loop.

``ossrl.train.run(config, environment_factory=..., reward_funcs=[...], tools=[...])`` is
``ossrl train`` from Python (see :func:`ossrl.train.loop.run`).
"""

from .loss import LossConfig, group_advantages, policy_loss

__all__ = ["LossConfig", "group_advantages", "policy_loss", "run"]


def run(*args, **kwargs):
    """``ossrl train`` from Python; see :func:`ossrl.train.loop.run`."""
    from .loop import run as _run

    return _run(*args, **kwargs)
