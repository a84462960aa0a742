"""The ``python_session`` tool's interpreter: one sandboxed process kept across an episode's calls.

A session is a warm-pool child (``sandbox_pool.py``) in session mode: the same layers, limits and
directory as a one-shot call, applied once when the session starts; then it runs cells like a
notebook, its globals and its working directory kept from one cell to the next. Cells go over a
socket on its fd 3 (a length, then the code); each is answered there by the cell's exit status
once its output is flushed, so stdout and stderr are read per cell exactly as for a one-shot call.
``cpu_seconds`` bounds the whole session (RLIMIT_CPU counts the process). A session takes no
sandbox slot (``max_sandboxes``): there is one per episode, alive between its calls.

A cell that times out, floods its output or kills the process ends the session: the result says
so, and the next call starts a fresh interpreter (its result begins with a note that the state is
gone). :meth:`SandboxSession.close` (the episode ended or was paused) kills the process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time

from .sandbox_pool import PoolError, _CallIO, _pipes, start_child
from .sandbox_paths import _rmtree
from .tool_result import BAD_ARGUMENTS, SANDBOX_ERROR, ToolResult, code_bytes

_NEW_STATE = "[a new session: the interpreter of the earlier calls has ended, its variables and files are gone]\n"


class _Live:
    """A running session process, seen from the trainer."""

    def __init__(self, zygote, cid, pending, io, sock, tmp):
        self.zygote, self.cid, self.pending, self.io, self.sock, self.tmp = zygote, cid, pending, io, sock, tmp
        self.status: dict | None = None  # the layers it reported, from its first output
        self.reply = bytearray()
        self.answered: asyncio.Future | None = None


class SandboxSession:
    """A stateful sandboxed interpreter (see the module docstring). Calls are serialised."""

    def __init__(self, config, *, name: str = "python_session"):
        self.config, self.name = config, name
        self.started = 0  # processes started over the session's life
        self._live: _Live | None = None
        self._guard = threading.Lock()  # close() may come from another thread than the calls
        self._lock: tuple | None = None  # (its event loop, the lock that serialises calls)

    async def run(self, code: str, timeout: float, max_output_chars: int) -> ToolResult:
        from .sandbox import _MARKER, _classify

        cfg = self.config
        t0 = time.monotonic()

        def result(ok: bool, content: str, error: str | None) -> ToolResult:
            return ToolResult(self.name, ok, content, error, time.monotonic() - t0)

        data, why = code_bytes(code, cfg.max_code_bytes)
        if data is None:
            return result(False, why, BAD_ARGUMENTS)
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        async with self._lock[1]:
            t0 = time.monotonic()
            note = ""
            live = self._live
            if live is not None and live.io.loop is not loop:  # it belongs to another event loop
                self._forget(live)
                live = None
            if live is None or live.pending.exited.done():
                note = _NEW_STATE if self.started else ""
                try:
                    live = await self._start(loop)
                except (PoolError, OSError) as e:
                    return result(False, f"Error: the sandbox pool could not start a session: {type(e).__name__}: {e}",
                                  SANDBOX_ERROR)
            live.io.limit(max_output_chars)
            live.answered = loop.create_future()
            send = asyncio.ensure_future(loop.sock_sendall(live.sock, struct.pack("<I", len(data)) + data))
            send.add_done_callback(lambda f: f.cancelled() or f.exception())  # it exited: its status says why
            done, _ = await asyncio.wait({live.answered, live.pending.exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            send.cancel()
            timed_out = not done
            ended = timed_out or live.io.overflow or not live.answered.done()
            if ended:
                live.zygote.kill(live.cid)
                await asyncio.wait({live.pending.exited}, timeout=5.0)
                await asyncio.wait({live.io.eof}, timeout=1.0)
            live.io.drain()
            out, err = live.io.take()
            if live.status is None and err.startswith(_MARKER):
                line, _, err = err.partition(b"\n")
                live.status = json.loads(line[len(_MARKER):])
            if live.answered.done():
                rc = live.answered.result()
            else:
                rc = live.pending.exited.result() if live.pending.exited.done() else None
            if rc is None and not timed_out:
                why = live.pending.error or "the sandbox zygote exited during the call"
                return result(False, note + f"Error: {why}.", SANDBOX_ERROR)
            r = _classify(rc, out, err, timed_out, live.io.overflow, timeout, max_output_chars, cfg, result,
                          status=live.status or {})
            if note:
                r = ToolResult(r.name, r.ok, note + r.content, r.error, r.seconds)
            return r

    async def _start(self, loop) -> _Live:
        (r_in, w_in), (r_out, w_out), (r_err, w_err) = _pipes(3)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (r_in, w_out, w_err, theirs.fileno())
        try:
            z, cid, pending, tmp = await start_child(loop, self.config, list(fds), list(self.config.require), True)
        except BaseException:
            for fd in (w_in, r_out, r_err):
                os.close(fd)
            ours.close()
            raise
        finally:
            for fd in (r_in, w_out, w_err):
                os.close(fd)
            theirs.close()
        io = _CallIO(loop, w_in, r_out, r_err, 0, lambda: z.kill(cid))
        io.feed(b"")  # its stdin is empty: input() gets EOFError, as in a one-shot call
        live = _Live(z, cid, pending, io, ours, tmp)
        ours.setblocking(False)
        loop.add_reader(ours.fileno(), self._on_reply, live)
        with self._guard:
            self._live = live
        self.started += 1
        pending.exited.add_done_callback(lambda _: self._cleanup(live))
        return live

    def _on_reply(self, live: _Live) -> None:
        try:
            chunk = live.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            live.io.loop.remove_reader(live.sock.fileno())
            return
        live.reply += chunk
        while len(live.reply) >= 4:
            (status,) = struct.unpack("<i", bytes(live.reply[:4]))
            del live.reply[:4]
            if live.answered is not None and not live.answered.done():
                live.answered.set_result(status)

    def _cleanup(self, live: _Live) -> None:  # on the session's loop, once the process has exited
        if live.sock.fileno() >= 0:
            live.io.loop.remove_reader(live.sock.fileno())
        self._release(live)

    def _forget(self, live: _Live) -> None:  # its loop is gone: kill it, close its ends here
        live.zygote.kill(live.cid)
        self._release(live)

    def _release(self, live: _Live) -> None:
        live.sock.close()
        live.io.close()
        if live.tmp != live.zygote.work:
            _rmtree(live.tmp)
        with self._guard:
            if self._live is live:
                self._live = None

    def close(self) -> None:
        """Kills the session's process (its state is gone); from any thread. The next call starts anew."""
        with self._guard:
            live, self._live = self._live, None
        if live is not None and live.io.loop.is_closed():
            self._forget(live)
        elif live is not None:
            live.zygote.kill(live.cid)  # its exit cleans up after it, on its loop
