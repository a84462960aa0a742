"""Training: the GRPO-family loss, sequence packing and the colocated loop."""

from .loss import LossConfig, group_advantages, policy_loss

__all__ = ["LossConfig", "group_advantages", "policy_loss"]
