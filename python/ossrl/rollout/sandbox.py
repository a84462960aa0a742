"""The ``python`` tool's sandbox: model-written code in a fresh, locked-down process per call.

    result = await run_sandboxed("print(6 * 7)", SandboxConfig(memory_bytes=256 << 20))
    layers = await probe_sandbox()        # which layers hold on this machine, and what is exposed

Each call runs ``<python> -I -S -B -u -c <bootstrap>`` (the bootstrap is ``sandbox_bootstrap.py``)
in a new session with a minimal environment and a fresh temporary working directory. No
environment variables, site-packages or user site are used. Before the model's code runs, the
bootstrap applies these layers, each on its own (one that the kernel refuses does not stop the
others), in this order. With ``SandboxConfig(pool=True)``, the default, the call is instead a
child forked from a warm zygote of that same interpreter (``sandbox_pool.py``): the zygote holds
namespaces and read-only mounts ready, and the child applies every per-call layer itself (its own
mount namespace, tmpfs, Landlock, uid, rlimits, seccomp, hook) before the code runs, so each call
gets the same layers at a small fraction of the cost. Where seccomp holds (checked once by the
zygote), the calls share the zygote's new, empty network namespace: none of them can create a
socket, so a namespace of its own would separate nothing; elsewhere each call gets its own, and
a call whose seccomp fails in the shared one does not run (``sandbox_error``):

1. Namespaces: a new network namespace (no network at all) and a new mount namespace, with
   ``unshare`` as root, otherwise inside a new user namespace where unprivileged ones are
   allowed. In the mount namespace (``mounts``): the whole filesystem is remounted read-only
   (``mount_setattr``, Linux >= 5.12); the working directory is a fresh tmpfs of at most
   ``disk_bytes`` and ``max_files`` files, mounted ``noexec`` (a ``.so`` written there cannot be
   mapped executable, so it cannot be imported); the interpreter's and the system's
   site-packages / dist-packages directories are covered by empty read-only mounts, so only
   the standard library is importable (``extra_sys_path`` stays visible). Nothing propagates
   back to the host's mounts, and the tmpfs disappears with the process.
2. Filesystem (Landlock, Linux >= 5.13): reads only the standard library, system
   shared-library directories, time-zone data and a few device files; writes only inside its
   working directory; no device nodes. ABI v4+: no TCP bind/connect. ABI v6+: no signals to
   processes outside itself, no abstract Unix sockets.
3. Privileges (``privileges``): the capability bounding and ambient sets are cleared. As root
   (outside a user namespace) the process then switches to an unused uid and gid
   (``1879048192 + pid``, no supplementary groups), which clears every capability; the working
   directory belongs to that uid. Inside its own user namespace it clears its capabilities with
   ``capset``. The result is checked in ``/proc/self/status``: ``privileges`` is True only if
   no capability is left. If a standard-library path is not readable by other users, the uid
   is kept (capabilities are still dropped) and the reason reported.
4. Resource limits (``setrlimit``): address space (``memory_bytes``), CPU seconds, size of each
   written file, open files, no core files, ``RLIMIT_NPROC = 0``.
5. seccomp-bpf (x86-64 and aarch64, needs only ``no_new_privs``): fork, vfork, clone, execve,
   socket, ptrace, mount and namespaces, bpf, io_uring, memfd_create, chmod/chown, mknod,
   raising rlimits, keyrings, signals to other processes (kill/tgkill to itself only; tkill,
   pidfd_*, rt_(tg)sigqueueinfo not at all), scheduling and memory placement of any process
   (setpriority, sched_set*, ioprio_set, migrate/move_pages, process_madvise, kcmp), the clock,
   the host and domain names, extended attributes (set/remove), timestamps (utime*), fanotify
   and the immutable/append-only ioctls fail with EPERM; other ABIs (i386, x32) kill it.
6. An audit hook (``sys.addaudithook``), installed last, for clear messages: it refuses
   sockets, process creation, signals, ctypes, raising rlimits, ``gc`` introspection, writes
   outside the working directory and reads outside it and the library directories. A refusal
   raises ``SandboxViolation`` (a ``PermissionError``), reported as ``error="sandbox_violation"``.

A wall-clock timeout kills the whole process group; output beyond ``max_output_chars`` stops
it. The layers are set by the child itself rather than in a ``preexec_fn``, which Python
documents as unsafe in a process with threads (the trainer has many).

Threat model: what holds, and where
-----------------------------------
The attacker is the model's code, assumed able to bypass the audit hook (it is Python code
inside the attacker's process; a ``str`` subclass or frame walking can get around it) and so to
run native code through ``ctypes``. The hook is **no security boundary**; the kernel layers are.

* With seccomp (any Linux >= 3.5 on x86-64/aarch64; on the issue's Ubuntu 22.04/24.04 kernels
  5.15 / 6.8, with or without Landlock): it cannot create processes, open sockets, trace,
  signal or reschedule any process but itself, change the clock, the host name, extended
  attributes, timestamps, ownership or modes, or mount anything.
* With ``mounts`` (root, or unprivileged user namespaces allowed): it cannot write any file
  outside its working directory, and that directory holds at most ``disk_bytes``; it cannot
  map a file it wrote as code, and cannot import installed packages (cffi and the like).
* With ``privileges``: it holds no capabilities; as root it runs under an unused uid, so file
  permissions apply to it like to any unprivileged user.
* With Landlock: it cannot read outside the standard library and the library directories
  (without Landlock, every file readable by its uid stays readable), and from ABI 6 (Linux
  6.12) signals and abstract sockets are scoped as well (seccomp covers signals anyway).
* The audit hook's path checks are not atomic: renaming directories while it checks can get
  past it. Only Landlock and the read-only mounts stop such reads and writes.

:func:`probe_sandbox` reports which layers took effect and, under ``"exposed"``, what the code
could still do on this machine. ``require=`` in :class:`SandboxConfig` refuses to run code
unless the named layers hold. Remaining exposure with every layer on: file metadata and
listings inside the readable set, CPU time and memory up to the limits (the tmpfs counts
towards the machine's memory) times the number of concurrent sandboxes, and kernel bugs
reachable through the allowed system calls. Use a container or VM for stronger isolation.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import tool_metrics
from .sandbox_paths import _package_dirs, _read_paths, _rmtree  # noqa: F401 (tests use _rmtree)
from .sandbox_pool import PoolError, run_pooled
from .tool_result import (CPU_LIMIT, CRASH, EXCEPTION, MEMORY_LIMIT, NONZERO_EXIT, OUTPUT_TOO_LARGE,
                          SANDBOX_ERROR, SANDBOX_VIOLATION, TIMEOUT, BAD_ARGUMENTS, ToolResult, code_bytes)

__all__ = ["SandboxConfig", "run_sandboxed", "probe_sandbox", "LAYERS"]

_MiB = 1 << 20

# what require= may name; each is a key of probe_sandbox()'s answer
LAYERS = ("netns", "mounts", "landlock", "privileges", "rlimits", "seccomp", "audit_hook")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for sandboxed code. All layers are used where the machine allows them.

    ``require`` names layers without which code must not run at all (any of :data:`LAYERS`:
    ``"netns"``, ``"mounts"``, ``"landlock"``, ``"privileges"``, ``"rlimits"``, ``"seccomp"``,
    ``"audit_hook"``). If one is missing, the call returns ``error="sandbox_error"`` naming it.
    ``audit_hook=False`` and the other switches exist to test the layers on their own.
    """

    memory_bytes: int = 512 * _MiB  # RLIMIT_AS
    cpu_seconds: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    file_size_bytes: int = 16 * _MiB  # RLIMIT_FSIZE: largest file it may write
    disk_bytes: int = 64 * _MiB  # total size of the working directory (with mounts)
    max_files: int = 4096  # files and directories in the working directory (with mounts)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_code_bytes: int = 1 * _MiB
    isolate_network: bool = True
    mounts: bool = True
    landlock: bool = True
    drop_privileges: bool = True
    seccomp: bool = True
    audit_hook: bool = True
    require: tuple[str, ...] = ()
    python: str = ""  # interpreter; default: sys.executable
    extra_read_paths: tuple[str, ...] = ()  # more read-only paths (files or directories)
    extra_sys_path: tuple[str, ...] = ()  # directories put on sys.path (and made readable)
    pool: bool = True  # fork each call from a warm zygote (sandbox_pool.py); False: a new interpreter per call
    pool_idle_seconds: float = 30.0  # a zygote without calls for this long is stopped (restarted on demand)
    pool_memory_bytes: int = 256 * _MiB  # RLIMIT_AS of the zygote itself (about 25 MiB resident)

    def __post_init__(self):
        unknown = [r for r in self.require if r not in LAYERS]
        if unknown:
            raise ValueError(f"SandboxConfig.require: unknown layer(s) {unknown}; known: {list(LAYERS)}")
        for name in ("memory_bytes", "cpu_seconds", "file_size_bytes", "disk_bytes", "max_files",
                     "max_open_files", "max_code_bytes", "pool_idle_seconds", "pool_memory_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise ValueError(f"SandboxConfig.{name} must be a positive number, got {v!r}")

    def interpreter(self) -> str:
        return self.python or sys.executable or shutil.which("python3") or "python3"


_MARKER = b"\x1eOSSRL-SANDBOX "

# Exit statuses the bootstrap uses for its own verdicts.
_EXIT_EXCEPTION = 100
_EXIT_VIOLATION = 101
_EXIT_MEMORY = 102
_EXIT_SETUP = 103

# The bootstrap runs inside the sandboxed interpreter (python -I -S -c). It reads the model's code
# from stdin, applies the layers described in the module docstring, and runs the code. The audit
# hook's text comes first (the bootstrap installs it); a warm pool's zygote appends its own.
_BOOTSTRAP = "".join((Path(__file__).parent / f).read_text() for f in ("sandbox_hook.py", "sandbox_bootstrap.py"))


class _LoopLocalSemaphore:
    """One asyncio.Semaphore per event loop (asyncio primitives are bound to a loop)."""

    def __init__(self, value: int):
        self.value = value
        self._by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        with self._lock:
            sem = self._by_loop.get(loop)
            if sem is None:
                sem = asyncio.Semaphore(self.value)
                self._by_loop[loop] = sem
            return sem


_DEFAULT_SANDBOX_SLOTS = _LoopLocalSemaphore(max(4, 2 * (os.cpu_count() or 2)))


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, OSError):
        pass


async def run_sandboxed(
    code: str,
    config: SandboxConfig | None = None,
    *,
    timeout: float = 10.0,
    max_output_chars: int = 16_000,
    name: str = "python",
    slots: asyncio.Semaphore | None = None,
) -> ToolResult:
    """Run model-written Python ``code`` in a fresh sandboxed subprocess (see the module
    docstring). Returns stdout (then stderr) as content. Never raises, except CancelledError,
    and kills the process group on every way out."""
    cfg = config or SandboxConfig()
    t0 = queued = time.monotonic()

    def result(ok: bool, content: str, error: str | None) -> ToolResult:
        return ToolResult(name, ok, content, error, time.monotonic() - t0)

    data, why = code_bytes(code, cfg.max_code_bytes)
    if data is None:
        return result(False, why, BAD_ARGUMENTS)
    sem = slots if slots is not None else _DEFAULT_SANDBOX_SLOTS.get()
    async with sem:
        t0 = time.monotonic()  # the timeout and the reported time cover the run, not the queue
        tool_metrics.record_queue_wait(t0 - queued)
        tool_metrics.sandbox_started()
        try:
            if cfg.pool:
                return await _run_in_pool(data, cfg, timeout, max_output_chars, result)
            return await _run_in_process(data, cfg, timeout, max_output_chars, result)
        finally:
            tool_metrics.sandbox_ended()


async def _run_in_pool(data: bytes, cfg: SandboxConfig, timeout: float, limit: int, result) -> ToolResult:
    try:
        rc, out, err, timed_out, overflow = await run_pooled(data, cfg, timeout, limit)
    except (PoolError, OSError) as e:
        return result(False, f"Error: the sandbox pool could not run the code: {type(e).__name__}: {e}", SANDBOX_ERROR)
    return _classify(rc, out, err, timed_out, overflow, timeout, limit, cfg, result)


def _bootstrap_config(cfg: SandboxConfig, tmp: str, read_paths: list[str], require: bool) -> dict:
    """What the bootstrap reads from its argv (see sandbox_bootstrap.py)."""
    tmp_real = os.path.realpath(tmp)
    return {
        "tmp": tmp_real,
        "read_paths": [p for p in read_paths if p != tmp_real],
        "extra_sys_path": [os.path.realpath(p) for p in cfg.extra_sys_path],
        "memory_bytes": int(cfg.memory_bytes),
        "cpu_seconds": max(1, int(math.ceil(cfg.cpu_seconds))),
        "file_size_bytes": int(cfg.file_size_bytes),
        "max_open_files": int(cfg.max_open_files),
        "disk_bytes": int(cfg.disk_bytes),
        "max_files": int(cfg.max_files),
        "hide_paths": _package_dirs(cfg, read_paths),
        "isolate_network": bool(cfg.isolate_network),
        "mounts": bool(cfg.mounts),
        "landlock": bool(cfg.landlock),
        "drop_privileges": bool(cfg.drop_privileges),
        "seccomp": bool(cfg.seccomp),
        "audit_hook": bool(cfg.audit_hook),
        "require": list(cfg.require) if require else [],
    }


def _environment(tmp: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}


async def _spawn(cfg: SandboxConfig, tmp: str, read_paths: list[str], require: bool = True):
    """Start the bootstrap in a new session, cwd the temporary directory, minimal environment."""
    tmp_real = os.path.realpath(tmp)
    bcfg = _bootstrap_config(cfg, tmp_real, read_paths, require)
    env = _environment(tmp_real)
    return await asyncio.create_subprocess_exec(
        cfg.interpreter(), "-I", "-S", "-B", "-u", "-c", _BOOTSTRAP, json.dumps(bcfg),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_real, env=env, start_new_session=True,
        close_fds=True)


async def _run_in_process(data: bytes, cfg: SandboxConfig, timeout: float, limit: int, result) -> ToolResult:
    try:
        read_paths = await asyncio.get_running_loop().run_in_executor(None, _read_paths, cfg)
        tmp = tempfile.mkdtemp(prefix="ossrl-sandbox-")
    except Exception as e:
        return result(False, f"Error: could not prepare the sandbox: {type(e).__name__}: {e}", SANDBOX_ERROR)
    proc = None
    try:
        try:
            proc = await _spawn(cfg, tmp, read_paths)
        except Exception as e:
            return result(False, f"Error: could not start the sandbox: {type(e).__name__}: {e}", SANDBOX_ERROR)

        state = {"overflow": False}
        bufs = {"out": bytearray(), "err": bytearray()}

        async def pump(stream, key: str, budget: int):
            buf = bufs[key]
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    return
                room = budget - len(buf)
                if len(chunk) > room:
                    buf += chunk[: max(room, 0)]
                    state["overflow"] = True
                    _kill_group(proc)
                    return
                buf += chunk

        async def feed():
            try:
                proc.stdin.write(data)
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except Exception:
                    pass

        tasks = [asyncio.ensure_future(feed()),
                 asyncio.ensure_future(pump(proc.stdout, "out", limit)),
                 asyncio.ensure_future(pump(proc.stderr, "err", limit + 4096)),
                 asyncio.ensure_future(proc.wait())]
        waiter, pumps = tasks[3], tasks[1:3]
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
            timed_out = not done
            if timed_out:  # the leader is alive, so its process group id is still its own
                _kill_group(proc)
            _, pending = await asyncio.wait(pumps, timeout=5.0 if timed_out else 0.5)
            if pending:
                # Something it forked (where nothing stopped the fork) still holds the pipes. That
                # group still exists, so its id cannot have been reused: kill it.
                _kill_group(proc)
                await asyncio.wait(pending, timeout=5.0)
            await asyncio.wait(tasks, timeout=5.0)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
        if not waiter.done():
            _kill_group(proc)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        rc = proc.returncode
        return _classify(rc, bytes(bufs["out"]), bytes(bufs["err"]), timed_out, state["overflow"],
                         timeout, limit, cfg, result)
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        await asyncio.get_running_loop().run_in_executor(None, _rmtree, tmp)


def _classify(rc, out: bytes, err: bytes, timed_out: bool, overflow: bool, timeout: float, limit: int,
              cfg: SandboxConfig, result, status: dict | None = None) -> ToolResult:
    """The result of a run; ``status``: the layers reported earlier (a session's later cells),
    else read from the marker line at the start of ``err``."""
    status = dict(status or {})
    if not status and err.startswith(_MARKER):
        line, _, err = err.partition(b"\n")
        try:
            status = json.loads(line[len(_MARKER):])
        except ValueError:
            status = {}
    text = out.decode("utf-8", "replace")
    etext = err.decode("utf-8", "replace")
    if etext:
        text = text + ("" if not text or text.endswith("\n") else "\n") + etext
    long_text = len(text) > limit
    if long_text:
        text = text[:limit]

    def note(msg: str) -> str:
        return text + ("" if not text or text.endswith("\n") else "\n") + msg

    if overflow:
        return result(False, note(f"[output truncated: the code wrote more than {limit} bytes and was stopped]"),
                      OUTPUT_TOO_LARGE)
    if timed_out:
        return result(False, note(f"[stopped: the code ran longer than its {timeout:g} s time limit]"), TIMEOUT)
    if rc == 0:
        if long_text:
            return result(False, note(f"[output truncated: more than {limit} characters]"), OUTPUT_TOO_LARGE)
        return result(True, text, None)
    if not status:  # died before the bootstrap reported: interpreter missing, broken, killed early
        return result(False, note(f"[sandbox error: the interpreter exited with status {rc} before running the code]"),
                      SANDBOX_ERROR)
    if rc == _EXIT_SETUP:
        return result(False, note("[sandbox error: required isolation is not available on this machine]"),
                      SANDBOX_ERROR)
    if rc == _EXIT_VIOLATION:
        return result(False, note("[stopped: the code attempted an operation the sandbox does not allow]"),
                      SANDBOX_VIOLATION)
    if rc == _EXIT_MEMORY:
        return result(False, note(f"[stopped: memory limit of {cfg.memory_bytes // _MiB} MiB exceeded]"), MEMORY_LIMIT)
    if rc == -signal.SIGXCPU or (rc == -signal.SIGKILL and not timed_out):
        return result(False, note(f"[stopped: CPU time limit of {cfg.cpu_seconds} s exceeded]"), CPU_LIMIT)
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = str(-rc)
        return result(False, note(f"[crashed: the process was killed by {sig}]"), CRASH)
    if rc == _EXIT_EXCEPTION:
        return result(False, text, EXCEPTION)
    return result(False, note(f"[the code exited with status {rc}]"), NONZERO_EXIT)


async def probe_sandbox(config: SandboxConfig | None = None) -> dict:
    """Run an empty program in the sandbox and return which layers took effect, e.g.
    ``{"netns": True, "landlock": True, "landlock_abi": 7, "rlimits": True, "seccomp": True,
    "audit_hook": True}``
    (a string instead of True says why a layer is missing), and ``"exposed"``: what the code
    could still do on this machine with these layers (see the module's threat model)."""
    layers = await _probe(config or SandboxConfig())
    if "error" not in layers:
        layers["exposed"] = _exposed(layers)
    return layers


def _exposed(layers: dict) -> list[str]:
    """What the code could still do with the layers that took effect (assuming it bypasses the
    audit hook, as native code can): one line per gap, empty when every layer holds."""
    out = []
    abi = layers.get("landlock_abi") or 0
    ok = {k: layers.get(k) is True for k in LAYERS}
    if not ok["landlock"]:
        out.append("file reads outside its directory: every file its uid may read is readable "
                   "(Landlock is off or unavailable)")
    elif abi < 4:
        out.append(f"Landlock ABI {abi} < 4: TCP bind/connect is stopped by the network namespace and seccomp only")
    if not ok["mounts"]:
        writes = "every file its uid may write" if not ok["landlock"] else "nothing outside its directory (Landlock)"
        out.append(f"no mount namespace: writes reach {writes}; no total disk limit on its directory "
                   "(file_size_bytes bounds each file); a library it writes can be loaded as code; "
                   "installed site-packages are importable")
    if not ok["privileges"]:
        why = layers.get("privileges", "not attempted")
        out.append(f"privileges not dropped ({why}): "
                   + ("as uid 0 it keeps root's access to files and, where seccomp does not stop it, "
                      "root's capabilities" if os.geteuid() == 0 else "it keeps the trainer's uid"))
    if not ok["seccomp"]:
        out.append("process creation, sockets, chmod/chown, signals to and scheduling of other processes, and "
                   "(with capabilities) the clock, host name and extended attributes: only the audit hook stops them")
    if not ok["netns"]:
        out.append("the network: no separate network namespace")
    if abi < 6 and not ok["seccomp"]:
        out.append("signals to other processes of its uid (Landlock ABI < 6 and no seccomp)")
    return out


async def _probe(cfg: SandboxConfig) -> dict:
    if cfg.pool:  # what a pool child gets
        try:
            _, _, err, timed_out, _ = await run_pooled(b"pass\n", cfg, 30.0, 1 << 16, require=False)
        except (PoolError, OSError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if err.startswith(_MARKER):
            return json.loads(err.partition(b"\n")[0][len(_MARKER):])
        return {"error": "probe timed out" if timed_out else err.decode("utf-8", "replace")[-2000:]}
    read_paths = await asyncio.get_running_loop().run_in_executor(None, _read_paths, cfg)
    tmp = tempfile.mkdtemp(prefix="ossrl-sandbox-")
    try:
        proc = await _spawn(cfg, tmp, read_paths, require=False)
        try:
            _, err = await asyncio.wait_for(proc.communicate(b"pass\n"), 30)
        except asyncio.TimeoutError:
            _kill_group(proc)
            return {"error": "probe timed out"}
        if err.startswith(_MARKER):
            return json.loads(err.partition(b"\n")[0][len(_MARKER):])
        return {"error": err.decode("utf-8", "replace")[-2000:]}
    finally:
        _rmtree(tmp)
