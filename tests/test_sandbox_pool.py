"""The warm sandbox pool (one zygote forks a child per call), python_session and the tool metrics.

The hostile-code tests of test_tools.py run through the pool too (it is on by default); these
check what the pool adds: nothing of one call reaches the next, the zygote's own life (idle stop,
death), that no process outlives its call, sessions, and hostile calls mixed with ordinary ones
under load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest

from ossrl.rollout.sandbox import SandboxConfig, probe_sandbox, run_sandboxed
from ossrl.rollout.sandbox_pool import pool_for
from ossrl.rollout.tool_metrics import tool_step_metrics
from ossrl.rollout.tools import ToolRegistry

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

def run(coro):
    return asyncio.run(coro)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_until(pred, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _children(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (a zygote's are its calls' processes, and their
    orphans: it is their subreaper)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent:
            out.append(int(d))
    return out


_FIRST = """
import builtins, os, sys
open('mine.txt', 'w').write('FIRST-CALL-SECRET')
os.environ['OSSRL_LEAK'] = 'FIRST-CALL-ENV'
builtins.OSSRL_LEAK = 1
sys.modules['ossrl_leak'] = sys
kept = [open('mine.txt') for _ in range(5)] + [os.dup(1) for _ in range(5)]
print(os.getcwd())
"""

_SECOND = """
import builtins, os, sys
def fds():
    out = []
    for fd in range(3, 64):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            pass
    return out
try:
    earlier = open(sys.argv_first + '/mine.txt').read()
except Exception as e:
    earlier = type(e).__name__
print(json.dumps({"listing": os.listdir('.'), "env": os.environ.get('OSSRL_LEAK'),
                  "builtin": hasattr(builtins, 'OSSRL_LEAK'), "module": 'ossrl_leak' in sys.modules,
                  "fds": fds(), "earlier": earlier}))
"""


@pytest.mark.parametrize("cfg", [SandboxConfig(), SandboxConfig(mounts=False), SandboxConfig(pool=False)],
                         ids=["pool", "pool-without-mounts", "fresh-process"])
def test_a_call_sees_nothing_of_an_earlier_call(cfg):
    async def go():
        first = await run_sandboxed(_FIRST, cfg)
        assert first.ok, first
        cwd = first.content.strip()
        starts = pool_for(cfg).starts
        second = await run_sandboxed("import json\nimport sys\nsys.argv_first = %r\n%s" % (cwd, _SECOND), cfg)
        assert pool_for(cfg).starts == starts  # the same warm zygote ran both (or none did)
        return cwd, second

    cwd, second = run(go())
    assert second.ok, second
    seen = json.loads(second.content)
    assert seen["listing"] == [] and seen["env"] is None, seen
    assert not seen["builtin"] and not seen["module"], seen
    assert seen["fds"] == [], seen  # only its own stdin, stdout and stderr
    assert seen["earlier"] in ("FileNotFoundError", "SandboxViolation", "PermissionError"), seen
    assert "FIRST-CALL" not in second.content
    assert not os.path.exists(cwd)  # the first call's directory went with it


def test_no_process_outlives_its_call():
    cfg = SandboxConfig()
    code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)"
    r = run(run_sandboxed(code, cfg, timeout=0.5))
    assert r.error == "timeout", r
    pid = int(r.content.split()[0])
    assert not _alive(pid)  # the zygote reaps a child before it reports the exit
    flood = run(run_sandboxed("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    print('y' * 4096)",
                              cfg, timeout=10.0, max_output_chars=20_000))
    assert flood.error == "output_too_large", flood
    assert not _alive(int(flood.content.split()[0]))


def _set_up(pid: int) -> bool:
    """Whether a call's process is past its namespaces: no_new_privs is set after them."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "NoNewPrivs:\t1" in f.read()
    except OSError:
        return False


def _netns_of_a_call(cfg) -> tuple[str, str]:
    """(the zygote's network namespace, that of a call's process), read from outside."""
    async def go():
        task = asyncio.ensure_future(run_sandboxed("import time\ntime.sleep(30)", cfg, timeout=20.0))
        deadline = time.monotonic() + 20
        while True:
            z = pool_for(cfg).current()
            pids = [p.pid for p in list(z._calls.values()) if p.pid] if z is not None else []
            if pids and _set_up(pids[0]):
                break
            assert time.monotonic() < deadline, "the call never started"
            await asyncio.sleep(0.02)
        try:
            return os.readlink(f"/proc/{z.proc.pid}/ns/net"), os.readlink(f"/proc/{pids[0]}/ns/net")
        finally:
            task.cancel()

    return run(go())


def test_a_call_has_its_own_network_namespace_unless_seccomp_refuses_it_every_socket():
    layers = run(probe_sandbox(SandboxConfig()))
    if layers.get("netns") is not True or layers.get("seccomp") is not True:
        pytest.skip(f"no network namespace or no seccomp here: {layers}")
    # seccomp refuses socket, socketpair and io_uring: nothing to separate, the zygote's empty one is shared
    zygote, call = _netns_of_a_call(SandboxConfig(pool_idle_seconds=61.0))
    assert call == zygote and call != os.readlink("/proc/self/ns/net")
    zygote, call = _netns_of_a_call(SandboxConfig(seccomp=False, pool_idle_seconds=61.0))
    assert call != zygote and call != os.readlink("/proc/self/ns/net")


def test_a_call_whose_seccomp_fails_in_the_shared_network_namespace_does_not_run(monkeypatch):
    import ossrl.rollout.sandbox_pool as sp

    layers = run(probe_sandbox(SandboxConfig()))
    if layers.get("netns") is not True or layers.get("seccomp") is not True:
        pytest.skip(f"no network namespace or no seccomp here: {layers}")
    # the zygote's own check passes; the filter then fails in the calls' children only
    src = sp._ZYGOTE_SOURCE.replace("def _seccomp(ctypes, libc):\n", "def _seccomp(ctypes, libc):\n"
                                    "    if _cfg['tmp'] == _WORK[0]:\n        return 'failed: injected'\n", 1)
    assert src != sp._ZYGOTE_SOURCE
    monkeypatch.setattr(sp, "_ZYGOTE_SOURCE", src)
    monkeypatch.setattr(sp, "_CODE", [])
    cfg = SandboxConfig(pool_idle_seconds=62.0)
    try:
        r = run(run_sandboxed("print('ran')", cfg))
        assert not r.ok and r.error == "sandbox_error" and "seccomp" in r.content and "ran" not in r.content, r
    finally:
        z = pool_for(cfg).current()
        if z is not None:
            z.close()


def test_an_idle_zygote_is_stopped_and_the_next_call_starts_another():
    cfg = SandboxConfig(pool_idle_seconds=0.2)
    assert run(run_sandboxed("print(1)", cfg)).content == "1\n"
    pool = pool_for(cfg)
    proc = pool.zygote.proc
    _wait_until(lambda: pool.current() is None and proc.poll() is not None, "the idle zygote stops")
    assert run(run_sandboxed("print(2)", cfg)).content == "2\n"
    assert pool.starts == 2


def test_a_zygote_that_dies_fails_its_calls_and_is_replaced():
    cfg = SandboxConfig(pool_idle_seconds=600.0)

    async def go():
        assert (await run_sandboxed("pass", cfg)).ok
        zygote = pool_for(cfg).current()
        task = asyncio.ensure_future(run_sandboxed("import time\ntime.sleep(60)", cfg, timeout=30.0))
        deadline = time.monotonic() + 30
        while not any(p.pid for p in list(zygote._calls.values())):
            assert time.monotonic() < deadline, "the call never started"
            await asyncio.sleep(0.02)
        child = next(p.pid for p in list(zygote._calls.values()) if p.pid)
        os.kill(zygote.proc.pid, signal.SIGKILL)
        return await task, child

    r, child = run(go())
    assert r.error == "sandbox_error" and "zygote" in r.content, r
    _wait_until(lambda: not _alive(child), "the orphaned child is killed", 10.0)
    assert run(run_sandboxed("print('again')", cfg)).content == "again\n"


def test_a_zygote_that_cannot_start_says_why(tmp_path):
    """What the interpreter printed comes back in the error (not a closed log file's ValueError),
    and a call fails with it as sandbox_error instead of raising."""
    from ossrl.rollout.sandbox_pool import PoolError, Zygote

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no interpreter here' >&2\nexit 3\n")
    fake.chmod(0o755)
    cfg = SandboxConfig(python=str(fake))
    with pytest.raises(PoolError, match="did not start: no interpreter here"):
        Zygote(cfg, ["/usr/lib"], 60.0)
    for c in (cfg, SandboxConfig(python=str(fake), pool=False)):  # its sys.path cannot be asked either
        r = run(run_sandboxed("print(1)", c))
        assert not r.ok and r.error == "sandbox_error" and "no interpreter here" in r.content, r


def test_python_session_keeps_state_within_an_episode_only():
    async def go():
        a, b = ToolRegistry(builtins=["python_session"]), ToolRegistry(builtins=["python_session"])
        out = []
        for reg, code in [(a, "x = 41\nopen('f.txt', 'w').write('kept')\nimport os\nprint(os.getcwd())"),
                          (a, "x += 1\nprint(x, open('f.txt').read())"),
                          (b, "print('x' in dir())"),  # another episode's interpreter
                          (a, "import os\nos.fork()"),  # the same limits as a one-shot call
                          (a, "print(x)"),
                          (a, "big = '%s'\nprint(len(big) + x)" % ("b" * 300_000))]:  # larger than a socket buffer
            out.append(await reg.call("python_session", {"code": code}, timeout=5.0))
        cwd = out[0].content.strip()
        one_shot = await run_sandboxed(f"print(open({cwd + '/f.txt'!r}).read())")
        a.close_sessions()
        b.close_sessions()
        out.append(await a.call("python_session", {"code": "print('x' in dir())"}, timeout=5.0))
        out.append(await a.call("python_session", {"code": "import time\ntime.sleep(60)"}, timeout=0.5))
        out.append(await a.call("python_session", {"code": "print('after', 'x' in dir())"}, timeout=5.0))
        a.close_sessions()
        return out, one_shot

    out, one_shot = run(go())
    assert all(r.name == "python_session" for r in out)
    assert out[1].ok and out[1].content == "42 kept\n", out[1]
    assert out[2].ok and out[2].content == "False\n", out[2]
    assert out[3].error in ("exception", "sandbox_violation") and "fork" in out[3].content, out[3]
    assert out[4].ok and out[4].content == "42\n", out[4]  # a refused call does not end the session
    assert out[5].ok and out[5].content == "300042\n", out[5]
    out = out[:5] + out[6:]
    assert not one_shot.ok and "kept" not in one_shot.content, one_shot  # its files are its own
    assert out[5].ok and out[5].content.endswith("False\n") and "new session" in out[5].content, out[5]
    assert out[6].error == "timeout", out[6]
    assert out[7].ok and out[7].content.endswith("after False\n") and "new session" in out[7].content, out[7]


def test_python_session_is_per_episode_and_ends_with_it():
    from ossrl.train.task import Episode, Task

    def task(tools):
        return Task("t", lambda i: {}, lambda n: [], None, [], [], tools)

    t = task(["python_session"])
    reg = t.registry()
    assert reg is not t.registry() and reg.holds_session  # never shared between episodes
    shared = task(["python"])
    assert shared.registry() is shared.registry()

    async def go():
        first = await reg.call("python_session", {"code": "y = 1"})
        Episode([], reg).close()  # the episode ends: so does its interpreter
        return first, await reg.call("python_session", {"code": "print('y' in dir())"})

    first, after = run(go())
    assert first.ok and after.ok and after.content.endswith("False\n") and "new session" in after.content, after
    reg.close_sessions()


def test_required_layers_hold_for_sessions():
    cfg = SandboxConfig(seccomp=False, require=("seccomp",))
    reg = ToolRegistry(builtins=["python_session"], sandbox=cfg)
    r = run(reg.call("python_session", {"code": "print('ran')"}))
    assert r.error == "sandbox_error" and "ran\n" not in r.content, r


def test_step_metrics_report_latency_queue_rate_and_pool():
    tool_step_metrics()  # start a window
    reg = ToolRegistry(max_sandboxes=2)
    rs = run(reg.run_calls([("python", {"code": f"print({i})"}) for i in range(8)], max_concurrency=8))
    assert [r.content for r in rs] == [f"{i}\n" for i in range(8)]
    m = tool_step_metrics()
    assert m["tool_latency_p50_s"] > 0 and m["tool_latency_p99_s"] >= m["tool_latency_p50_s"]
    assert m["tool_queue_wait_p99_s"] > 0  # 8 calls, 2 slots: some waited
    assert m["tool_calls_per_s"] > 0 and m["tool_sandboxes_peak"] == 2
    assert m["tool_pool_zygotes"] >= 1 and m["tool_pool_rss_bytes"] > 0
    empty = tool_step_metrics()
    assert empty["tool_latency_p50_s"] is None and empty["tool_calls_per_s"] == 0.0


# Many hostile calls mixed with ordinary ones, at once.
_HOSTILE = {
    "fork bomb": ("import os\nwhile True:\n    os.fork()", ("exception", "sandbox_violation")),
    "memory bomb": ("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", ("memory_limit",)),
    "infinite loop": ("while True:\n    pass", ("timeout", "cpu_limit")),
    "output flood": ("while True:\n    print('z' * 65536)", ("output_too_large",)),
    "sleep forever": ("import time\ntime.sleep(10**6)", ("timeout",)),
}


def test_hostile_calls_under_load_leave_ordinary_ones_correct_and_nothing_behind():
    reg = ToolRegistry(sandbox=SandboxConfig(memory_bytes=128 << 20, cpu_seconds=2), max_output_chars=4000,
                       max_sandboxes=32)
    calls, expect = [], []
    for i in range(160):
        if i % 4 == 3:  # a quarter hostile, all five kinds
            name = list(_HOSTILE)[(i // 4) % len(_HOSTILE)]
            calls.append(("python", {"code": _HOSTILE[name][0]}, 1.5))
            expect.append((name, _HOSTILE[name][1]))
        else:
            calls.append(("python", {"code": f"import math\nprint(math.factorial({i % 20}) + {i})"}, 60.0))
            expect.append((None, f"{__import__('math').factorial(i % 20) + i}\n"))
    results = run(reg.run_calls(calls, max_concurrency=64))
    zygote = pool_for(reg.sandbox).current()
    for (name, want), r in zip(expect, results):
        if name is None:
            assert r.ok and r.content == want, r
        else:
            assert not r.ok and r.error in want, (name, r)
            assert len(r.content) <= 4000 + 200
    assert zygote is not None and _children(zygote.proc.pid) == []  # all gone with their results
    assert run(reg.call("python", {"code": "print('still fine')"})).content == "still fine\n"


def test_config_keys_reach_every_episodes_registry():
    from ossrl.train.config import load_config
    from ossrl.train.task import _tool_options

    cfg = load_config(None, ["sandbox_pool=false", "sandbox_slots=3", "sandbox_idle_s=5", "sandbox_pool_memory_mb=64"])
    opts = _tool_options(cfg, ["python"])
    assert opts["sandbox"].pool is False and opts["sandbox"].pool_idle_seconds == 5.0
    assert opts["sandbox"].pool_memory_bytes == 64 << 20 and opts["slots"].value == 3
    assert "backend" not in opts and _tool_options(cfg, ["calculator"]) == {}
    a, b = ToolRegistry(**opts), ToolRegistry(**opts)
    assert a._slots is b._slots  # one bound for all episodes
    with pytest.raises(ValueError, match="tool_backend"):
        load_config(None, ["tool_backend=spark"])


def test_advance_gives_each_episode_its_session_and_ends_them_all():
    from test_agent import _Scripted, _turn

    from ossrl.model import ByteTokenizer
    from ossrl.rollout.agent import Trajectory, advance
    from ossrl.rollout.engine import SamplingParams

    tok = ByteTokenizer()

    def call(code):
        return _turn(tok, code, channel="commentary", recipient="functions.python_session")

    first = "import os\nx = 'mine'\nprint(os.getpid())"
    script = {e: [call(first), call("print(x)"), _turn(tok, "done", channel="final")] for e in range(2)}
    trajs = [Trajectory.start([1000 + e, 7], seed=e) for e in range(2)]
    regs = [ToolRegistry(builtins=["python_session"]) for _ in trajs]
    params = SamplingParams(temperature=1.0, max_new_tokens=500)
    with pytest.raises(ValueError, match="one registry per trajectory"):
        advance(_Scripted(script), tok, regs[0], trajs, params, max_turns=4, tool_timeout=5.0)
    assert advance(_Scripted(script), tok, regs, trajs, params, max_turns=4, tool_timeout=5.0) == [0]
    pids = []
    for t in trajs:
        results = [m["content"] for m in t.chat if m["role"] == "tool"]
        assert t.final_answer == "done" and t.tool_errors == 0 and results[1] == "mine\n", t.chat
        pids.append(int(results[0]))
    assert pids[0] != pids[1]  # one interpreter per episode
    _wait_until(lambda: not any(_alive(p) for p in pids), "the episodes' interpreters end with advance")


def test_code_that_cannot_run_is_a_bad_argument_for_both_tools():
    """Not a string, or longer than max_code_bytes: a clear bad_arguments result, no sandbox started."""
    import asyncio

    from ossrl.rollout.sandbox import SandboxConfig, run_sandboxed
    from ossrl.rollout.sandbox_session import SandboxSession

    cfg = SandboxConfig(max_code_bytes=64)
    session = SandboxSession(cfg)
    try:
        for code, says in ((b"print(1)", "must be a string"), ("x = 1\n" * 20, "too long (120 bytes, limit 64)")):
            for r in (asyncio.run(run_sandboxed(code, cfg)), asyncio.run(session.run(code, 5.0, 1000))):
                assert not r.ok and r.error == "bad_arguments" and says in r.content, r
        assert session.started == 0
    finally:
        session.close()
