"""The rollout engine on a thread of its own, serving requests from any event loop.

Every request becomes one engine sequence; all of them share the engine's continuous batching
(one packed forward pass per step over every running sequence). Sampled tokens go back to the
request's asyncio queue after each step, so streaming costs nothing extra. A finished sequence's
KV cache is kept (up to ``prefix_cache`` of them, least recently used dropped first): a later
request whose prompt extends that sequence's tokens (a conversation that goes on after a tool
result) resumes it instead of recomputing the prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..rollout.engine import Engine, Resume, SamplingParams

__all__ = ["EngineRunner", "Overloaded", "Request"]


class Overloaded(RuntimeError):
    """More requests than the server queues: the caller answers 429."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: int = 0
    seq: object = None
    sent: int = 0
    reused: int = 0  # prompt tokens served from a kept cache
    done: bool = False
    cancelled: bool = False
    tags: dict = field(default_factory=dict)


class EngineRunner:
    """Owns ``engine``: only this thread calls it. ``submit`` from any event loop; events on the
    request's queue: ``("tokens", ids, logprobs, top_logprobs)`` then ``("done", finish_reason)``
    (or ``("error", message)``)."""

    def __init__(self, engine: Engine, *, max_requests: int = 512, prefix_cache: int = 64):
        self.engine = engine
        self.max_requests = max_requests
        self.prefix_cache = prefix_cache
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, Request] = {}
        self._kept: OrderedDict[int, list[int]] = OrderedDict()  # engine handle -> its tokens
        self._ids = itertools.count(1)
        self._count_lock = threading.Lock()
        self._pending = 0  # submitted and not finished (the bound for 429)
        self._stop = threading.Event()
        self.stats = {"requests": 0, "prompt_tokens": 0, "reused_tokens": 0}
        self.thread = threading.Thread(target=self._run, name="ossrl-engine", daemon=True)
        self.thread.start()

    # ---- any thread ----

    def submit(self, prompt: list[int], params: SamplingParams, *, seed: int | None = None) -> Request:
        loop = asyncio.get_running_loop()
        with self._count_lock:
            if self._pending >= self.max_requests:
                raise Overloaded(f"the server is at its limit of {self.max_requests} requests in flight")
            self._pending += 1
        req = Request(list(prompt), params, seed, loop, asyncio.Queue(), id=next(self._ids))
        self._inbox.put(("add", req))
        return req

    def cancel(self, req: Request) -> None:
        if not req.done:
            req.cancelled = True
            self._inbox.put(("cancel", req))

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self.thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._pending

    # ---- the engine thread ----

    def _emit(self, req: Request, event: tuple) -> None:
        try:
            req.loop.call_soon_threadsafe(req.events.put_nowait, event)
        except RuntimeError:  # its event loop is gone (the client's server shut down)
            pass

    def _finish(self, req: Request, event: tuple) -> None:
        if req.done:
            return
        req.done = True
        self._active.pop(req.id, None)
        with self._count_lock:
            self._pending -= 1
        self._emit(req, event)

    def _add(self, req: Request) -> None:
        if req.cancelled:
            return self._finish(req, ("done", "cancelled"))
        handle, n = self._longest_kept_prefix(req.prompt)
        try:
            if handle is not None:
                del self._kept[handle]
                req.seq = self.engine.add_request(Resume(handle, req.prompt[n:]), req.params, keep=True, seed=req.seed)
                req.reused = n
            else:
                req.seq = self.engine.add_request(req.prompt, req.params, keep=True, seed=req.seed)
        except ValueError as e:
            return self._finish(req, ("error", str(e)))
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["reused_tokens"] += req.reused
        self._active[req.id] = req

    def _longest_kept_prefix(self, prompt: list[int]) -> tuple[int | None, int]:
        best, n = None, 0
        for handle, toks in self._kept.items():
            if n < len(toks) <= len(prompt) and prompt[: len(toks)] == toks:
                best, n = handle, len(toks)
        return best, n

    def _keep(self, req: Request) -> None:
        out = req.seq.out
        if out.handle is None:
            return
        self._kept[out.handle] = req.prompt + out.tokens
        self._kept.move_to_end(out.handle)
        while len(self._kept) > self.prefix_cache:
            old, _ = self._kept.popitem(last=False)
            self.engine.release(old)

    def _cancel(self, req: Request) -> None:
        if req.done:
            return
        if req.seq is not None:
            try:
                self.engine.abort(req.seq)
            except ValueError:  # it finished in the meantime
                pass
        self._finish(req, ("done", "cancelled"))

    def _push_tokens(self, req: Request) -> None:
        out = req.seq.out
        if len(out.tokens) > req.sent:
            a = req.sent
            tops = out.top_logprobs[a:] if out.top_logprobs else None
            self._emit(req, ("tokens", out.tokens[a:], out.logprobs[a:], tops))
            req.sent = len(out.tokens)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, req = item
            if kind == "add":
                self._add(req)
            elif kind == "cancel":
                self._cancel(req)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain(block=not eng.has_unfinished())
            if not eng.has_unfinished():
                continue
            try:
                if not eng.can_step():
                    continue
                finished = eng.step()
            except Exception as e:  # noqa: BLE001 - the engine failed: fail what runs, start clean
                for req in list(self._active.values()):
                    self._finish(req, ("error", f"engine failure: {type(e).__name__}: {e}"))
                eng.reset()
                self._kept.clear()
                continue
            done = {id(s) for s in finished}
            for req in list(self._active.values()):
                self._push_tokens(req)
                if id(req.seq) in done:
                    self._keep(req)
                    self._finish(req, ("done", req.seq.out.finish_reason))
        for req in list(self._active.values()):  # shutting down: cancel what is left
            self._cancel(req)
