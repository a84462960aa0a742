"""Rows of one kernel family or the other (ossrl.ops.moe_kernels), for side-by-side benchmarks."""

import torch

from ossrl import _C
from ossrl.ops import moe_kernels


def cutlass_available(device: str) -> bool:
    """The CUTLASS sm90 kernels can run here: an sm_90 GPU and a build that has them."""
    return device == "cuda" and _C.with_sm90_gemm and torch.cuda.get_device_capability()[0] == 9


def with_kernels(name: str, fn):
    """fn, called inside moe_kernels(name)."""
    def run(*args, **kwargs):
        with moe_kernels(name):
            return fn(*args, **kwargs)
    return run
