"""``tool_backend = "ray"``: the sandboxed ``python`` tool on Ray workers (``pip install ossrl[ray]``).

Each worker is a Ray actor holding a :class:`~ossrl.rollout.tools.ToolRegistry` with the
``python`` tool, so a call there runs in the same warm-pool sandbox, with the same layers, limits,
timeout and error kinds as a local one (the result is the worker's :class:`ToolResult`). The
registry that owns the backend validates the arguments first, so a bad call never leaves the
trainer. A worker that dies mid-call (killed, its node lost) gives the call one retry on another
worker; a second failure is a ``sandbox_error`` result. A worker that does not answer within the
call's timeout plus ``grace_s`` gives a ``timeout`` result. ``python_session`` stays local: its
interpreter belongs to the episode's process.

    backend = RayToolBackend(address="127.0.0.1:6379", workers=4)   # None: a local cluster
    registry = ToolRegistry(backend=backend)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

from .sandbox import SandboxConfig
from .tool_result import SANDBOX_ERROR, TIMEOUT, ToolResult

__all__ = ["RayToolBackend"]


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("tool_backend = 'ray' needs ray: pip install 'ossrl[ray]'") from e
    return ray


class _Worker:
    """One Ray actor: a registry with the sandboxed python tool (its own warm pool)."""

    def __init__(self, sandbox: SandboxConfig, max_output_chars: int, max_sandboxes: int | None):
        from .tools import ToolRegistry

        self.registry = ToolRegistry(builtins=["python"], sandbox=sandbox, max_output_chars=max_output_chars,
                                     max_sandboxes=max_sandboxes)

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        from .sandbox_pool import _stop_all

        _stop_all()

    async def call(self, name: str, arguments, timeout: float) -> ToolResult:
        return await self.registry.call(name, arguments, timeout=timeout)


class RayToolBackend:
    """Tool calls on ``workers`` Ray actors (default: one per CPU of the cluster, at most 8)."""

    def __init__(self, *, address: str | None = None, sandbox: SandboxConfig | None = None, workers: int | None = None,
                 max_output_chars: int = 16_000, max_sandboxes: int | None = None, grace_s: float = 30.0):
        ray = _ray()
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        n = workers or max(1, min(8, int(ray.cluster_resources().get("CPU", 1))))
        actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1024)(_Worker)
        self.workers = [actor.remote(sandbox or SandboxConfig(), int(max_output_chars), max_sandboxes)
                        for _ in range(n)]
        self.grace_s = float(grace_s)
        self.retries = 0  # calls retried on another worker after theirs died
        self._next = itertools.count()

    async def call(self, name: str, arguments, timeout: float) -> ToolResult:
        ray = self._ray
        t0 = time.monotonic()
        first = next(self._next) % len(self.workers)
        why = ""
        for attempt in range(2):
            worker = self.workers[(first + attempt) % len(self.workers)]
            ref = worker.call.remote(name, arguments, timeout)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout + self.grace_s)
            except asyncio.TimeoutError:
                ray.cancel(ref, force=True)
                return ToolResult(name, False, f"Error: the Ray worker did not answer within the {timeout:g} s time "
                                  "limit and was stopped.", TIMEOUT, time.monotonic() - t0)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ActorUnavailableError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if attempt == 0:
                    self.retries += 1
        return ToolResult(name, False, f"Error: the Ray worker running the call died, twice ({why}).", SANDBOX_ERROR,
                          time.monotonic() - t0)

    async def worker_pids(self) -> list[int]:
        return [await asyncio.wrap_future(w.pid.remote().future()) for w in self.workers]

    def close(self) -> None:
        """Stops the workers' zygotes, then the workers."""
        try:
            self._ray.get([w.stop.remote() for w in self.workers], timeout=30)
        except Exception:  # noqa: BLE001 - a dead worker's zygote has stopped with it
            pass
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []
