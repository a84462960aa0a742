"""Warm sandboxes: one small zygote per sandbox configuration forks a child per call.

A fresh sandboxed interpreter costs an interpreter start, its imports and the namespace set-up
(about 57 ms of CPU per call). The zygote (``sandbox_zygote.py``, run with the same ``python -I
-S`` as the one-shot bootstrap and nothing heavy imported: no torch, no site-packages) pays those
once: it creates the namespaces, makes the tree read-only and hides the installed packages, then
forks. Each child finishes the lock-down itself (a mount namespace of its own, and a network
namespace of its own where seccomp does not hold (with seccomp no call can open a socket, and the
zygote's empty one is shared), a fresh tmpfs working directory, Landlock, an unused uid,
rlimits, seccomp, the audit hook) before
the model's code runs, runs that one program, and exits. Every layer of :mod:`.sandbox`'s threat
model holds for it as for a fresh process, and ``probe_sandbox`` asks a pool child when the pool
is on. Nothing is shared between calls: the model's code never runs in the zygote, and a child
holds only its own pipes (fds 0-2; fd 3 for a session).

A child's memory starts as a copy of the zygote's: the interpreter, the standard-library modules
it imported (ctypes among them, removed from ``sys.modules`` before the code runs, as in a fresh
sandbox) and the configuration. Nothing of the trainer is in it (the zygote is a new ``python
-I -S`` process, not a fork of the trainer) and nothing of other calls (the zygote runs none;
it only knows their ids and pids). The zygote keeps the privileges it needs to create a child's
namespaces and mounts (as root: root's; otherwise those of its user namespace); a child has lost
them before the model's code runs, like a fresh sandbox after its set-up.

The trainer side is thread- and loop-agnostic: a zygote is a process-wide object (one reader
thread each) and a call's pipes are read on the caller's event loop. A zygote left without calls
for ``pool_idle_seconds`` is stopped, and started again by the next call; one that dies fails its
calls with ``sandbox_error`` (their processes are killed) and is replaced.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_HERE = Path(__file__).parent
_ZYGOTE_SOURCE = "".join((_HERE / f).read_text() for f in ("sandbox_hook.py", "sandbox_bootstrap.py",
                                                          "sandbox_zygote.py"))
_ids = itertools.count(1)
# The zygote compiled here and sent as a code object when it runs this interpreter: parsing 40 KB
# of source leaves ~3 MB of the parser's memory dirty in the zygote, which every fork then copies
# the page tables of and every child's exit unmaps. ("<string>": the name the sandbox hides.)
_STUB = ("import os, marshal\nb = b''\nwhile True:\n    c = os.read(%d, 1 << 16)\n    if not c:\n"
         "        break\n    b += c\nos.close(%d)\ndel c\nexec(marshal.loads(b))\n")
_CODE: list[bytes] = []


def _zygote_code() -> bytes:
    if not _CODE:
        import marshal

        _CODE.append(marshal.dumps(compile(_ZYGOTE_SOURCE, "<string>", "exec")))
    return _CODE[0]


class PoolError(RuntimeError):
    """The pool could not run the call (the zygote did not start, or died)."""


class _Pending:
    """One call in a zygote, seen from the trainer: its pid, then its exit status."""

    __slots__ = ("loop", "pid", "started", "exited", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pid = None
        self.error = None  # why the zygote could not run it (exit status None)
        self.started = loop.create_future()
        self.exited = loop.create_future()

    def deliver(self, msg: dict) -> None:  # on the call's loop
        if "pid" in msg:
            self.pid = msg["pid"]
            if not self.started.done():
                self.started.set_result(msg["pid"])
        if "rc" in msg:
            self.error = msg.get("error")
            for f in (self.started, self.exited):
                if not f.done():
                    f.set_result(msg["rc"])


class Zygote:
    """A running zygote: start it (blocking, ~0.1 s), then :meth:`submit` calls from any thread."""

    def __init__(self, cfg, read_paths: list[str], idle_seconds: float):
        from .sandbox import _bootstrap_config, _environment

        self.idle_seconds = float(idle_seconds)
        _sweep()
        self.base = tempfile.mkdtemp(prefix=f"ossrl-pool-{os.getpid()}-")
        os.chmod(self.base, 0o711)  # each child reaches its own directory in here by name, lists nothing
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bcfg = _bootstrap_config(cfg, self.base, read_paths, require=False)
        bcfg.update(zygote=True, ctl_fd=theirs.fileno(), pool_memory_bytes=int(cfg.pool_memory_bytes))
        self._log = tempfile.TemporaryFile()
        code_r = code_w = -1
        source = _ZYGOTE_SOURCE
        if cfg.interpreter() == sys.executable:  # the same interpreter reads this one's code objects
            code_r, code_w = os.pipe()
            source = _STUB % (code_r, code_r)
        try:
            self.proc = subprocess.Popen(
                [cfg.interpreter(), "-I", "-S", "-B", "-u", "-c", source, json.dumps(bcfg)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, cwd=self.base,
                env=_environment(self.base), start_new_session=True,
                pass_fds=(theirs.fileno(),) + ((code_r,) if code_r >= 0 else ()))
        except BaseException:
            if code_w >= 0:
                os.close(code_w)
            raise
        finally:
            theirs.close()
            if code_r >= 0:
                os.close(code_r)
        if code_w >= 0:
            try:
                with open(code_w, "wb", closefd=True) as f:  # blocks until it has read all but 64 KB
                    f.write(_zygote_code())
            except OSError:  # it died first: its log says why
                pass
        self.sock = ours
        ours.settimeout(60.0)
        try:
            ready = json.loads(ours.recv(1 << 16) or b"{}")
        except (OSError, ValueError) as e:
            ready = {"error": f"{type(e).__name__}: {e}"}
        if "ready" not in ready:
            self._stop(keep_log=True)
            self._log.seek(0)
            why = self._log.read()[-2000:].decode("utf-8", "replace") or ready.get("error", "no answer")
            self._log.close()
            raise PoolError(f"the sandbox zygote did not start: {why}")
        self.layers = ready["ready"]
        self.work = ready.get("work")  # every call's directory (with mounts), else one per call
        ours.settimeout(1.0)  # the reader wakes up once a second to stop an idle zygote
        self._lock = threading.Lock()
        self._calls: dict[int, _Pending] = {}
        self.alive = True
        self._done = threading.Event()
        self.last_used = time.monotonic()
        threading.Thread(target=self._reader, name="ossrl-sandbox-zygote", daemon=True).start()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def rss_bytes(self) -> int:
        """The zygote's resident memory (what one warm sandbox costs); 0 once it is gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def submit(self, loop, tmp: str, fds: list[int], require: list[str], session: bool) -> tuple[int, _Pending]:
        """Asks for a child on these fds (stdin, stdout, stderr[, cells]). Raises PoolError."""
        cid = next(_ids)
        pending = _Pending(loop)
        msg = json.dumps({"op": "run", "id": cid, "tmp": tmp, "require": require, "session": session}).encode()
        with self._lock:
            if not self.alive:
                raise PoolError("the sandbox zygote has stopped")
            self._calls[cid] = pending
            self.last_used = time.monotonic()
            try:
                socket.send_fds(self.sock, [msg], fds)
            except OSError as e:
                self._calls.pop(cid, None)
                raise PoolError(f"the sandbox zygote is not answering: {e}") from None
        return cid, pending

    def kill(self, cid: int) -> None:
        """Kills a call's process group (the zygote checks that it has not been reaped yet)."""
        with self._lock:
            if self.alive:
                try:
                    self.sock.send(json.dumps({"op": "kill", "id": cid}).encode())
                except OSError:
                    pass

    def close(self) -> None:
        """Stops the zygote: its calls fail, its children are killed."""
        with self._lock:
            self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end and cleans up
        except OSError:
            pass
        self._done.wait(10.0)

    def _reader(self) -> None:
        while True:
            try:
                msg = self.sock.recv(1 << 16)
            except socket.timeout:
                with self._lock:
                    idle = not self._calls and time.monotonic() - self.last_used > self.idle_seconds
                    if idle:
                        self.alive = False
                if idle:
                    break
                continue
            except OSError:
                msg = b""
            if not msg:
                break
            m = json.loads(msg)
            with self._lock:
                p = self._calls.pop(m["id"], None) if "rc" in m else self._calls.get(m["id"])
                if p is not None and "pid" in m:
                    p.pid = m["pid"]  # here too: if the zygote dies, this thread kills it
            if p is not None:
                try:
                    p.loop.call_soon_threadsafe(p.deliver, m)
                except RuntimeError:  # that loop is closed
                    pass
        with self._lock:
            self.alive = False
            lost, self._calls = list(self._calls.values()), {}
        self._stop()
        self._done.set()
        for p in lost:  # the zygote died under them: kill what it had started, fail the calls
            if p.pid is not None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                p.loop.call_soon_threadsafe(p.deliver, {"rc": None})
            except RuntimeError:
                pass

    def _stop(self, keep_log: bool = False) -> None:
        try:
            self.sock.close()  # end of file: the zygote kills its children and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if not keep_log:
            self._log.close()
        for _ in range(40):  # a mount point until the kernel has torn the zygote's namespace down
            try:
                os.rmdir(self.base)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def _sweep() -> None:
    """Removes the (empty) directories of zygotes whose trainer died without stopping them."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        parts = name.split("-")
        if name.startswith("ossrl-pool-") and len(parts) == 4 and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
                continue
            except ProcessLookupError:
                pass
            except OSError:
                continue
            try:
                os.rmdir(os.path.join(tmp, name))
            except OSError:
                pass


class _Pool:
    """The zygote of one sandbox configuration, (re)started on demand."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.zygote: Zygote | None = None
        self.starts = 0
        self._lock = threading.Lock()

    def current(self) -> Zygote | None:
        z = self.zygote
        return z if z is not None and z.alive else None

    def get(self) -> Zygote:
        with self._lock:
            z = self.current()
            if z is None:
                from .sandbox_paths import _read_paths

                z = self.zygote = Zygote(self.cfg, _read_paths(self.cfg), self.cfg.pool_idle_seconds)
                self.starts += 1
            return z


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stops every zygote (they would stop on their own when this process ends, but their
    directories would stay behind)."""
    with _POOLS_LOCK:
        zs = [p.current() for p in _POOLS.values()]
    for z in zs:
        if z is not None:
            z.close()


_BY_CONFIG: dict = {}  # a config as given -> its pool (the same for any require=)


def pool_for(cfg) -> _Pool:
    pool = _BY_CONFIG.get(cfg)
    if pool is not None:
        return pool
    key = dataclasses.replace(cfg, require=())  # require= is checked per call, in the child
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = _Pool(key)
        _BY_CONFIG[cfg] = pool
        return pool


def pool_stats() -> dict:
    """Warm zygotes, the calls running in them and their resident memory, over all configurations."""
    with _POOLS_LOCK:
        zs = [p.current() for p in _POOLS.values()]
    zs = [z for z in zs if z is not None]
    return {"zygotes": len(zs), "in_flight": sum(z.in_flight for z in zs),
            "zygote_rss_bytes": sum(z.rss_bytes() for z in zs)}


class _CallIO:
    """A call's pipes on the caller's event loop: code into stdin, stdout and stderr out within
    their budgets (``on_overflow`` when one is exceeded)."""

    def __init__(self, loop, w_in: int, r_out: int, r_err: int, limit: int, on_overflow):
        self.loop, self.on_overflow, self.overflow = loop, on_overflow, False
        self.bufs = {r_out: bytearray(), r_err: bytearray()}
        self.budget = {r_out: limit, r_err: limit + 4096}
        self.out, self.err, self.w_in = r_out, r_err, w_in
        self.eof = loop.create_future()
        self._open = {r_out, r_err}
        self._data = memoryview(b"")
        self._writing = False
        for fd in (r_out, r_err):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._read, fd)

    def limit(self, limit: int) -> None:
        """New budgets (a session's next cell)."""
        self.budget = {self.out: limit, self.err: limit + 4096}
        self.overflow = False

    def drain(self) -> None:
        """Reads what the pipes hold now (a session cell's output, written before its answer)."""
        for fd in list(self._open):
            while fd in self._open and not self.overflow:
                before = len(self.bufs[fd])
                self._read(fd)
                if len(self.bufs[fd]) == before:
                    break

    def take(self) -> tuple[bytes, bytes]:
        out, err = bytes(self.bufs[self.out]), bytes(self.bufs[self.err])
        self.bufs[self.out].clear()
        self.bufs[self.err].clear()
        return out, err

    def feed(self, data: bytes) -> None:
        self._data = memoryview(data)
        os.set_blocking(self.w_in, False)
        self._write()

    def _write(self) -> None:
        try:
            n = os.write(self.w_in, self._data[:1 << 16])
        except BlockingIOError:
            n = 0
        except OSError:  # it exited or closed its stdin
            self._data = self._data[:0]
            n = 0
        self._data = self._data[n:]
        if not self._data:
            self._close_stdin()
        elif not self._writing:
            self._writing = True
            self.loop.add_writer(self.w_in, self._write)

    def _close_stdin(self) -> None:
        if self.w_in >= 0:
            if self._writing and not self.loop.is_closed():
                self.loop.remove_writer(self.w_in)
            os.close(self.w_in)
            self.w_in = -1

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(fd)
            return
        buf = self.bufs[fd]
        room = self.budget[fd] - len(buf)
        if len(chunk) > room:
            buf += chunk[:max(room, 0)]
            self.overflow = True
            self.on_overflow()
            self._close(fd)
            return
        buf += chunk

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            if not self.loop.is_closed():
                self.loop.remove_reader(fd)
            os.close(fd)
        if not self._open and not self.eof.done():
            self.eof.set_result(None)

    def close(self) -> None:
        self._close_stdin()
        for fd in list(self._open):
            self._close(fd)


def _pipes(n: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    try:
        for _ in range(n):
            out.append(os.pipe())
    except OSError:
        for pair in out:
            for fd in pair:
                os.close(fd)
        raise
    return out


async def start_child(loop, cfg, fds: list[int], require: list[str], session: bool):
    """A child of the configuration's zygote on ``fds``: ``(zygote, call id, pending, its
    directory)``. A zygote that stopped for idleness just now is replaced once; raises PoolError."""
    from .sandbox_paths import _rmtree

    pool = pool_for(cfg)
    for attempt in range(2):
        z = pool.current() or await loop.run_in_executor(None, pool.get)
        tmp = z.work or tempfile.mkdtemp(dir=z.base)
        try:
            cid, pending = z.submit(loop, tmp, fds, require, session)
            return z, cid, pending, tmp
        except PoolError:
            if tmp != z.work:
                _rmtree(tmp)
            if attempt or z.alive:
                raise
    raise AssertionError("unreachable")


async def run_pooled(data: bytes, cfg, timeout: float, limit: int, *, require: bool = True):
    """Runs ``data`` in a child of the configuration's zygote. Returns ``(rc, stdout, stderr,
    timed_out, overflow)`` for ``sandbox._classify``; raises PoolError if the pool cannot run it.
    The child is killed on every way out (timeout, output flood, cancellation)."""
    from .sandbox_paths import _rmtree

    loop = asyncio.get_running_loop()
    (r_in, w_in), (r_out, w_out), (r_err, w_err) = _pipes(3)
    io = pending = z = None
    try:
        theirs = (r_in, w_out, w_err)
        try:
            z, cid, pending, tmp = await start_child(loop, cfg, list(theirs), list(cfg.require) if require else [],
                                                     False)
        finally:
            for fd in theirs:
                os.close(fd)
        io = _CallIO(loop, w_in, r_out, r_err, limit, lambda: z.kill(cid))
        io.feed(data)
        done, _ = await asyncio.wait({pending.exited}, timeout=timeout)
        timed_out = not done
        if timed_out:
            z.kill(cid)
            await asyncio.wait({pending.exited}, timeout=5.0)
        # the zygote killed its process group when it reaped it: the pipes close at once
        await asyncio.wait({io.eof}, timeout=5.0 if timed_out else 0.5)
        rc = pending.exited.result() if pending.exited.done() else None
        if rc is None and not timed_out:
            raise PoolError(pending.error or "the sandbox zygote exited during the call")
        return rc, bytes(io.bufs[r_out]), bytes(io.bufs[r_err]), timed_out, io.overflow
    finally:
        if pending is not None and not pending.exited.done():
            z.kill(cid)
        if io is not None:
            io.close()
        else:
            for fd in (w_in, r_out, r_err):
                os.close(fd)
        if pending is not None and tmp != z.work:  # without mounts the code wrote into a host directory
            await loop.run_in_executor(None, _rmtree, tmp)
