"""tool_backend = "ray": the sandboxed python tool on Ray workers of a local cluster (127.0.0.1).

Skipped where ray is not installed (``pip install 'ossrl[ray]'``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from ossrl.rollout.sandbox import SandboxConfig  # noqa: E402
from ossrl.rollout.tool_backend import RayToolBackend  # noqa: E402
from ossrl.rollout.tools import ToolRegistry  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


@pytest.fixture(scope="module")
def backend():
    import ossrl

    # the workers import the ossrl this test imported (the installed wheel, or a source tree with its
    # compiled module), not whatever python/ folder sits beside the tests
    src = os.path.dirname(os.path.dirname(os.path.abspath(ossrl.__file__)))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": src}})
    b = RayToolBackend(workers=2, sandbox=SandboxConfig(memory_bytes=256 << 20))
    yield b
    b.close()
    ray.shutdown()


def _parents() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    return out


def test_results_timeouts_and_error_kinds_are_the_local_ones(backend, tmp_path):
    remote, local = ToolRegistry(backend=backend, max_output_chars=4000), ToolRegistry(max_output_chars=4000)
    T = 30.0  # generous: only the sleep is meant to time out, whatever the load on the machine
    calls = [("python", {"code": "print(6 * 7)"}, T),
             ("python", {"code": "import time\ntime.sleep(60)"}, 0.5),
             ("python", {"code": f"open({str(tmp_path / 'x')!r}, 'w').write('pwned')"}, T),
             ("python", {"code": "import os\nos.fork()"}, T),
             ("python", {"code": "x = []\nwhile True:\n    x.append(bytearray(16 << 20))"}, T),
             ("python", {"code": "while True:\n    print('y' * 65536)"}, T),
             ("python", {"code": "1/0"}, T),
             ("python", {"nope": 1}, T)]  # validated before it leaves the trainer
    got = asyncio.run(remote.run_calls(calls, max_concurrency=8))
    want = asyncio.run(local.run_calls(calls, max_concurrency=8))
    assert [(r.ok, r.error) for r in got] == [(r.ok, r.error) for r in want]
    assert got[0].content == "42\n" and got[1].error == "timeout" and got[4].error == "memory_limit"
    assert got[2].error == "sandbox_violation" and not (tmp_path / "x").exists()
    assert [r.content for r in got if r.error in (None, "exception", "bad_arguments")] == \
        [r.content for r in want if r.error in (None, "exception", "bad_arguments")]


def test_a_worker_that_dies_mid_call_is_retried_on_another(backend):
    workers = set(asyncio.run(backend.worker_pids()))
    before = backend.retries

    async def go():
        task = asyncio.ensure_future(backend.call("python", {"code": "import time\ntime.sleep(2)\nprint('done')"},
                                                  20.0))
        deadline = time.monotonic() + 20
        victim = None
        while victim is None and time.monotonic() < deadline:  # the sandbox child, its zygote, its worker
            parents = _parents()
            for pid, ppid in parents.items():
                grand = parents.get(ppid)
                if grand in workers:  # a worker's zygote's child: the call's sandbox
                    victim = grand
            await asyncio.sleep(0.05)
        assert victim is not None, "the call never started on a worker"
        os.kill(victim, signal.SIGKILL)
        return await task

    r = asyncio.run(go())
    assert r.ok and r.content == "done\n", r
    assert backend.retries == before + 1
