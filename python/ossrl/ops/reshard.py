"""Fused multi-tensor copy for weight resharding."""
