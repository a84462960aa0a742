"""The floor of an op on this machine: its flops over the measured matmul rate, or its bytes over
the measured copy bandwidth, whichever is longer. Both rates are measured here, in this process,
with torch's own matmul and copy on the same device and dtype, so "time over floor" says how far
a kernel is from what this machine's libraries reach, not from a datasheet."""

import functools
import statistics
import time

import torch


def median_seconds(fn, device, repeat=10, warmup=1):
    """The median wall time of fn() over `repeat` calls, synchronising the GPU around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def rates(device: str, dtype: torch.dtype):
    """(matmul flop/s, copy bytes/s): an n x n x n matmul and a copy of a large buffer."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3 / median_seconds(lambda: a @ b, device)
    src = torch.empty(1 << (28 if device == "cuda" else 25), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / median_seconds(lambda: dst.copy_(src), device)  # read + write
    return flops, bandwidth


def floor_seconds(flops: float, nbytes: float, device: str, dtype: torch.dtype) -> float:
    peak, bandwidth = rates(device, dtype)
    return max(flops / peak, nbytes / bandwidth)
