"""Tests of ossrl.rollout.tools: the registry, the sandboxed ``python`` tool and ``calculator``.

An attack runs only where something is known to contain it. With the audit hook on, the hook
contains it, plus whatever kernel layers this machine has. Where a test turns the hook off to
check a kernel layer on its own, it *requires* that layer: the sandbox refuses to run the code
otherwise. Writes target only files under pytest's tmp_path, never real system paths. The fork
bomb runs unbounded only where seccomp is in force (hook + seccomp). Elsewhere a self-limiting
variant runs: each child exits at once, and the loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time

import pytest

from ossrl.rollout.tools import (
    CalculatorError,
    SandboxConfig,
    ToolCall,
    ToolRegistry,
    ToolResult,
    evaluate_expression,
    probe_sandbox,
    run_sandboxed,
)
from ossrl.rollout.sandbox import LAYERS

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def layers() -> dict:
    if not sys.platform.startswith("linux"):
        return {}
    return run(probe_sandbox())


def _schema(**props) -> dict:
    return {"type": "object", "properties": {k: {"type": v} for k, v in props.items()},
            "required": list(props), "additionalProperties": False}


# ----------------------------------------------------------------------------------------------
# Registry: concurrency, timeouts, malformed calls
# ----------------------------------------------------------------------------------------------


def test_thousand_concurrent_async_calls_respect_the_limit():
    reg = ToolRegistry(builtins=False)
    active = 0
    peak = 0

    async def double(x: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.002 + (x % 7) * 0.002)
            return 2 * x
        finally:
            active -= 1

    reg.register("double", double, description="Double a number.", parameters_schema=_schema(x="integer"))
    calls = [ToolCall("double", json.dumps({"x": i})) for i in range(1000)]
    t0 = time.monotonic()
    results = run(reg.run_calls(calls, max_concurrency=64))
    elapsed = time.monotonic() - t0
    assert len(results) == 1000
    assert all(r.ok and r.content == str(2 * i) and r.error is None for i, r in enumerate(results))
    assert peak == 64  # the limit was reached and never exceeded
    assert elapsed < 10.0, elapsed  # about 1000/64 * 8 ms when nothing else runs


def test_run_calls_mixed_inputs_never_raise():
    reg = ToolRegistry()

    def boom():
        raise RuntimeError("kaput")

    reg.register("boom", boom, description="Fails.", parameters_schema={"type": "object"})
    calls = [
        ("calculator", '{"expression": "6*7"}'),
        ("nope", "{}"),
        {"name": "calculator", "arguments": "{not json"},
        ToolCall("boom"),
        ("calculator", {"expression": "1/0"}),
        42,  # not a call at all
        ("calculator", "[1, 2]"),
    ]
    results = run(reg.run_calls(calls, max_concurrency=3))
    assert [r.ok for r in results] == [True, False, False, False, False, False, False]
    assert results[0].content == "42"
    assert results[1].error == "unknown_tool" and "calculator" in results[1].content
    # calculator takes raw text when the arguments are not a JSON object: a readable error anyway
    assert results[2].error == "exception" and "CalculatorError" in results[2].content
    assert results[3].error == "exception" and "RuntimeError: kaput" in results[3].content
    assert results[4].error == "exception" and "division by zero" in results[4].content
    assert results[5].error == "bad_arguments"
    assert results[6].error == "exception"
    assert all(isinstance(r, ToolResult) and r.content for r in results)


def test_bad_arguments_give_error_results():
    reg = ToolRegistry(builtins=False)

    def add(a: int, b: int = 0) -> int:
        return a + b

    def loose(a):
        return a

    reg.register("add", add, description="Add.", parameters_schema={
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a"], "additionalProperties": False})
    reg.register("loose", loose, description="Schema lets anything through.",
                 parameters_schema={"type": "object"})

    def call(name, args):
        return run(reg.call(name, args))

    assert call("add", '{"a": 2, "b": 3}').content == "5"
    assert call("add", {"a": 2}).content == "2"
    cases = {
        '{"a": 2': "not valid JSON",
        '"a"': "must be a JSON object",
        "[1]": "must be a JSON object",
        '{"b": 1}': "missing required argument 'a'",
        '{"a": "two"}': "expected integer, got string",
        '{"a": true}': "expected integer, got boolean",
        '{"a": 1.5}': "expected integer, got number",
        '{"a": 1, "c": 2}': "unexpected argument 'c'",
        "[" * 100_000: "not valid JSON",  # deeply nested garbage
    }
    for args, msg in cases.items():
        r = call("add", args)
        assert not r.ok and r.error == "bad_arguments" and msg in r.content, (args, r)
    r = call("loose", '{"b": 1}')  # passes the schema, fails the signature
    assert r.error == "bad_arguments" and "a" in r.content
    r = call("missing", "{}")
    assert r.error == "unknown_tool" and "add" in r.content
    r = run(reg.call(None, "{}"))  # type: ignore[arg-type]
    assert r.error == "unknown_tool"


def test_exceptions_exits_and_large_outputs_become_results():
    reg = ToolRegistry(builtins=False, max_output_chars=1000)

    def exiting():
        sys.exit(3)

    async def async_exiting():
        raise SystemExit(4)

    class Weird:
        def __str__(self):
            raise ValueError("no text")

    reg.register("exit", exiting, description="", parameters_schema={"type": "object"})
    reg.register("aexit", async_exiting, description="", parameters_schema={"type": "object"})
    reg.register("weird", lambda: Weird(), description="", parameters_schema={"type": "object"})
    reg.register("big", lambda: "x" * 1_000_000, description="", parameters_schema={"type": "object"})
    reg.register("obj", lambda: {"a": [1, 2]}, description="", parameters_schema={"type": "object"})
    r = run(reg.call("exit"))
    assert r.error == "exception" and "SystemExit" in r.content
    r = run(reg.call("aexit"))
    assert r.error == "exception" and "SystemExit" in r.content
    r = run(reg.call("weird"))
    assert r.error == "exception" and "no text" in r.content
    r = run(reg.call("big"))
    assert r.error == "output_too_large" and r.content.startswith("x" * 1000) and len(r.content) < 1200
    assert run(reg.call("obj")).content == '{"a": [1, 2]}'


def test_async_call_that_never_returns_is_cut_off():
    reg = ToolRegistry(builtins=False)

    async def forever():
        await asyncio.Event().wait()

    async def stubborn():  # swallows the first cancellation, then finishes on its own
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
        return "late"

    reg.register("forever", forever, description="", parameters_schema={"type": "object"})
    reg.register("stubborn", stubborn, description="", parameters_schema={"type": "object"})

    async def main():
        t0 = time.monotonic()
        a, b = await asyncio.gather(reg.call("forever", "{}", timeout=0.3),
                                    reg.call("stubborn", "{}", timeout=0.3))
        return a, b, time.monotonic() - t0

    a, b, elapsed = run(main())
    assert a.error == "timeout" and "0.3 s" in a.content
    assert b.error == "timeout"
    assert elapsed < 1.5


def test_sync_call_that_never_returns_is_cut_off():
    reg = ToolRegistry(builtins=False, max_hung_threads=1)
    release = threading.Event()

    def hang():
        release.wait()  # a hung sync tool (released at the end so the thread ends)
        return "done"

    reg.register("hang", hang, description="", parameters_schema={"type": "object"}, timeout=0.3)
    reg.register("ok", lambda: "fine", description="", parameters_schema={"type": "object"})
    try:
        t0 = time.monotonic()
        r = run(reg.call("hang"))
        assert r.error == "timeout" and time.monotonic() - t0 < 1.5
        assert reg.hung_threads == 1
        # at the limit of hung threads, further sync calls are refused rather than piling up
        r = run(reg.call("ok"))
        assert r.error == "unavailable"
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while reg.hung_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reg.hung_threads == 0
    assert run(reg.call("ok")).content == "fine"


def test_sync_tools_run_off_the_event_loop():
    reg = ToolRegistry(builtins=False)
    reg.register("nap", lambda s: time.sleep(s) or "rested", description="",
                 parameters_schema=_schema(s="number"))
    t0 = time.monotonic()
    results = run(reg.run_calls([("nap", {"s": 0.2})] * 16, max_concurrency=16))
    assert all(r.content == "rested" for r in results)
    assert time.monotonic() - t0 < 1.5  # 16 x 0.2 s in parallel threads


def test_register_checks_its_arguments():
    reg = ToolRegistry()
    with pytest.raises(ValueError):
        reg.register("calculator", len, description="", parameters_schema={"type": "object"})
    with pytest.raises(ValueError):
        reg.register("bad name!", len, description="", parameters_schema={"type": "object"})
    with pytest.raises(ValueError):
        reg.register("x", len, description="", parameters_schema={"type": "array"})
    with pytest.raises(ValueError):
        ToolRegistry(builtins=["shell"])
    names = {s["name"] for s in reg.specs()}
    assert names == {"python", "calculator"}
    assert all(s["parameters"]["type"] == "object" and s["description"] for s in reg.specs())


# ----------------------------------------------------------------------------------------------
# Calculator
# ----------------------------------------------------------------------------------------------


def test_calculator_values():
    assert evaluate_expression("2 + 3 * 4") == 14
    assert evaluate_expression("(17 + 25) * 3 / 2") == 63.0
    assert evaluate_expression("-7 % 3") == 2 and evaluate_expression("7 // 2") == 3
    assert evaluate_expression("2 ** 10") == 1024 and evaluate_expression("2^10") == 1024
    assert evaluate_expression("sqrt(16) + max(1, 5, 3)") == 9.0
    assert evaluate_expression("10 ** -2") == pytest.approx(0.01)
    assert evaluate_expression("round(pi, 2)") == 3.14
    reg = ToolRegistry(builtins=["calculator"])
    assert run(reg.call("calculator", '{"expression": "0.1 + 0.2"}')).content == "0.3"
    assert run(reg.call("calculator", '{"expression": "12345678901234567890 * 10"}')).content == "123456789012345678900"
    assert run(reg.call("calculator", "(3 + 4) * 12")).content == "84"  # raw text, not JSON


@pytest.mark.parametrize("expr", [
    "9**9**9", "2**100000", "10**10**10", "(2**4000)**(2**4000)", "1e308 * 10", "exp(1000)",
    "1/0", "0 ** -1", "(-8) ** (1/3)", "sqrt(-1)", "__import__('os').system('true')", "x",
    "().__class__", "lambda: 1", "'a' * 3", "[1] * 10", "True + 1", "1j", "", "1 +", "1" + "+1" * 600,
    "factorial(100000)",
])
def test_calculator_rejects(expr):
    t0 = time.monotonic()
    with pytest.raises(CalculatorError):
        evaluate_expression(expr)
    assert time.monotonic() - t0 < 0.5
    r = run(ToolRegistry(builtins=["calculator"]).call("calculator", {"expression": expr}))
    assert not r.ok and r.error == "exception" and "CalculatorError" in r.content


# ----------------------------------------------------------------------------------------------
# The sandbox
# ----------------------------------------------------------------------------------------------


def _py(code: str, timeout: float = 5.0, config: SandboxConfig | None = None) -> ToolResult:
    return run(run_sandboxed(code, config, timeout=timeout))


@linux_only
def test_sandbox_runs_normal_code():
    r = _py("print(sum(range(10)))")
    assert r.ok and r.error is None and r.content == "45\n", r
    reg = ToolRegistry()
    r = run(reg.call("python", json.dumps({"code": "import math, json\nprint(json.dumps([math.factorial(5)]))"})))
    assert r.ok and r.content == "[120]\n", r
    r = run(reg.call("python", "print('raw code, not JSON')"))  # GPT-OSS style
    assert r.ok and r.content == "raw code, not JSON\n", r
    r = _py("open('notes.txt', 'w').write('kept'); print(open('notes.txt').read())")
    assert r.ok and r.content == "kept\n", r


@linux_only
def test_sandbox_errors_are_readable():
    r = _py("1/0")
    assert r.error == "exception" and "ZeroDivisionError" in r.content and "<code>" in r.content
    assert "hook" not in r.content and "<string>" not in r.content  # the sandbox's own frames hidden
    r = _py("def f(:")
    assert r.error == "exception" and "SyntaxError" in r.content
    r = _py("import sys; print('bye'); sys.exit(3)")
    assert r.error == "nonzero_exit" and r.content.startswith("bye\n")
    r = _py("print(input())")
    assert r.error == "exception" and "EOFError" in r.content


@linux_only
def test_sandbox_environment_is_fresh_and_minimal(monkeypatch):
    monkeypatch.setenv("OSSRL_TEST_SECRET", "hunter2")
    r = _py("import os, sys; print(os.getcwd()); print(sorted(os.environ)); print(os.listdir('.'));"
            "print(any('site-packages' in p for p in sys.path))")
    assert r.ok, r
    cwd, env, listing, site = r.content.splitlines()
    assert "OSSRL_TEST_SECRET" not in env and "hunter2" not in r.content
    assert listing == "[]" and site == "False"
    assert not os.path.exists(cwd)  # the temporary directory is gone


@linux_only
def test_sandbox_sleep_forever_is_cut_off():
    t0 = time.monotonic()
    r = _py("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(1000)", timeout=1.0)
    assert r.error == "timeout" and r.content.startswith("started"), r
    assert time.monotonic() - t0 < 4.0
    reg = ToolRegistry()
    r = run(reg.call("python", {"code": "import time; time.sleep(10**6)"}, timeout=0.5))
    assert r.error == "timeout"


@linux_only
def test_sandbox_cpu_limit():
    r = _py("while True:\n    pass", timeout=20.0, config=SandboxConfig(cpu_seconds=1))
    assert r.error == "cpu_limit", r
    assert r.seconds < 10


def _attacks(tmp_path) -> dict[str, tuple[str, tuple[str, ...], str | None]]:
    """name -> (code, acceptable error kinds, text that must not leak into the result)."""
    outside = tmp_path / "outside.txt"
    secret_file = tmp_path / "trainer_secret.txt"
    secret_file.write_text("TOP-SECRET-TOKEN")
    here = os.path.abspath(__file__)
    return {
        "read /etc/passwd": ("print(open('/etc/passwd').read())", ("sandbox_violation", "exception"), "root:"),
        "read the test's own file": (f"print(open({here!r}).read())", ("sandbox_violation", "exception"),
                                     "TOP-SECRET" + "-MARKER-IN-THIS-FILE"),
        "read a trainer file": (f"print(open({str(secret_file)!r}).read())", ("sandbox_violation", "exception"),
                                "TOP-SECRET-TOKEN"),
        "list the trainer's directory": (f"import os; print(os.listdir({str(tmp_path)!r}))",
                                         ("sandbox_violation", "exception"), "trainer_secret"),
        "write outside": (f"open({str(outside)!r}, 'w').write('pwned')", ("sandbox_violation", "exception"), None),
        "socket": ("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')",
                   ("sandbox_violation", "exception"), "connected"),
        "subprocess": ("import subprocess\nprint(subprocess.run(['id'], capture_output=True))",
                       ("sandbox_violation", "exception"), "uid="),
        "memory": ("x = []\nwhile True:\n    x.append(bytearray(8 << 20))", ("memory_limit",), None),
        "print 100 MB": ("import sys\nfor _ in range(100):\n    sys.stdout.write('y' * (1 << 20))",
                         ("output_too_large",), None),
    }


# Self-limiting: a child that gets through exits at once, and the loop is bounded.
_SAFE_FORK_LOOP = "import os\nfor _ in range(10000):\n    if os.fork() == 0:\n        os._exit(0)\nprint('forked')"
_FORK_BOMB = "import os\nwhile True:\n    os.fork()"


def _fork_code(layers: dict) -> str:
    return _FORK_BOMB if layers.get("seccomp") is True else _SAFE_FORK_LOOP


@linux_only
def test_sandbox_stops_attacks_and_keeps_working(tmp_path, layers):
    attacks = _attacks(tmp_path)
    attacks["fork bomb"] = (_fork_code(layers), ("sandbox_violation", "exception"), "forked")
    reg = ToolRegistry(sandbox=SandboxConfig(memory_bytes=256 << 20), max_output_chars=4000)
    names = list(attacks)
    calls = []
    for name in names:  # interleave normal calls: they must still work
        calls.append(("python", {"code": attacks[name][0]}, 5.0))
        calls.append(("python", {"code": f"print({len(calls)} * 2)"}, 5.0))
    t0 = time.monotonic()
    results = run(reg.run_calls(calls, max_concurrency=4))
    assert time.monotonic() - t0 < 30
    for i, name in enumerate(names):
        r, normal = results[2 * i], results[2 * i + 1]
        _, kinds, leak = attacks[name]
        assert not r.ok and r.error in kinds, (name, r)
        if leak:
            assert leak not in r.content, (name, r.content)
        assert len(r.content) <= 4000 + 200
        assert normal.ok and normal.content == f"{(2 * i + 1) * 2}\n", (name, normal)
    assert not (tmp_path / "outside.txt").exists()
    assert run(reg.call("python", {"code": "print('still alive')"})).content == "still alive\n"


@linux_only
@pytest.mark.parametrize("layer", ["landlock", "seccomp"])
def test_kernel_layers_hold_without_the_audit_hook(tmp_path, layers, layer):
    """The audit hook is not a boundary; the kernel layers must stop these on their own."""
    if layers.get(layer) is not True:
        pytest.skip(f"{layer} is not available here: {layers.get(layer)}")
    # require= makes the sandbox refuse to run the code unless the layer is in force
    cfg = SandboxConfig(audit_hook=False, require=(layer,), memory_bytes=256 << 20)
    attacks = _attacks(tmp_path)
    if layer == "landlock":
        names = ["read /etc/passwd", "read the test's own file", "read a trainer file",
                 "list the trainer's directory", "write outside"]
    else:
        attacks["fork bomb"] = (_FORK_BOMB, ("exception",), None)
        names = ["socket", "subprocess", "fork bomb"]
    for name in names:
        code, kinds, leak = attacks[name]
        r = _py(code, timeout=5.0, config=cfg)
        assert not r.ok and r.error == "exception" and "PermissionError" in r.content, (name, r)
        if leak:
            assert leak not in r.content
    assert not (tmp_path / "outside.txt").exists()
    assert _py("print(6 * 7)", config=cfg).content == "42\n"


@linux_only
def test_required_layer_missing_refuses_to_run():
    # Disable seccomp but require it: the code must not run.
    cfg = SandboxConfig(seccomp=False, require=("seccomp",))
    r = _py("print('ran')", config=cfg)
    assert r.error == "sandbox_error" and "ran\n" not in r.content, r


@linux_only
def test_sandbox_layers_reported(layers):
    assert layers.get("rlimits") is True and layers.get("audit_hook") is True, layers
    # the others depend on the kernel and privileges; print them for the log
    print("sandbox layers:", layers)


# A marker the sandboxed code must never be able to read out of this file:
# TOP-SECRET-MARKER-IN-THIS-FILE


# ---- what root could still do to the trainer or the host (the probes), one test each ----

_X86 = os.uname().machine == "x86_64"
_LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
_RAISE = "\nif r != 0:\n    raise PermissionError(ctypes.get_errno(), 'refused')\nprint('ESCAPED')"
_HOST_ATTACKS = {
    "pidfd_send_signal to the trainer": "import os, signal\n"
        "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGUSR1)\nprint('ESCAPED')",
    "rt_sigqueueinfo to the trainer": _LIBC + "buf = ctypes.create_string_buffer(128)\n"
        f"r = libc.syscall({129 if _X86 else 138}, os.getppid(), 10, buf)" + _RAISE,
    "rt_tgsigqueueinfo to the trainer": _LIBC + "buf = ctypes.create_string_buffer(128)\n"
        f"r = libc.syscall({297 if _X86 else 240}, os.getppid(), os.getppid(), 10, buf)" + _RAISE,
    "renice the trainer": "import os\nos.setpriority(os.PRIO_PROCESS, os.getppid(), 19)\nprint('ESCAPED')",
    "pin the trainer to one core": "import os\nos.sched_setaffinity(os.getppid(), {0})\nprint('ESCAPED')",
    "real-time priority for itself": "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n"
        "print('ESCAPED')",
    "set the host name (to itself)": _LIBC + "n = os.uname().nodename.encode()\nr = libc.sethostname(n, len(n))" + _RAISE,
    "set the clock (a no-op adjtimex read is fine, a set is not)": _LIBC +
        "import time\nclass TV(ctypes.Structure):\n    _fields_ = [('s', ctypes.c_long), ('us', ctypes.c_long)]\n"
        "t = time.time()\nr = libc.settimeofday(ctypes.byref(TV(int(t), int(t % 1 * 1e6))), None)" + _RAISE,
    "extended attributes": "import os\nopen('f', 'w').close()\nos.setxattr('f', 'user.x', b'1')\nprint('ESCAPED')",
    "timestamps": "import os\nopen('f', 'w').close()\nos.utime('f', (0, 0))\nprint('ESCAPED')",
    "fanotify (could block the host's open())": _LIBC +
        f"fd = libc.syscall({300 if _X86 else 262}, 0, 0)\nr = 0 if fd >= 0 else -1" + _RAISE,
    "inode flags (immutable)": "import fcntl, os, struct\nfd = os.open('.', os.O_RDONLY)\n"
        "fcntl.ioctl(fd, 0x40086602, struct.pack('l', 0))\nprint('ESCAPED')",
}


@linux_only
@pytest.mark.parametrize("hook, landlock", [(False, False), (False, True), (True, True)],
                         ids=["no-hook-no-landlock", "no-hook", "all-layers"])
def test_sandbox_cannot_signal_reschedule_or_touch_the_host(layers, hook, landlock):
    """seccomp alone (audit hook off, Landlock off: an old kernel, a container) must stop what
    root could otherwise do to the trainer and the host; the trainer must receive no signal."""
    if layers.get("seccomp") is not True:
        pytest.skip(f"seccomp is not available here: {layers.get('seccomp')}")
    if landlock and layers.get("landlock") is not True:
        pytest.skip("landlock is not available here")
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    affinity, nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    try:
        cfg = SandboxConfig(audit_hook=hook, landlock=landlock, require=("seccomp",), memory_bytes=256 << 20)
        for name, code in _HOST_ATTACKS.items():
            r = _py(code, config=cfg)
            assert not r.ok and "ESCAPED" not in r.content, (name, r)
            assert r.error in ("exception", "sandbox_violation") and ("PermissionError" in r.content or
                                                                      "SandboxViolation" in r.content), (name, r)
        time.sleep(0.2)
        assert got == [], "the trainer received a signal from the sandbox"
        assert os.sched_getaffinity(0) == affinity and os.getpriority(os.PRIO_PROCESS, 0) == nice
        assert _py("print(6 * 7)", config=cfg).content == "42\n"
    finally:
        signal.signal(signal.SIGUSR1, old)
        os.sched_setaffinity(0, affinity)


def _set_inode_flags(path, flags) -> bool:
    import fcntl
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("l", flags))  # FS_IOC_SETFLAGS
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@linux_only
def test_cleanup_follows_no_symlink_the_sandbox_made(tmp_path):
    """The cleanup's fix-and-retry chmod-ed a host directory 0700 through a symlink the code
    left in a directory it could not empty (read-only; as root: immutable)."""
    from ossrl.rollout.sandbox import _rmtree

    host = tmp_path / "host_dir"
    host.mkdir()
    host.chmod(0o755)
    d = tmp_path / "sandbox_tmp"
    (d / "ro").mkdir(parents=True)
    os.symlink(host, d / "ro" / "link")
    os.symlink(host, d / "link")
    stuck = _set_inode_flags(d / "ro", 0x10) if os.geteuid() == 0 else ((d / "ro").chmod(0o500) or True)
    if not stuck:
        pytest.skip("cannot make a directory immutable here (filesystem or capability)")
    try:
        _rmtree(str(d))
    finally:
        if os.geteuid() == 0:
            _set_inode_flags(d / "ro", 0)
    assert (host.stat().st_mode & 0o777) == 0o755 and host.is_dir()




@linux_only
def test_probe_says_what_is_exposed_without_each_layer(layers):
    if all(layers.get(k) is True for k in LAYERS):
        assert layers["exposed"] == [], layers  # every layer holds: nothing to report
    bare = run(probe_sandbox(SandboxConfig(landlock=False, seccomp=False, mounts=False, drop_privileges=False)))
    assert all(bare.get(k) is not True for k in ("landlock", "seccomp", "mounts", "privileges")), bare
    text = " ".join(bare["exposed"])
    for gap in ("file reads", "no mount namespace", "no total disk limit", "privileges not dropped",
                "process creation"):
        assert gap in text, (gap, text)
    for layer, gap in (("landlock", "file reads"), ("mounts", "no mount namespace"),
                       ("seccomp", "process creation"), ("privileges", "privileges not dropped")):
        if layers.get(layer) is True:
            assert gap not in " ".join(layers["exposed"]), (layer, layers)


def test_require_names_only_known_layers():
    with pytest.raises(ValueError, match="unknown layer"):
        SandboxConfig(require=("landlok",))
    with pytest.raises(ValueError, match="disk_bytes"):
        SandboxConfig(disk_bytes=0)


def _needs(layers, *names):
    missing = [n for n in names if layers.get(n) is not True]
    if missing:
        pytest.skip(f"not available here: {[(n, layers.get(n)) for n in missing]}")


@linux_only
@pytest.mark.parametrize("landlock", [False, True], ids=["no-landlock", "landlock"])
def test_no_capabilities_no_root_and_no_writes_outside_without_the_hook(tmp_path, layers, landlock):
    """The hook off (as native code can switch it off) and Landlock off or on: the code holds
    no capabilities, is not uid 0, and cannot write, chmod or create anything outside."""
    _needs(layers, "mounts", "privileges", *(["landlock"] if landlock else []))
    host = tmp_path / "host.txt"
    host.write_text("original")
    host.chmod(0o666)  # even a world-writable host file stays unchanged
    cfg = SandboxConfig(audit_hook=False, landlock=landlock, require=("mounts", "privileges"))
    caps = _py("import ctypes, json, os\nh = (ctypes.c_uint32 * 2)(0x20080522, 0)\nd = (ctypes.c_uint32 * 6)()\n"
               "assert ctypes.CDLL(None).capget(h, d) == 0\nprint(json.dumps([list(d), os.getuid(), os.getgid()]))",
               config=cfg)
    assert caps.ok, caps
    values, uid, gid = json.loads(caps.content)
    assert values == [0] * 6, caps.content  # effective, permitted, inheritable: empty
    if os.geteuid() == 0:
        assert uid != 0 and gid != 0, caps.content
    for name, code in {
        "write a world-writable host file": f"open({str(host)!r}, 'w').write('pwned')",
        "create a file in /tmp": "open('/tmp/ossrl-escape-probe', 'w').write('x')",
        "create a file in /dev/shm": "open('/dev/shm/ossrl-escape-probe', 'w').write('x')",
        "chmod a host file": f"import os\nos.chmod({str(host)!r}, 0o777)",
    }.items():
        r = _py(code + "\nprint('ESCAPED')", config=cfg)
        assert not r.ok and "ESCAPED" not in r.content and r.error == "exception", (name, r)
        assert "PermissionError" in r.content or "Read-only file system" in r.content, (name, r)
    assert host.read_text() == "original" and (host.stat().st_mode & 0o777) == 0o666
    assert not os.path.exists("/tmp/ossrl-escape-probe") and not os.path.exists("/dev/shm/ossrl-escape-probe")
    assert _py("open('ok', 'w').write('1')\nprint(open('ok').read())", config=cfg).content == "1\n"


@linux_only
def test_working_directory_has_a_total_size_limit(layers):
    _needs(layers, "mounts")
    cfg = SandboxConfig(audit_hook=False, require=("mounts",), disk_bytes=8 << 20, file_size_bytes=4 << 20)
    code = ("import os\nfor i in range(20):\n    with open('f%d' % i, 'wb') as f:\n"
            "        f.write(b'x' * (3 << 20))\n    print(i, flush=True)")
    r = _py(code, config=cfg)
    assert not r.ok and r.error == "exception" and "No space left on device" in r.content, r
    assert "2\n" not in r.content  # the third 3 MiB file does not fit in 8 MiB
    assert _py("print(1)", config=cfg).content == "1\n"  # the next call has a fresh directory


@linux_only
def test_no_native_code_from_its_directory_and_no_installed_packages(layers):
    """A library it writes cannot be mapped as code (noexec; memfd_create refused), and the
    interpreter's site-packages are empty inside, so cffi and the like do not import."""
    _needs(layers, "mounts", "seccomp")
    cfg = SandboxConfig(audit_hook=False, require=("mounts", "seccomp"))
    r = _py("import mmap, os\nopen('lib.so', 'wb').write(b'\\x7fELF' + bytes(4092))\n"
            "fd = os.open('lib.so', os.O_RDONLY)\nmmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)\n"
            "print('ESCAPED')", config=cfg)
    assert not r.ok and "ESCAPED" not in r.content and "PermissionError" in r.content, r
    r = _py("import os\nos.memfd_create('x')\nprint('ESCAPED')", config=cfg)
    assert not r.ok and "ESCAPED" not in r.content and "PermissionError" in r.content, r
    import sysconfig

    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    if not os.path.isdir(base) or not os.listdir(base):
        pytest.skip(f"no base site-packages with anything in it here ({base})")
    r = _py(f"import os\nprint(os.listdir({base!r}))", config=cfg)
    assert r.ok and r.content == "[]\n", (base, r)


@linux_only
def test_hook_runs_no_method_of_the_callers_objects():
    """The issue's bypass: a str subclass whose __eq__ runs inside the hook during an import."""
    code = ("class S(str):\n    __hash__ = str.__hash__\n    def __eq__(self, o):\n"
            "        print('EQ-RAN', flush=True)\n        return str.__eq__(self, o)\n"
            "__import__(S('ctypes'))\nprint('ESCAPED')")
    r = _py(code)
    assert not r.ok and r.error == "sandbox_violation" and "EQ-RAN" not in r.content, r
    r = _py("class M(str):\n    def __contains__(self, x):\n        print('IN-RAN')\n        return False\n"
            "open('/etc/passwd', M('r')).read()\nprint('ESCAPED')")
    assert not r.ok and "IN-RAN" not in r.content and "ESCAPED" not in r.content, r


@linux_only
def test_hook_path_check_fails_closed_on_long_relative_paths():
    """A relative path under 4096 bytes whose absolute form is longer: the hook used to treat
    what it could not lstat as a plain name, so a symlink deep inside went unchecked."""
    cfg = SandboxConfig(landlock=False)  # the hook alone stands between the code and /etc
    code = ("import os\nrel = ''\nwhile len(rel) + 201 <= 4077:\n    rel += 'd' * 200 + '/'\n    os.mkdir(rel)\n"
            "rel += 'e' * (4077 - len(rel)) + '/'\nos.mkdir(rel)\nassert len(os.getcwd()) + len(rel) >= 4094\n"
            "os.symlink('/etc', rel + 's')\nprint(open(rel + 's/passwd').read())")
    r = _py(code, config=cfg)
    assert not r.ok and r.error == "sandbox_violation" and "root:" not in r.content, r


_AS_USER_SCRIPT = """
import asyncio, json, os, sys
from ossrl.rollout.sandbox import SandboxConfig, probe_sandbox, run_sandboxed
host = sys.argv[1]
cfg = SandboxConfig(audit_hook=False, landlock=False)
out = {"uid": os.geteuid(), "layers": asyncio.run(probe_sandbox()), "runs": {}}
for name, code in {
    "write a host file": "open(%r, 'w').write('pwned')" % host,
    "create in /tmp": "open('/tmp/ossrl-user-probe', 'w')",
    "capabilities": "import ctypes\\nh = (ctypes.c_uint32 * 2)(0x20080522, 0)\\nd = (ctypes.c_uint32 * 6)()\\n"
                    "ctypes.CDLL(None).capget(h, d)\\nprint(list(d))",
}.items():
    r = asyncio.run(run_sandboxed(code, cfg))
    out["runs"][name] = [r.ok, r.error, r.content]
print(json.dumps(out))
"""


@linux_only
def test_sandbox_layers_hold_for_an_unprivileged_trainer(tmp_path):
    """The trainer as an ordinary user (uid 1000 in a user namespace, as ``unshare --map-user``
    makes it): the sandbox builds its mount and network namespaces inside a new user namespace
    and still keeps its hands off the host's files, with the hook and Landlock off."""
    import shutil
    import subprocess

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) here")
    host = tmp_path / "host.txt"
    host.write_text("original")
    host.chmod(0o666)
    proc = subprocess.run([unshare, "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c",
                           _AS_USER_SCRIPT, str(host)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"user namespaces are not available here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    layers = out["layers"]
    assert out["uid"] == 1000
    if layers.get("mounts") is not True:
        pytest.skip(f"no nested user namespace for the sandbox here: {layers}")
    assert layers["userns"] is True and layers["privileges"] is True and layers["uid"] == 1000, layers
    runs = out["runs"]
    for name in ("write a host file", "create in /tmp"):
        ok, error, content = runs[name]
        assert not ok and error == "exception" and "Read-only file system" in content, (name, runs[name])
    ok, _, content = runs["capabilities"]
    assert ok and content == "[0, 0, 0, 0, 0, 0]\n", runs["capabilities"]
    assert host.read_text() == "original" and not os.path.exists("/tmp/ossrl-user-probe")
