"""Fused multi-tensor copy for weight resharding.

Kernels: csrc/cpu/reshard.cpp and csrc/cuda/reshard.cu; schema: csrc/ops.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.ossrl


def multi_tensor_copy_(dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> None:
    """``dsts[i].copy_(srcs[i])`` for every i, in one fused pass (one kernel launch on CUDA).

    Shapes must be equal pair by pair (no broadcasting) and every tensor must be on one device.
    The dtypes of a pair may differ when both are float32, float16, bfloat16 or float64 (the
    cast rounds as ``Tensor.copy_`` does); otherwise they must match (any dtype, copied bitwise).
    Destinations and sources may be strided views: transposed, sliced, or interleaved such as
    ``w[..., ::2]``. Destinations must not overlap each other (the even and odd columns of one
    tensor are fine: overlap is decided exactly), and a destination may share memory with a
    source only when the pair is identical, in which case nothing is written. Everything is
    checked before anything is written: a ``RuntimeError`` names the offending index.

    Destinations keep their storage; nothing is allocated on the CPU, and on CUDA only the
    small per-tensor descriptor table. Not differentiable (call it under ``torch.no_grad()``
    when destinations require grad).
    """
    dsts = list(dsts)
    srcs = list(srcs)
    if not dsts and not srcs:
        return
    _ops.multi_tensor_copy_(dsts, srcs)


# ---- fake (meta) kernel: a mutating op with no outputs ----


@torch.library.register_fake("ossrl::multi_tensor_copy_")
def _(dsts, srcs):
    torch._check(
        len(dsts) == len(srcs),
        lambda: f"ossrl.multi_tensor_copy_: got {len(dsts)} destinations but {len(srcs)} sources",
    )
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        torch._check(
            d.shape == s.shape,
            lambda: f"ossrl.multi_tensor_copy_: dsts[{i}] has shape {tuple(d.shape)} but srcs[{i}] "
            f"has shape {tuple(s.shape)} (no broadcasting)",
        )
    return None
