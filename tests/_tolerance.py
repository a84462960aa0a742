"""Tolerances for tests that compare floating-point results, derived from the computation.

A fixed float32 atol/rtol is tuned to the machine it was chosen on: how far two float32
computations of the same thing drift apart depends on the order of their sums, which changes with
the vector unit (AVX2, AVX-512), the BLAS kernels and the thread count. The tests use instead:

* float64, where the computation runs in float64 (the ossrl ops do on the CPU);
* bounds from the computation's length and magnitudes: ``gamma(n)`` (Higham, Accuracy and
  Stability of Numerical Algorithms, sec. 3.1): a sum of n terms computed in floating point, in
  any order, blocked, vectorised, threaded, with or without FMA, is within
  ``gamma(n) * sum |terms|`` of the exact sum, and a dot product of length n within
  ``gamma(n) * (|x| . |y|)``;
* for long chains (a whole model, a training step), the distance between the float32 run and the
  float64 run of the same computation *on the machine running the test* (``rounding_scale``):
  two float32 computations of one quantity in different orders differ by at most the sum of
  their rounding errors, each of the size that scale measures, so ``|a - b| <= 4 * scale`` holds
  wherever the test runs, and a real bug (a wrong mask, a missing sequence boundary, a lost
  micro-batch: errors of order 1e-1) stays five orders of magnitude above it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# How many float32 ulps (relative to the largest |value|) a float64 run of the GptOss model may
# move by when run in another order. Not float64 rounding: the model rounds a few intermediate
# values to float32 even in float64 (RMSNorm and rotary inputs, the float32 rotary tables), and
# two float64 runs whose inputs to such a cast differ in their last bits can round one of them to
# the neighbouring float32 value; one such flip moves the logits by about one float32 ulp of the
# largest logit (measured: 1.2 ulp). 8 ulps leave room for a few flips.
MODEL_FLOAT64_ULPS = 8


def model_float64_atol(reference) -> float:
    """Absolute tolerance for two float64 runs of the GptOss model (see MODEL_FLOAT64_ULPS)."""
    return MODEL_FLOAT64_ULPS * torch.finfo(torch.float32).eps * max_abs(reference)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u) for the unit roundoff u of dtype."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"gamma({n}) is meaningless in {dtype}")
    return nu / (1 - nu)


def _pairs(a, b, what=""):
    """Yields (name, a_tensor, b_tensor) over tensors, or dicts / lists / tuples of them."""
    if isinstance(a, Mapping):
        assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            yield from _pairs(a[k], b[k], f"{what}[{k!r}]" if what else repr(k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _pairs(x, y, f"{what}[{i}]")
    else:
        yield what, torch.as_tensor(a).detach().double().cpu(), torch.as_tensor(b).detach().double().cpu()


def max_abs(x) -> float:
    if isinstance(x, Mapping):
        return max((max_abs(v) for v in x.values()), default=0.0)
    if isinstance(x, (list, tuple)):
        return max((max_abs(v) for v in x), default=0.0)
    t = torch.as_tensor(x).detach().double()
    return t.abs().max().item() if t.numel() else 0.0


def rounding_scale(*pairs) -> float:
    """max |low - high| over the (low, high) pairs: the same computation in its working precision
    and in float64, each a tensor or a dict / list of tensors. At least one float32 ulp of the
    largest |high|, so that a lucky exact run cannot make a test demand bit equality."""
    scale = 0.0
    for low, high in pairs:
        for _, lo, hi in _pairs(low, high):
            if lo.numel():
                scale = max(scale, (lo - hi).abs().max().item(), torch.finfo(torch.float32).eps * hi.abs().max().item())
    return scale


def assert_within(actual, expected, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise, computed in float64. actual and expected: tensors,
    or dicts / lists of them with the same structure; bound: a number, a tensor broadcasting
    against the values, or (for dicts) a dict of those. Non-finite values must match exactly."""
    if isinstance(actual, Mapping):
        assert set(actual) == set(expected), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
        for k in actual:
            assert_within(actual[k], expected[k], bound[k] if isinstance(bound, Mapping) else bound,
                          f"{what}[{k!r}]" if what else repr(k))
        return
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_within(a, e, bound, f"{what}[{i}]")
        return
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    b = torch.as_tensor(bound).detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    fin = torch.isfinite(e)
    same = (a[~fin] == e[~fin]) | (torch.isnan(a[~fin]) & torch.isnan(e[~fin]))
    assert bool(same.all()), f"{what or 'value'}: non-finite values differ"
    err = torch.where(fin, (a - e).abs(), torch.zeros_like(a))
    b = b.expand_as(err)
    bad = ~(err <= b)  # NaN in actual where expected is finite: out of bounds
    if bad.any():
        ratio = torch.where(bad, torch.where(torch.isnan(err), torch.inf, err / b), torch.zeros_like(err))
        i = int(torch.argmax(ratio.reshape(-1)))
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what or 'value'}: {int(bad.sum())} of {err.numel()} elements out of bounds; worst at {idx}: "
            f"|{a.reshape(-1)[i].item():.9g} - {e.reshape(-1)[i].item():.9g}| = {err.reshape(-1)[i].item():.3g} "
            f"> {b.reshape(-1)[i].item():.3g} (largest error {err.max().item():.3g})")
