"""Running ossrl's ops on one kernel family or the other (OSSRL_MOE_GEMM), for side-by-side rows."""

import contextlib
import os

import torch

from ossrl import _C


@contextlib.contextmanager
def kernels(name: str):
    """OSSRL_MOE_GEMM=name inside the block ("mma", the default, or "cutlass"); restored after."""
    old = os.environ.get("OSSRL_MOE_GEMM")
    os.environ["OSSRL_MOE_GEMM"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["OSSRL_MOE_GEMM"]
        else:
            os.environ["OSSRL_MOE_GEMM"] = old


def cutlass_available(device: str) -> bool:
    """The CUTLASS sm90 kernels can run here: an sm_90 GPU and a build that has them."""
    return device == "cuda" and _C.with_sm90_gemm and torch.cuda.get_device_capability()[0] == 9


def with_kernels(name: str, fn):
    """fn, called with OSSRL_MOE_GEMM=name."""
    def run(*args, **kwargs):
        with kernels(name):
            return fn(*args, **kwargs)
    return run
