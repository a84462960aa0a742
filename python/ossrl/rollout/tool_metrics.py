"""This process's tool-call metrics, read once per training step.

Every :meth:`ToolRegistry.call` records its latency (queue included), and every sandboxed call
the time it waited for a sandbox slot (``tool_sandboxes_peak``: one-shot sandboxes running at
once); :func:`tool_step_metrics` returns the step's percentiles,
calls per second and the warm pool's size, and starts the next window::

    {"tool_latency_p50_s": ..., "tool_latency_p99_s": ..., "tool_queue_wait_p50_s": ...,
     "tool_queue_wait_p99_s": ..., "tool_calls_per_s": ..., "tool_sandboxes_peak": ...,
     "tool_pool_zygotes": ..., "tool_pool_rss_bytes": ...}

Percentiles are None in a step without calls.
"""

from __future__ import annotations

import threading
import time

__all__ = ["tool_step_metrics", "record_call", "record_queue_wait", "sandbox_started", "sandbox_ended"]

_lock = threading.Lock()
_latency: list[float] = []
_wait: list[float] = []
_span = [None, None]  # first call's start, last call's end, in this window
_running = [0, 0]  # sandboxes running now, most at once in this window


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def record_call(seconds: float) -> None:
    now = time.monotonic()
    with _lock:
        _latency.append(seconds)
        start = now - seconds
        _span[0] = start if _span[0] is None else min(_span[0], start)
        _span[1] = now


def record_queue_wait(seconds: float) -> None:
    with _lock:
        _wait.append(seconds)


def sandbox_started() -> None:
    with _lock:
        _running[0] += 1
        _running[1] = max(_running[1], _running[0])


def sandbox_ended() -> None:
    with _lock:
        _running[0] -= 1


def tool_step_metrics(reset: bool = True) -> dict:
    from .sandbox_pool import pool_stats

    with _lock:
        lat, wait, (t0, t1), peak = list(_latency), list(_wait), tuple(_span), _running[1]
        if reset:
            _latency.clear()
            _wait.clear()
            _span[:] = [None, None]
            _running[1] = _running[0]
    pool = pool_stats()
    return {
        "tool_latency_p50_s": _percentile(lat, 0.50),
        "tool_latency_p99_s": _percentile(lat, 0.99),
        "tool_queue_wait_p50_s": _percentile(wait, 0.50),
        "tool_queue_wait_p99_s": _percentile(wait, 0.99),
        # calls over the time from the first call's start to the last one's end
        "tool_calls_per_s": len(lat) / (t1 - t0) if lat and t1 > t0 else 0.0,
        "tool_sandboxes_peak": peak,
        "tool_pool_zygotes": pool["zygotes"],
        "tool_pool_rss_bytes": pool["zygote_rss_bytes"],
    }
