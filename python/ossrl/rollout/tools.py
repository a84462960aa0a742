"""Tools for agentic rollouts: a registry, a sandboxed ``python`` tool and a ``calculator``.

During a rollout the model writes tool calls (a name and JSON arguments). Those calls are
untrusted text. :class:`ToolRegistry` runs them concurrently on the asyncio event loop, outside
the GPU loop, and turns every outcome into a :class:`ToolResult` whose ``content`` goes back into
the conversation. It never raises and never hangs. Unknown tools, malformed JSON, arguments of
the wrong type, exceptions, timeouts, crashes and outputs over the limit all become results with
``ok=False``, an ``error`` kind and a message the model can read::

    registry = ToolRegistry()                      # built-ins: "python", "calculator"
    registry.register("lookup", lookup, description="Look a word up.",
                      parameters_schema={"type": "object",
                                         "properties": {"word": {"type": "string"}},
                                         "required": ["word"]})
    result = await registry.call("calculator", '{"expression": "2**10 - 1"}')
    results = await registry.run_calls([("python", '{"code": "print(6*7)"}'), ...],
                                       max_concurrency=64)

How calls run
-------------
* Async callables run as tasks on the caller's event loop. At the timeout they are cancelled;
  one that ignores the cancellation is abandoned (never awaited again), so the loop still moves on.
* Sync callables run in their own daemon thread, so the event loop is never blocked. **A thread
  cannot be killed**: a sync callable that hangs keeps its thread after its call has returned a
  timeout result. Such threads are counted, and once ``max_hung_threads`` are alive, further
  sync calls are refused with an ``unavailable`` result until some finish. Only trusted code
  belongs in a registered callable. Model-written code runs through the sandbox.
* Sandboxed code runs in a fresh subprocess per call, at most ``max_sandboxes`` processes at
  once. Waiting for a process slot does not count towards a call's timeout, and nothing waits
  forever: every process is killed at its own timeout.
* :meth:`ToolRegistry.run_calls` runs many calls with at most ``max_concurrency`` in flight and
  returns the results in input order.

The ``python`` sandbox and its threat model
-------------------------------------------
Each ``python`` call runs ``<python> -I -S -B -u -c <bootstrap>``. The interpreter is isolated:
no environment variables are honoured, no site-packages are loaded, and no user site is used. It
runs in a new session (its own process group) with a minimal environment (no inherited secrets)
and a fresh, private temporary directory as its working directory. That directory is deleted
afterwards. Before the model's code runs, the bootstrap locks the process down in layers:

1. Network: a new, empty network namespace (``unshare(CLONE_NEWNET)`` when running as root,
   otherwise ``CLONE_NEWUSER|CLONE_NEWNET`` where unprivileged user namespaces are allowed).
2. Filesystem (Landlock, Linux >= 5.13, no privileges needed): it may read only the Python
   standard library, system shared-library directories, time-zone data and a few device files.
   It may write only inside its temporary directory. Device nodes cannot be created.
   On ABI v4+ it may not bind or connect TCP sockets. On ABI v6+ it may not signal processes
   outside itself or reach abstract Unix sockets.
3. Resource limits (``setrlimit``): address space (``memory_bytes``), CPU seconds, size of
   written files, open files, no core files, and ``RLIMIT_NPROC = 0``. RLIMIT_NPROC does not
   apply to root, which is why layer 4 exists.
4. seccomp-bpf (x86-64 and aarch64, no privileges needed beyond ``no_new_privs``): fork, vfork,
   clone (threads too: the sandbox is single-threaded), execve, socket, ptrace, mount,
   namespaces, bpf, io_uring, chmod/chown, mknod, raising rlimits, kernel keyrings, signals
   to other processes (kill/tgkill to itself only; tkill, pidfd_open/pidfd_send_signal/
   pidfd_getfd, rt_sigqueueinfo and rt_tgsigqueueinfo not at all), scheduling and memory
   placement of any process (setpriority, sched_set*, ioprio_set, migrate/move_pages,
   process_madvise, kcmp), the clock (settimeofday, clock_settime, adjtimex, clock_adjtime),
   the host and domain names, extended attributes (set/remove), timestamps (utime*),
   fanotify, and the ioctls that make files immutable or append-only all fail with EPERM.
   Other ABIs (i386/x32 entry points) kill the process. This layer contains fork bombs even
   as root, and keeps root's remaining capabilities away from the clock, the host name and
   other processes on kernels where Landlock is older than ABI 6 or absent.
5. An audit hook (``sys.addaudithook``), installed last. It refuses socket use, process creation
   (``os.fork``, ``os.exec*``, ``os.system``, ``subprocess``, ``posix_spawn``), signals, ctypes,
   raising rlimits and ``gc`` introspection. It refuses ``open()`` for writing outside the
   temporary directory, and ``open()``, ``listdir`` and ``scandir`` for reading outside it and
   the standard-library and system-library directories. A refusal raises
   ``SandboxViolation`` (a ``PermissionError``). If that exception ends the program, the result
   has ``error="sandbox_violation"``.

Beyond those layers, a wall-clock timeout kills the whole process group, and output beyond
``max_output_chars`` stops the process, keeping the truncated output. The limits are set by the
child itself, before the model's code runs, rather than in a ``preexec_fn``: Python documents
``preexec_fn`` as unsafe in a process with threads, and the trainer has many.

Be honest about what these layers are. The audit hook is **not a security boundary on its own**:
it is Python code inside the attacker's process, and interpreter bugs or Python objects it does
not anticipate can get around it. It is there for clear error messages, and as the last line of
defence on kernels without Landlock or seccomp. The hard limits come from the kernel: rlimits,
the process-group kill, the network namespace, Landlock and seccomp. :func:`probe_sandbox`
reports which layers actually took effect on this machine. Pass ``require=("landlock",
"seccomp")`` in :class:`SandboxConfig` to refuse to run code without them.

Remaining exposure, even with every layer active:

* File metadata (``stat``) and listings of directories in the readable set stay visible.
* CPU time and memory up to the limits, times ``max_sandboxes``.
* Kernel vulnerabilities reachable through the allowed system calls.

Without Landlock, file access rests on the audit hook alone. Without seccomp, as root, so do
process creation, sockets, and chmod/chown of files anywhere (Landlock does not cover those);
the network namespace still removes the network. Use a container or VM for stronger isolation.

Not yet covered (see the project's hardening issue): the sandbox keeps the trainer's uid and,
as root, its capabilities (no uid drop into a user namespace yet), so with Landlock off or
below ABI 6 what stands between root's code and the host's files is the audit hook, which
native code can bypass; the temporary directory has no total size limit (``file_size_bytes``
bounds each file, ``max_open_files`` their number at once). The cleanup of the temporary
directory follows no symlink the code made.
Each call is stateless: no variables survive between calls.

``calculator`` evaluates arithmetic by walking the ``ast``: numbers, ``+ - * / // % **``
(``^`` is read as ``**``), parentheses and a few math functions. It never calls ``eval``, and
it bounds the size of integers and exponents, so ``9**9**9`` is refused rather than computed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import stat
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping

from .calculator import CalculatorError, calculator, evaluate_expression, format_number  # noqa: F401

__all__ = [
    "ToolRegistry",
    "ToolResult",
    "ToolCall",
    "SandboxConfig",
    "run_sandboxed",
    "probe_sandbox",
    "evaluate_expression",
    "calculator",
    "format_number",
    "CalculatorError",
]

# Error kinds (ToolResult.error). None means success.
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"
EXCEPTION = "exception"
TIMEOUT = "timeout"
OUTPUT_TOO_LARGE = "output_too_large"
CRASH = "crash"
NONZERO_EXIT = "nonzero_exit"
MEMORY_LIMIT = "memory_limit"
CPU_LIMIT = "cpu_limit"
SANDBOX_VIOLATION = "sandbox_violation"
SANDBOX_ERROR = "sandbox_error"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call. ``content`` is what goes back into the conversation."""

    name: str
    ok: bool
    content: str
    error: str | None = None  # one of the error kinds above when ok is False
    seconds: float = 0.0


@dataclass(frozen=True)
class ToolCall:
    """One model-written call: a tool name and its arguments (a JSON string or a mapping)."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    timeout: float | None = None


# --------------------------------------------------------------------------------------------
# Sandbox configuration
# --------------------------------------------------------------------------------------------

_MiB = 1 << 20


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for sandboxed code. All layers are used where the machine allows them.

    ``require`` names layers without which code must not run at all: any of ``"netns"``,
    ``"landlock"``, ``"seccomp"``, ``"rlimits"``, ``"audit_hook"``. If one is missing, the call
    returns ``error="sandbox_error"``. ``audit_hook=False`` exists to test the kernel layers on
    their own; do not use it otherwise.
    """

    memory_bytes: int = 512 * _MiB  # RLIMIT_AS
    cpu_seconds: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later)
    file_size_bytes: int = 16 * _MiB  # RLIMIT_FSIZE: largest file it may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_code_bytes: int = 1 * _MiB
    isolate_network: bool = True
    landlock: bool = True
    seccomp: bool = True
    audit_hook: bool = True
    require: tuple[str, ...] = ()
    python: str = ""  # interpreter; default: sys.executable
    extra_read_paths: tuple[str, ...] = ()  # more read-only paths (files or directories)
    extra_sys_path: tuple[str, ...] = ()  # directories put on sys.path (and made readable)

    def interpreter(self) -> str:
        return self.python or sys.executable or shutil.which("python3") or "python3"


# Read-only locations besides the interpreter's own sys.path (the standard library).
_SYSTEM_READ_DIRS = (
    "/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib",
    "/usr/share/zoneinfo",
)
_SYSTEM_READ_FILES = ("/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

_MARKER = b"\x1eOSSRL-SANDBOX "

# Exit statuses the bootstrap uses for its own verdicts.
_EXIT_EXCEPTION = 100
_EXIT_VIOLATION = 101
_EXIT_MEMORY = 102
_EXIT_SETUP = 103

# The bootstrap runs inside the sandboxed interpreter (python -I -S -c). It reads the model's code
# from stdin, applies the layers described in the module docstring, and runs the code.
_BOOTSTRAP = r'''
import sys, os, json, posix
_cfg = json.loads(sys.argv[1])
_code_bytes = sys.stdin.buffer.read()
_status = {}

def _step(name, fn, *args):
    # each layer on its own: one that fails (or does not exist here) does not stop the others
    try:
        _status[name] = fn(*args)
    except Exception as e:
        _status[name] = "failed: %s: %s" % (type(e).__name__, e)

def _setup():
    ctypes = libc = None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.prctl.restype = ctypes.c_int
    except Exception as e:  # no ctypes: only rlimits and the audit hook
        _status["ctypes"] = "unavailable: %s: %s" % (type(e).__name__, e)
    if libc is not None:
        if _cfg["isolate_network"]:
            _step("netns", _netns, ctypes, libc)                       # 1. network
        _step("no_new_privs", _no_new_privs, ctypes, libc)
        if _cfg["landlock"]:
            _step("landlock", _landlock, ctypes, libc)                 # 2. filesystem
    _step("rlimits", _rlimits)                                         # 3. resources
    if libc is not None and _cfg["seccomp"]:
        _step("seccomp", _seccomp, ctypes, libc)                       # 4. system calls

def _netns(ctypes, libc):
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if libc.unshare(ctypes.c_int(CLONE_NEWNET)) == 0:  # root (CAP_SYS_ADMIN)
        return True
    if libc.unshare(ctypes.c_int(CLONE_NEWUSER | CLONE_NEWNET)) == 0:  # unprivileged user ns
        return True
    return "unshare failed: errno %d" % ctypes.get_errno()

def _no_new_privs(ctypes, libc):
    UL = ctypes.c_ulong
    if libc.prctl(ctypes.c_int(38), UL(1), UL(0), UL(0), UL(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return "errno %d" % ctypes.get_errno()
    return True

def _rlimits():
    import resource
    lim = [("RLIMIT_AS", _cfg["memory_bytes"]), ("RLIMIT_CPU", _cfg["cpu_seconds"]),
           ("RLIMIT_FSIZE", _cfg["file_size_bytes"]), ("RLIMIT_NOFILE", _cfg["max_open_files"]),
           ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0)]
    bad = []
    for name, value in lim:
        try:
            res = getattr(resource, name)
            hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL 1 s later
            cur_hard = resource.getrlimit(res)[1]
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                value = min(value, hard)
            resource.setrlimit(res, (value, hard))
        except (AttributeError, ValueError, OSError) as e:
            bad.append("%s: %s" % (name, e))
    return True if not bad else "; ".join(bad)

def _landlock(ctypes, libc):
    L = ctypes.c_long
    abi = libc.syscall(L(444), None, L(0), L(1))  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi < 1:
        return "unavailable: errno %d" % ctypes.get_errno()
    EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
    MAKE_CHAR, MAKE_BLOCK, TRUNCATE, IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
    fs = (1 << 13) - 1
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= TRUNCATE
    if abi >= 5:
        fs |= IOCTL_DEV
    file_rights = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    rfd = libc.syscall(L(444), ctypes.byref(attr), L(size), L(0))
    if rfd < 0:
        return "create_ruleset failed: errno %d" % ctypes.get_errno()
    try:
        def allow(path, rights):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rule = PathBeneath(rights & fs, fd)
                if libc.syscall(L(445), L(rfd), L(1), ctypes.byref(rule), L(0)) != 0:
                    raise OSError(ctypes.get_errno(), "landlock_add_rule(%s)" % path)
            finally:
                os.close(fd)
        read = EXECUTE | READ_FILE | READ_DIR
        for p in _cfg["read_paths"]:
            allow(p, read)
        allow("/dev/null", READ_FILE | WRITE_FILE)
        allow(_cfg["tmp"], fs & ~(EXECUTE | MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV))
        if libc.syscall(L(446), L(rfd), L(0)) != 0:
            return "restrict_self failed: errno %d" % ctypes.get_errno()
    except OSError as e:
        return "failed: %s" % (e,)
    finally:
        os.close(rfd)
    _status["landlock_abi"] = abi
    return True

def _seccomp(ctypes, libc):
    machine = os.uname().machine
    EPERM = 1
    if machine == "x86_64":
        arch = 0xC000003E
        deny = [57, 58, 56, 435, 59, 322, 41, 53, 101, 200, 160, 165, 166, 155, 161, 272, 308,
                321, 298, 250, 248, 249, 175, 313, 176, 246, 320, 169, 167, 168, 304, 303, 310,
                311, 323, 425, 426, 427, 90, 91, 268, 452, 92, 93, 94, 260, 133, 259, 428, 429,
                430, 431, 432, 433, 442, 179, 163,
                # signals by pidfd or with a payload, other processes' memory and scheduling,
                # the clock, the host name, extended attributes, timestamps, fanotify: things
                # root could otherwise do to the trainer or the host even without Landlock
                434, 424, 438, 129, 297, 440, 312, 141, 203, 144, 142, 314, 251, 256, 279,
                164, 227, 305, 159, 170, 171, 188, 189, 190, 197, 198, 199, 463, 466, 300, 301,
                280, 235, 132, 261]
        kill_nr, tgkill_nr, prlimit_nr, ioctl_nr = 62, 234, 302, 16
    elif machine in ("aarch64", "arm64"):
        arch = 0xC00000B7
        deny = [220, 435, 221, 281, 198, 199, 117, 130, 164, 40, 39, 41, 51, 97, 268, 280, 241,
                219, 217, 218, 105, 273, 106, 104, 294, 142, 224, 225, 265, 264, 270, 271, 282,
                425, 426, 427, 52, 53, 452, 54, 55, 33, 428, 429, 430, 431, 432, 433, 442, 60,
                89,
                434, 424, 438, 138, 240, 440, 272, 140, 122, 119, 118, 274, 30, 238, 239,
                170, 112, 266, 171, 161, 162, 5, 6, 7, 14, 15, 16, 463, 466, 262, 263, 88]
        kill_nr, tgkill_nr, prlimit_nr, ioctl_nr = 129, 131, 261, 29
    else:
        return "unsupported machine %s" % machine
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, ERRNO, KILL = 0x7FFF0000, 0x00050000 | EPERM, 0x80000000
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 system calls
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO)]
    for nr in deny:
        prog += [(JEQ, 0, 1, nr), (RET, 0, 0, ERRNO)]
    me = os.getpid()
    for nr in (kill_nr, tgkill_nr):  # signals only to itself
        prog += [(JEQ, 0, 4, nr), (LD, 0, 0, 16), (JEQ, 0, 1, me), (RET, 0, 0, ALLOW),
                 (RET, 0, 0, ERRNO)]
    # ioctl: not the inode-flag setters (immutable / append-only files the cleanup cannot remove)
    for cmd in (0x40086602, 0x40046602, 0x401C5820):  # FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR
        prog += [(JEQ, 0, 4, ioctl_nr), (LD, 0, 0, 24), (JEQ, 0, 1, cmd), (RET, 0, 0, ERRNO), (LD, 0, 0, 0)]
    # prlimit64 only to read limits (new_limit pointer, args[2], must be NULL)
    prog += [(JEQ, 0, 6, prlimit_nr), (LD, 0, 0, 32), (JEQ, 0, 3, 0), (LD, 0, 0, 36),
             (JEQ, 0, 1, 0), (RET, 0, 0, ALLOW), (RET, 0, 0, ERRNO)]
    prog += [(RET, 0, 0, ALLOW)]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    UL = ctypes.c_ulong
    PR_SET_SECCOMP, PR_GET_SECCOMP, MODE_FILTER = 22, 21, 2
    if libc.prctl(ctypes.c_int(PR_SET_SECCOMP), UL(MODE_FILTER), ctypes.byref(fprog), UL(0),
                  UL(0)) != 0:
        return "prctl failed: errno %d" % ctypes.get_errno()
    if libc.prctl(ctypes.c_int(PR_GET_SECCOMP), UL(0), UL(0), UL(0), UL(0)) != 2:
        return "not in force"
    return True

class SandboxViolation(PermissionError):
    pass

def _make_hook(tmp, read_dirs, violation=SandboxViolation):
    import pathlib
    deny_prefix = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "subprocess.", "_posixsubprocess.", "pty.", "socket.",
                   "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill",
                   "resource.setrlimit", "resource.prlimit", "gc.get_referrers",
                   "gc.get_referents", "gc.get_objects", "os.chmod", "os.chown",
                   "os.lchown", "os.chflags", "os.lchflags", "os.mknod", "os.setxattr",
                   "os.removexattr", "sys.remote_exec")
    deny_import = ("ctypes", "_ctypes", "_posixsubprocess")
    # event: (path argument positions, dir_fd positions, "r" or "w")
    path_events = {
        "os.listdir": ((0,), (), "r"), "os.scandir": ((0,), (), "r"),
        "os.listxattr": ((0,), (), "r"), "os.getxattr": ((0,), (), "r"),
        "os.mkdir": ((0,), (2,), "w"), "os.remove": ((0,), (1,), "w"),
        "os.rmdir": ((0,), (1,), "w"), "os.rename": ((0, 1), (2, 3), "w"),
        "os.link": ((0, 1), (2, 3), "w"), "os.symlink": ((1,), (2,), "w"),
        "os.truncate": ((0,), (), "w"), "os.utime": ((0,), (3,), "w"),
        "os.mkfifo": ((0,), (2,), "w"),
    }
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    dir_flags = os.O_DIRECTORY | getattr(os, "O_PATH", 0)

    def resolve(p, _lstat=posix.lstat, _readlink=posix.readlink, _getcwd=posix.getcwd,
                _OSError=OSError, _list=list, _reversed=reversed, _violation=violation):
        if not p.startswith("/"):
            p = _getcwd() + "/" + p
        todo = _list(_reversed(p.split("/")))
        out = []
        links = 0
        while todo:
            c = todo.pop()
            if c == "" or c == ".":
                continue
            if c == "..":
                if out:
                    out.pop()
                continue
            cand = "/" + "/".join(out + [c])
            try:
                st = _lstat(cand)
            except _OSError:
                out.append(c)
                continue
            if (st.st_mode & 0o170000) == 0o120000:
                links += 1
                if links > 40:
                    raise _violation("sandbox: too many symbolic links")
                target = _readlink(cand)
                if target.startswith("/"):
                    out = []
                todo.extend(_reversed(target.split("/")))
            else:
                out.append(c)
        return "/" + "/".join(out)

    def within(p, dirs):
        for d in dirs:
            if p == d or p.startswith(d + "/") or d == "/":
                return True
        return False

    def topath(p, _type=type, _str=str, _bytes=bytes, _int=int, _fspath=posix.fspath,
               _violation=violation, _path_types=path_types):
        t = _type(p)
        if t is _str:
            return p
        if t is _bytes:
            return p.decode("utf-8", "surrogateescape")
        if t in _path_types:
            return _str(_fspath(p))
        raise _violation("sandbox: unsupported path object %r" % (t,))

    def hook(event, args, _deny_prefix=deny_prefix, _deny_import=deny_import,
             _path_events=path_events, _resolve=resolve, _within=within, _topath=topath,
             _tmp=(tmp,), _read=tuple([tmp] + list(read_dirs)), _violation=violation,
             _int=int, _type=type, _len=len, _write_flags=write_flags, _dir_flags=dir_flags,
             _isdir=posix.stat, _protected=[], _none=None):
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return
            p = _resolve(_topath(path))
            writing = (_type(flags) is _int and flags & _write_flags) or (
                mode is not _none and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if writing:
                if not _within(p, _tmp):
                    raise _violation("sandbox: writing outside the working directory is not allowed: %r" % (p,))
                return
            if not _within(p, _read):
                raise _violation("sandbox: reading files outside the working directory and the standard library is not allowed: %r" % (p,))
            if mode is _none:  # os.open: no directory fds (they would make dir_fd escapes possible)
                if _type(flags) is _int and flags & _dir_flags:
                    raise _violation("sandbox: opening directories with os.open is not allowed")
                try:
                    isdir = (_isdir(p).st_mode & 0o170000) == 0o040000
                except OSError:
                    isdir = False
                if isdir:
                    raise _violation("sandbox: opening directories with os.open is not allowed")
            return
        if event.startswith(_deny_prefix):
            raise _violation("sandbox: %s is not allowed" % event)
        if event == "import":
            name = args[0]
            for d in _deny_import:
                if name == d or name.startswith(d + "."):
                    raise _violation("sandbox: importing %s is not allowed" % name)
            return
        spec = _path_events.get(event)
        if spec is not _none:
            paths, dirfds, kind = spec
            for i in dirfds:
                if i < _len(args) and args[i] is not _none and args[i] != -1:
                    raise _violation("sandbox: dir_fd arguments are not allowed")
            for i in paths:
                if i >= _len(args):
                    continue
                a = args[i]
                if _type(a) is _int:
                    if kind == "w" and event != "os.truncate":
                        raise _violation("sandbox: %s on a file descriptor is not allowed" % event)
                    if event in ("os.listdir", "os.scandir"):
                        raise _violation("sandbox: %s on a file descriptor is not allowed" % event)
                    continue
                p = _resolve(_topath(a if a is not _none else "."))
                if not _within(p, _tmp if kind == "w" else _read):
                    raise _violation("sandbox: %s outside the working directory is not allowed: %r" % (event, p))
            return
        if event in ("object.__setattr__", "object.__delattr__"):
            obj = args[0]
            for o in _protected:
                if obj is o:
                    raise _violation("sandbox: modifying the sandbox is not allowed")
            return
    hook.__defaults__[-2].extend([hook, resolve, within, topath, *path_types,
                                  pathlib.PurePath, type(pathlib.Path())])
    return hook

def _print_exception(e, traceback):
    # the model's frames only: drop the bootstrap's and the audit hook's (file "<string>")
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    seen, todo = set(), [te]
    while todo:
        t = todo.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if f.filename != "<string>"])
        todo += [t.__cause__, t.__context__]
    sys.stderr.write("".join(te.format()))

def _report(status):
    os.write(2, b"\x1eOSSRL-SANDBOX " + json.dumps(status).encode() + b"\n")

def _main():
    try:
        _setup()
    except Exception as e:  # a layer could not be set up: reported, and 'require' decides
        _status["setup_error"] = "%s: %s" % (type(e).__name__, e)
    import traceback, linecache, builtins  # before the hook and the memory cap bite
    _status["audit_hook"] = bool(_cfg["audit_hook"])
    missing = [k for k in _cfg["require"] if _status.get(k) is not True]
    _report(_status)
    if missing:
        os.write(2, ("sandbox: required isolation layers unavailable: %s (%s)\n"
                     % (", ".join(missing), json.dumps(_status))).encode())
        os._exit(103)
    for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[m]
    sys.path[:0] = _cfg["extra_sys_path"]
    try:
        code = compile(_code_bytes, "<code>", "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None, limit=0)
        os._exit(100)
    src = _code_bytes.decode("utf-8", "replace")
    linecache.cache["<code>"] = (len(src), None, src.splitlines(True), "<code>")
    if _cfg["audit_hook"]:
        sys.addaudithook(_make_hook(_cfg["tmp"], _cfg["read_paths"]))
    g = {"__name__": "__main__", "__builtins__": builtins}
    status = 0
    try:
        exec(code, g)
    except SystemExit as e:
        c = e.code
        if c is None:
            status = 0
        elif isinstance(c, int):
            status = c & 0xFF
        else:
            try:
                sys.stderr.write(str(c) + "\n")
            except Exception:
                pass
            status = 1
    except MemoryError as e:
        g.clear()
        e.__traceback__ = None
        os.write(2, b"MemoryError: the sandbox memory limit was exceeded\n")
        status = 102
    except BaseException as e:
        try:
            _print_exception(e, traceback)
        except BaseException:
            os.write(2, ("%s: %s\n" % (type(e).__name__, e)).encode("utf-8", "replace"))
        status = 101 if isinstance(e, SandboxViolation) else 100
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status)

_main()
'''


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


def _read_paths(config: SandboxConfig) -> list[str]:
    """Read-only paths of the sandbox: the interpreter's standard library (asked from the
    interpreter itself, cached), system library directories and the configured extras."""
    py = config.interpreter()
    paths = list(_stdlib_paths(py))
    paths += [p for p in _SYSTEM_READ_DIRS + _SYSTEM_READ_FILES if os.path.exists(p)]
    for p in tuple(config.extra_read_paths) + tuple(config.extra_sys_path):
        paths.append(os.path.realpath(p))
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


_STDLIB_CACHE: dict[str, tuple[str, ...]] = {}
_STDLIB_LOCK = threading.Lock()


def _stdlib_paths(python: str) -> tuple[str, ...]:
    with _STDLIB_LOCK:
        hit = _STDLIB_CACHE.get(python)
    if hit is not None:
        return hit
    import subprocess

    # exactly the sys.path the sandboxed interpreter will have (python -I -S): the standard library
    out = subprocess.run([python, "-I", "-S", "-c", "import sys, json; print(json.dumps(sys.path))"],
                         capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=True)
    cand = json.loads(out.stdout)
    res = []
    for p in cand:
        if p and os.path.exists(p):
            rp = os.path.realpath(p)
            if rp not in res:
                res.append(rp)
    hit = tuple(res)
    with _STDLIB_LOCK:
        _STDLIB_CACHE[python] = hit
    return hit


def _rmtree(path: str) -> None:
    """Removes a sandbox's temporary directory, following nothing the sandbox made: a path that
    failed is made writable only if it is a real directory (not a symlink) inside ``path``."""
    root = os.path.realpath(path)

    def onerror(func, p, exc_info):  # read-only directories made by the code: fix and retry
        try:
            target = p if stat.S_ISDIR(os.lstat(p).st_mode) else os.path.dirname(p)
            st = os.lstat(target)
            real = os.path.realpath(target)
            if stat.S_ISDIR(st.st_mode) and (real == root or real.startswith(root + os.sep)):
                os.chmod(target, 0o700)  # a real directory: chmod does not follow anything
                func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda func, p, exc: onerror(func, p, None))
    else:
        shutil.rmtree(path, onerror=onerror)


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
    t0 = time.monotonic()

    def result(ok: bool, content: str, error: str | None) -> ToolResult:
        return ToolResult(name, ok, content, error, time.monotonic() - t0)

    if not isinstance(code, str):
        return result(False, f"Error: the code must be a string, got {type(code).__name__}.", BAD_ARGUMENTS)
    data = code.encode("utf-8", "surrogatepass")
    if len(data) > cfg.max_code_bytes:
        return result(False, f"Error: the code is too long ({len(data)} bytes, limit {cfg.max_code_bytes}).",
                      BAD_ARGUMENTS)
    sem = slots if slots is not None else _DEFAULT_SANDBOX_SLOTS.get()
    async with sem:
        t0 = time.monotonic()  # the timeout and the reported time cover the run, not the queue
        return await _run_in_process(data, cfg, timeout, max_output_chars, result)


async def _spawn(cfg: SandboxConfig, tmp: str, read_paths: list[str], require: bool = True):
    """Start the bootstrap in a new session, cwd the temporary directory, minimal environment."""
    tmp_real = os.path.realpath(tmp)
    bcfg = {
        "tmp": tmp_real,
        "read_paths": [p for p in read_paths if p != tmp_real],
        "extra_sys_path": [os.path.realpath(p) for p in cfg.extra_sys_path],
        "memory_bytes": int(cfg.memory_bytes),
        "cpu_seconds": max(1, int(math.ceil(cfg.cpu_seconds))),
        "file_size_bytes": int(cfg.file_size_bytes),
        "max_open_files": int(cfg.max_open_files),
        "isolate_network": bool(cfg.isolate_network),
        "landlock": bool(cfg.landlock),
        "seccomp": bool(cfg.seccomp),
        "audit_hook": bool(cfg.audit_hook),
        "require": list(cfg.require) if require else [],
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp_real,
           "TMPDIR": tmp_real}
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
              cfg: SandboxConfig, result) -> ToolResult:
    status: dict = {}
    if err.startswith(_MARKER):
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
    out = []
    abi = layers.get("landlock_abi") or 0
    if layers.get("landlock") is not True:
        out.append("file reads and writes outside its directory: only the audit hook stops them, and native "
                   "code can bypass it")
    elif abi < 4:
        out.append(f"Landlock ABI {abi} < 4: TCP bind/connect is stopped by the network namespace and seccomp only")
    if layers.get("seccomp") is not True:
        out.append("process creation, sockets, chmod/chown, signals to and scheduling of other processes, and "
                   "(as root) the clock, host name and extended attributes: only the audit hook stops them")
    if layers.get("netns") is not True:
        out.append("the network: no separate network namespace")
    if os.geteuid() == 0:
        out.append("the code runs with the trainer's uid 0 and capabilities (no uid drop yet): where Landlock is "
                   "off it can write any file the audit hook does not catch")
    out.append("disk: no total limit on its temporary directory (file_size_bytes bounds each file)")
    return out


async def _probe(cfg: SandboxConfig) -> dict:
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


_CALCULATOR_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "An arithmetic expression, e.g. '(3 + 4) * 12'."}},
    "required": ["expression"],
    "additionalProperties": False,
}
_PYTHON_SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python source code; what it prints is the result."}},
    "required": ["code"],
    "additionalProperties": False,
}


# --------------------------------------------------------------------------------------------
# Argument validation (the subset of JSON Schema that tool definitions use)
# --------------------------------------------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _json_type_name(v: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](v):
            return name
    return type(v).__name__


def _validate(schema: Mapping[str, Any], value: Any, where: str) -> str | None:
    """Returns a message for the first problem found, or None."""
    t = schema.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else list(t)
        if not any(_JSON_TYPES.get(x, lambda v: True)(value) for x in types):
            return f"{where}: expected {' or '.join(types)}, got {_json_type_name(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: must be one of {json.dumps(schema['enum'])}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where}: must be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where}: must be <= {schema['maximum']}"
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{where}: must have at least {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where}: must have at most {schema['maxLength']} characters"
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            return f"{where}: must have at least {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{where}: must have at most {schema['maxItems']} items"
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, v in enumerate(value):
                msg = _validate(items, v, f"{where}[{i}]")
                if msg:
                    return msg
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                return f"{where}: missing required argument '{key}'" if where == "arguments" else f"{where}: missing '{key}'"
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            sub = props.get(key)
            path = f"argument '{key}'" if where == "arguments" else f"{where}.{key}"
            if sub is None:
                if extra is False:
                    allowed = ", ".join(props) or "none"
                    return f"unexpected argument '{key}' (allowed: {allowed})" if where == "arguments" \
                        else f"{where}: unexpected key '{key}'"
                if isinstance(extra, Mapping):
                    msg = _validate(extra, v, path)
                    if msg:
                        return msg
                continue
            msg = _validate(sub, v, path)
            if msg:
                return msg
    return None


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass
class _Tool:
    name: str
    fn: Callable[..., Any] | None
    description: str
    parameters_schema: dict
    is_async: bool
    timeout: float | None
    raw_argument: str | None
    signature: inspect.Signature | None = None
    sandbox: bool = False


@dataclass
class _HungThreads:
    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            pass
    return str(value)


def _is_async_callable(fn: Callable) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


class ToolRegistry:
    """Tools the model may call, run concurrently and safely. See the module docstring.

    ``builtins``: True (``python`` and ``calculator``), False, or an iterable of their names.
    ``default_timeout``: seconds per call unless the tool or the call says otherwise.
    ``max_output_chars``: longer results are truncated and reported as ``output_too_large``.
    ``max_sandboxes``: sandbox processes alive at once (per event loop).
    ``max_hung_threads``: timed-out sync callables whose threads still run, before further sync
    calls are refused.
    """

    def __init__(
        self,
        *,
        builtins: bool | Iterable[str] = True,
        sandbox: SandboxConfig | None = None,
        default_timeout: float = 30.0,
        max_output_chars: int = 16_000,
        max_sandboxes: int | None = None,
        max_hung_threads: int = 64,
    ):
        self.sandbox = sandbox or SandboxConfig()
        self.default_timeout = float(default_timeout)
        self.max_output_chars = int(max_output_chars)
        self.max_hung_threads = int(max_hung_threads)
        self._slots = (_LoopLocalSemaphore(max_sandboxes) if max_sandboxes else _DEFAULT_SANDBOX_SLOTS)
        self._tools: dict[str, _Tool] = {}
        self._hung = _HungThreads()
        self._abandoned: set[asyncio.Future] = set()
        names = {"python", "calculator"} if builtins is True else set(builtins or ())
        unknown = names - {"python", "calculator"}
        if unknown:
            raise ValueError(f"unknown built-in tools: {sorted(unknown)}")
        if "python" in names:
            self._tools["python"] = _Tool(
                "python", None,
                "Run Python code in a sandbox (no network, no files outside a temporary directory, "
                "standard library only) and return what it prints. Each call starts fresh.",
                _PYTHON_SCHEMA, True, None, "code", None, sandbox=True)
        if "calculator" in names:
            self.register("calculator", calculator, description="Evaluate an arithmetic expression "
                          "(+ - * / // % **, parentheses, sqrt, log, ...) and return the result.",
                          parameters_schema=_CALCULATOR_SCHEMA, raw_argument="expression", timeout=5.0)

    # -- registration ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str,
        parameters_schema: Mapping[str, Any],
        timeout: float | None = None,
        raw_argument: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register a Python callable (sync or async) called with keyword arguments.

        ``parameters_schema`` is a JSON Schema object (``{"type": "object", "properties": ...}``);
        arguments are checked against it (types, required, enum, bounds, additionalProperties)
        before the call. ``raw_argument`` names a string parameter that receives the whole
        argument text when it is not a JSON object (GPT-OSS sometimes writes code or an expression
        directly instead of JSON). Sync callables run in a daemon thread that cannot be killed on
        timeout: register only trusted code; model-written code belongs in the sandbox."""
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"invalid tool name {name!r}: use letters, digits, '_', '-' or '.'")
        if name in self._tools and not replace:
            raise ValueError(f"tool {name!r} is already registered (pass replace=True)")
        if not callable(fn):
            raise TypeError(f"tool {name!r}: fn must be callable")
        if not isinstance(parameters_schema, Mapping) or parameters_schema.get("type", "object") != "object":
            raise ValueError(f"tool {name!r}: parameters_schema must be a JSON Schema with type 'object'")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if raw_argument is not None and raw_argument not in (parameters_schema.get("properties") or {}):
            raise ValueError(f"tool {name!r}: raw_argument {raw_argument!r} is not a declared parameter")
        self._tools[name] = _Tool(name, fn, str(description), json.loads(json.dumps(dict(parameters_schema))),
                                  _is_async_callable(fn), timeout, raw_argument, sig)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict]:
        """Tool definitions for the prompt: ``[{"name", "description", "parameters"}, ...]``."""
        return [{"name": t.name, "description": t.description, "parameters": t.parameters_schema}
                for t in self._tools.values()]

    @property
    def hung_threads(self) -> int:
        """Sync tool threads that timed out and are still running."""
        return self._hung.count

    # -- calling -----------------------------------------------------------------------------

    async def call(self, name: str, arguments_json: str | Mapping[str, Any] | None = "{}", *,
                   timeout: float | None = None) -> ToolResult:
        """Run one tool call. Never raises (except asyncio.CancelledError when the caller is
        cancelled) and never waits much past the timeout."""
        t0 = time.monotonic()
        sname = name if isinstance(name, str) else repr(name)
        try:
            return await self._call(sname, arguments_json, timeout, t0)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug here must not take the rollout down
            if isinstance(e, KeyboardInterrupt):
                raise
            return ToolResult(sname, False, f"Error: internal error while calling tool '{sname}': "
                              f"{type(e).__name__}: {e}", EXCEPTION, time.monotonic() - t0)

    async def run_calls(self, calls: Iterable[ToolCall | tuple | Mapping[str, Any]], *,
                        max_concurrency: int = 64, timeout: float | None = None) -> list[ToolResult]:
        """Run many calls with at most ``max_concurrency`` in flight; results in input order.

        A call is a ToolCall, a ``(name, arguments)`` tuple, or a mapping with ``name`` and
        ``arguments`` (and optionally ``timeout``). Never raises for a bad call."""
        items = list(calls)
        results: list[ToolResult | None] = [None] * len(items)
        if not items:
            return []
        it = iter(range(len(items)))

        async def worker():
            for i in it:
                results[i] = await self._call_item(items[i], timeout)

        n = max(1, min(int(max_concurrency), len(items)))
        await asyncio.gather(*(worker() for _ in range(n)))
        return results  # type: ignore[return-value]

    async def _call_item(self, item: Any, timeout: float | None) -> ToolResult:
        try:
            if isinstance(item, ToolCall):
                name, args, t = item.name, item.arguments, item.timeout
            elif isinstance(item, Mapping):
                name, args, t = item.get("name"), item.get("arguments", "{}"), item.get("timeout")
            else:
                name, args = item[0], (item[1] if len(item) > 1 else "{}")
                t = item[2] if len(item) > 2 else None
        except Exception:
            return ToolResult(str(item)[:100], False, "Error: malformed tool call.", BAD_ARGUMENTS, 0.0)
        return await self.call(name, args, timeout=t if t is not None else timeout)

    async def _call(self, name: str, arguments: Any, timeout: float | None, t0: float) -> ToolResult:
        def fail(kind: str, msg: str) -> ToolResult:
            return ToolResult(name, False, msg, kind, time.monotonic() - t0)

        tool = self._tools.get(name)
        if tool is None:
            avail = ", ".join(sorted(self._tools)) or "none"
            return fail(UNKNOWN_TOOL, f"Error: unknown tool '{name[:100]}'. Available tools: {avail}.")
        # arguments
        if arguments is None:
            arguments = {}
        if isinstance(arguments, (bytes, bytearray)):
            arguments = bytes(arguments).decode("utf-8", "replace")
        if isinstance(arguments, str):
            text = arguments
            try:
                args = json.loads(text) if text.strip() else {}
            except (ValueError, RecursionError) as e:
                if tool.raw_argument is not None:
                    args = {tool.raw_argument: text}
                else:
                    return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' are not valid JSON ({e}).")
            if not isinstance(args, dict):
                if tool.raw_argument is not None:
                    args = {tool.raw_argument: text}
                else:
                    return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' must be a JSON object, "
                                               f"got {_json_type_name(args)}.")
        elif isinstance(arguments, Mapping):
            args = dict(arguments)
        else:
            return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' must be a JSON object.")
        msg = _validate(tool.parameters_schema, args, "arguments")
        if msg:
            return fail(BAD_ARGUMENTS, f"Error: invalid arguments for tool '{name}': {msg}.")
        if tool.signature is not None:
            try:
                tool.signature.bind(**args)
            except TypeError as e:
                return fail(BAD_ARGUMENTS, f"Error: invalid arguments for tool '{name}': {e}.")
        limit = timeout if timeout is not None else (tool.timeout if tool.timeout is not None else self.default_timeout)
        limit = max(0.001, float(limit))

        if tool.sandbox:
            return await self._call_sandbox(tool, args, limit, t0)
        if tool.is_async:
            status, value = await self._run_async(tool, args, limit)
        else:
            status, value = await self._run_thread(tool, args, limit)
        if status == "ok" and inspect.isawaitable(value):  # a sync callable returned an awaitable
            remaining = max(0.001, limit - (time.monotonic() - t0))
            status, value = await self._await_bounded(value, remaining)
        if status == "timeout":
            return fail(TIMEOUT, f"Error: tool '{name}' did not finish within its {limit:g} s time limit and was stopped.")
        if status == "unavailable":
            return fail(UNAVAILABLE, f"Error: tool '{name}' is unavailable right now ({value}).")
        if status == "error":
            e = value
            text = str(e)
            if len(text) > 2000:
                text = text[:2000] + "..."
            return fail(EXCEPTION, f"Error: tool '{name}' raised {type(e).__name__}: {text}")
        try:
            text = _to_text(value)
        except Exception as e:
            return fail(EXCEPTION, f"Error: the result of tool '{name}' could not be converted to text "
                                   f"({type(e).__name__}: {e}).")
        if len(text) > self.max_output_chars:
            return fail(OUTPUT_TOO_LARGE, text[: self.max_output_chars]
                        + f"\n[output truncated: {len(text)} characters, limit {self.max_output_chars}]")
        return ToolResult(name, True, text, None, time.monotonic() - t0)

    async def _call_sandbox(self, tool: _Tool, args: dict, limit: float, t0: float) -> ToolResult:
        # run_sandboxed bounds its own run (timeout, then a kill). Waiting for a process slot is not
        # bounded on purpose: every process ahead in the queue is.
        return await run_sandboxed(args["code"], self.sandbox, timeout=limit,
                                   max_output_chars=self.max_output_chars, name=tool.name,
                                   slots=self._slots.get())

    async def _await_bounded(self, aw: Awaitable, limit: float) -> tuple[str, Any]:
        async def guarded():
            try:
                return ("ok", await aw)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # SystemExit inside a tool must not stop the loop
                if isinstance(e, KeyboardInterrupt):
                    raise
                return ("error", e)

        task = asyncio.ensure_future(guarded())
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if task not in done:  # ignores cancellation: abandon it (keep a reference until it ends)
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
        return ("timeout", None)

    async def _run_async(self, tool: _Tool, args: dict, limit: float) -> tuple[str, Any]:
        try:
            aw = tool.fn(**args)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return ("error", e)
        if not inspect.isawaitable(aw):
            return ("ok", aw)
        return await self._await_bounded(aw, limit)

    async def _run_thread(self, tool: _Tool, args: dict, limit: float) -> tuple[str, Any]:
        hung = self._hung
        with hung.lock:
            if hung.count >= self.max_hung_threads:
                return ("unavailable", f"{hung.count} earlier calls are still running past their time limit")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        state = {"abandoned": False, "finished": False}
        lock = threading.Lock()
        fn = tool.fn

        def deliver(outcome):
            if not fut.done():
                fut.set_result(outcome)

        def runner():
            try:
                outcome = ("ok", fn(**args))
            except BaseException as e:  # SystemExit in a tool thread is an error result too
                outcome = ("error", e)
            with lock:
                state["finished"] = True
                abandoned = state["abandoned"]
            if abandoned:
                with hung.lock:
                    hung.count -= 1
                return
            try:
                loop.call_soon_threadsafe(deliver, outcome)
            except RuntimeError:  # the loop is closed
                pass

        try:
            threading.Thread(target=runner, name=f"ossrl-tool-{tool.name}", daemon=True).start()
        except RuntimeError as e:
            return ("unavailable", f"could not start a thread: {e}")
        try:
            done, _ = await asyncio.wait({fut}, timeout=limit)
        except asyncio.CancelledError:
            done = set()
            cancelled = True
        else:
            cancelled = False
        if fut in done:
            return fut.result()
        with lock:
            finished = state["finished"]
            if not finished:  # still running: abandon the thread, count it until it ends
                state["abandoned"] = True
                with hung.lock:
                    hung.count += 1
        if cancelled:
            raise asyncio.CancelledError
        if finished:  # it finished just now; its result is already on its way to this loop
            return await fut
        return ("timeout", None)
