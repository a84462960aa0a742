"""What a short code cell costs through each tool runner: calls/s, latency, memory, CPU per call.

Runners (each call is ``print(<i> * 2)``, checked):

- ``pool``: the sandboxed ``python`` tool as it runs by default, a warm zygote forking one
  locked-down child per call (``SandboxConfig(pool=True)``);
- ``fresh``: the same sandbox starting a new interpreter per call (``pool=False``: what every call
  cost before the pool);
- ``plain``: no sandbox at all, ``subprocess.run([python, "-c", code])`` from a thread per slot,
  what a naive runner pays;
- ``ray``: the pooled sandbox on Ray workers (``tool_backend = "ray"``), a local cluster on this
  machine, when ray is installed.

``concurrency`` callers each run their next call when the last one returns (the pool size is the
concurrency). Latency is one call's time, calls/s the total over the wall time. CPU-seconds per
call add up the whole process tree (this process, the zygote and everything they started; for
Ray also its raylet and workers), after one warm-up call; kernel threads (a network namespace is
freed by one) are not counted. Each run starts once the machine is quiet again (at least 90%
idle over half a second, waiting at most a minute), so no runner pays for the previous one's
clean-up. Peak memory is the largest proportional resident memory (PSS:
pages shared between processes counted once) of that tree above this process's own before the
run (so the zygote and the processes of the calls), sampled every second; the sampler's CPU time
is subtracted.

    python benchmarks/bench_tools.py                          # 1,000 calls at 64 and 256
    python benchmarks/bench_tools.py --sizes 10000x1024 --runners pool --json out.json
    python benchmarks/bench_tools.py --hostile 1000                 # hostile calls under load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ossrl.rollout.sandbox import SandboxConfig, run_sandboxed

_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _procs() -> dict[int, tuple[int, float]]:
    """pid -> (parent, CPU seconds with reaped children), for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(parts[1]), sum(int(x) for x in parts[11:15]) / _TCK)
    return out


def _tree() -> list[int]:
    """This process and its descendants."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _tree_cpu() -> float:
    """CPU seconds of this process's tree: live processes plus what they reaped."""
    procs = _procs()
    return sum(procs[p][1] for p in _tree() if p in procs)


def _pss(pid: int) -> int:
    """Proportional resident memory: shared pages (a zygote's, its children's) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Sampler:
    """Peak memory of this process's tree above this process alone before the run, on a thread."""

    def __init__(self):
        self.base = _pss(os.getpid())
        self.peak, self.cpu, self._stop = 0, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        t0 = time.thread_time()
        while not self._stop.wait(1.0):  # reading smaps_rollup takes every process's mm lock: not too often
            self.peak = max(self.peak, sum(_pss(p) for p in _tree()) - self.base)
        self.cpu = time.thread_time() - t0

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def _check(i: int, ok: bool, out: str) -> None:
    if not ok or out != f"{i * 2}\n":
        raise RuntimeError(f"call {i} failed: {out[:300]!r}")


async def _sandboxed(n: int, conc: int, cfg: SandboxConfig) -> list[float]:
    slots = asyncio.Semaphore(conc)
    lat: list[float] = []
    todo = iter(range(n))

    async def worker():
        for i in todo:
            t = time.perf_counter()
            r = await run_sandboxed(f"print({i} * 2)", cfg, timeout=60.0, slots=slots)
            lat.append(time.perf_counter() - t)
            _check(i, r.ok, r.content)

    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat


def _plain(n: int, conc: int) -> list[float]:
    def one(i: int) -> float:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", f"print({i} * 2)"], capture_output=True, text=True, timeout=60)
        _check(i, p.returncode == 0, p.stdout)
        return time.perf_counter() - t

    with ThreadPoolExecutor(conc) as ex:
        return list(ex.map(one, range(n)))


def _ray_runner(address: str | None):
    from ossrl.rollout.tool_backend import RayToolBackend

    backend = RayToolBackend(address=address, sandbox=SandboxConfig())

    async def go(n: int, conc: int) -> list[float]:
        lat: list[float] = []
        todo = iter(range(n))

        async def worker():
            for i in todo:
                t = time.perf_counter()
                r = await backend.call("python", {"code": f"print({i} * 2)"}, timeout=60.0)
                lat.append(time.perf_counter() - t)
                _check(i, r.ok, r.content)

        await asyncio.gather(*(worker() for _ in range(conc)))
        return lat

    return backend, go


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # (not idle nor waiting, all)


def settle(quiet: float = 0.9, limit: float = 60.0) -> float:
    """Waits until the machine is at least ``quiet`` idle over half a second (at most ``limit``
    seconds): the previous run's processes and the kernel's clean-up of its namespaces (on kernel
    threads, counted by nobody) must not slow the next runner down. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        b0, a0 = _busy()
        time.sleep(0.5)
        b1, a1 = _busy()
        if a1 > a0 and 1 - (b1 - b0) / (a1 - a0) >= quiet:
            break
    return time.monotonic() - t0


def measure(runner: str, n: int, conc: int, ray=None) -> dict:
    settle()
    cfg = SandboxConfig(pool=runner != "fresh")
    warm = {"pool": lambda: asyncio.run(_sandboxed(1, 1, cfg)), "fresh": lambda: asyncio.run(_sandboxed(1, 1, cfg)),
            "plain": lambda: _plain(1, 1), "ray": lambda: asyncio.run(ray[1](conc, conc))}[runner]
    warm()
    cpu0 = _tree_cpu()
    sampler = _Sampler()
    t0 = time.perf_counter()
    if runner in ("pool", "fresh"):
        lat = asyncio.run(_sandboxed(n, conc, cfg))
    elif runner == "plain":
        lat = _plain(n, conc)
    else:
        lat = asyncio.run(ray[1](n, conc))
    wall = time.perf_counter() - t0
    cpu1 = _tree_cpu()
    sampler.stop()
    lat.sort()
    return {"runner": runner, "calls": n, "concurrency": conc, "wall_s": wall, "calls_per_s": n / wall,
            "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
            "peak_mem_mib": sampler.peak / 2**20, "cpu_ms_per_call": (cpu1 - cpu0 - sampler.cpu) / n * 1e3}


def _hostile_kinds(escape_dir: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """kind -> (code, the error kinds it may end with). {i}: the call's number."""
    me = os.getpid()
    return {
        "fork bomb": ("import os\nwhile True:\n    os.fork()", ("exception", "sandbox_violation")),
        "memory bomb": ("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", ("memory_limit",)),
        "infinite loop": ("while True:\n    pass", ("timeout", "cpu_limit")),
        "output flood": ("while True:\n    print('z' * 65536)", ("output_too_large",)),
        "sleep forever": ("import time\ntime.sleep(10**6)", ("timeout",)),
        "write outside": (f"open({escape_dir!r} + '/escaped-{{i}}', 'w').write('x')",
                          ("exception", "sandbox_violation")),
        "kill the trainer": (f"import os\nos.kill({me}, 9)", ("exception", "sandbox_violation")),
        "native code": ("import ctypes\nctypes.CDLL(None).kill(%d, 9)" % me, ("exception", "sandbox_violation")),
    }


def hostile(n: int, conc: int, slots: int, timeout: float) -> dict:
    """``n`` hostile calls (every kind in turn) mixed with ``n`` ordinary ones, all submitted at
    once through a ToolRegistry with ``conc`` in flight and ``slots`` sandboxes at a time: what the
    loop would see. Checks that every ordinary call is right, every hostile one ends with an
    error of its kind, no call outlives its timeout by more than a second, nothing was written
    outside a sandbox, no sandbox process is left, and how late the trainer's event loop ran."""
    import tempfile

    from ossrl.rollout.sandbox_pool import pool_for
    from ossrl.rollout.tools import ToolRegistry

    escape_dir = tempfile.mkdtemp(prefix="ossrl-escape-")
    kinds = _hostile_kinds(escape_dir)
    names = list(kinds)
    reg = ToolRegistry(sandbox=SandboxConfig(memory_bytes=128 << 20, cpu_seconds=2), max_output_chars=4000,
                       max_sandboxes=slots)
    calls, expect = [], []
    for i in range(2 * n):
        if i % 2:
            kind = names[(i // 2) % len(names)]
            calls.append(("python", {"code": kinds[kind][0].replace("{i}", str(i))}, timeout))
            expect.append(kind)
        else:
            calls.append(("python", {"code": f"print({i} * 3)"}, 120.0))
            expect.append(None)

    async def go():
        lag, stop = [0.0], asyncio.Event()

        async def beat():  # the event loop's lateness: a blocked loop would stall every episode
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.05)
                lag[0] = max(lag[0], time.perf_counter() - t - 0.05)

        b = asyncio.ensure_future(beat())
        t0 = time.perf_counter()
        res = await reg.run_calls(calls, max_concurrency=conc)
        wall = time.perf_counter() - t0
        stop.set()
        await b
        return res, wall, lag[0]

    settle()
    results, wall, lag = asyncio.run(go())
    by_kind: dict[str, dict] = {}
    wrong = []
    for kind, r, c in zip(expect, results, calls):
        k = by_kind.setdefault(kind or "ordinary", {"calls": 0, "as_expected": 0, "max_s": 0.0, "errors": {}})
        k["calls"] += 1
        k["max_s"] = max(k["max_s"], r.seconds)
        k["errors"][str(r.error)] = k["errors"].get(str(r.error), 0) + 1
        good = (r.ok and r.content == f"{int(c[1]['code'][6:-5]) * 3}\n") if kind is None else \
            (not r.ok and r.error in kinds[kind][1])
        k["as_expected"] += good
        if not good:
            wrong.append((kind, r.error, r.content[:200]))
    zygote = pool_for(reg.sandbox).current()
    left = [] if zygote is None else [p for p, (pp, _) in _procs().items() if pp == zygote.proc.pid]
    escaped = os.listdir(escape_dir)
    if not escaped:
        os.rmdir(escape_dir)
    waited_in_sandbox = max(r.seconds for r, k in zip(results, expect) if k is not None)
    return {"hostile": n, "ordinary": n, "concurrency": conc, "sandboxes": slots, "timeout_s": timeout,
            "wall_s": wall, "kinds": by_kind, "wrong": wrong[:20], "n_wrong": len(wrong),
            "processes_left": len(left), "files_escaped": len(escaped), "max_loop_lag_s": lag,
            "max_hostile_call_s": waited_in_sandbox}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000x64,1000x256", help="CALLSxCONCURRENCY, comma-separated")
    ap.add_argument("--runners", default="pool,fresh,plain,ray")
    ap.add_argument("--ray-address", default=None, help="an existing cluster; default: a local one")
    ap.add_argument("--json", default=None)
    ap.add_argument("--hostile", type=int, default=0, metavar="N",
                    help="instead: N hostile calls mixed with N ordinary ones, all at once (see hostile())")
    ap.add_argument("--hostile-concurrency", type=int, default=1024)
    ap.add_argument("--hostile-sandboxes", type=int, default=64)
    args = ap.parse_args()
    if args.hostile:
        h = hostile(args.hostile, args.hostile_concurrency, args.hostile_sandboxes, timeout=2.0)
        print(json.dumps(h, indent=1))
        print(f"\n{h['hostile']} hostile + {h['ordinary']} ordinary calls, {h['concurrency']} in flight, "
              f"{h['sandboxes']} sandboxes at a time, {h['timeout_s']:.0f} s timeout: {h['wall_s']:.1f} s")
        print(f"{'kind':<17} {'calls':>6} {'as expected':>12} {'max s':>7}  outcomes")
        for kind, k in h["kinds"].items():
            print(f"{kind:<17} {k['calls']:>6} {k['as_expected']:>12} {k['max_s']:>7.2f}  "
                  + ", ".join(f"{e}: {c}" for e, c in sorted(k["errors"].items())))
        print(f"not as expected: {h['n_wrong']}; sandbox processes left: {h['processes_left']}; files written "
              f"outside: {h['files_escaped']}; event loop at most {h['max_loop_lag_s'] * 1e3:.0f} ms late")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cpus": os.cpu_count(), "python": platform.python_version(), "hostile": h}, f, indent=1)
        return
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    runners = args.runners.split(",")
    rows = []
    for n, conc in sizes:
        for runner in [r for r in runners if r != "ray"]:
            rows.append(measure(runner, n, conc))
            print(json.dumps(rows[-1]), flush=True)
    if "ray" in runners:  # last: its cluster's processes would count towards the others
        try:
            ray = _ray_runner(args.ray_address)
        except ImportError as e:
            print(f"ray: skipped ({e})")
        else:
            for n, conc in sizes:
                rows.append(measure("ray", n, conc, ray))
                print(json.dumps(rows[-1]), flush=True)
            ray[0].close()
    base = {(r["calls"], r["concurrency"]): r for r in rows if r["runner"] == "fresh"}
    print(f"\n{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    print(f"{'runner':<7} {'calls':>6} {'conc':>5} {'calls/s':>9} {'vs fresh':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'peak MiB':>9} {'CPU ms/call':>12}")
    for r in rows:
        b = base.get((r["calls"], r["concurrency"]))
        ratio = f"{r['calls_per_s'] / b['calls_per_s']:.1f}x" if b else "-"
        print(f"{r['runner']:<7} {r['calls']:>6} {r['concurrency']:>5} {r['calls_per_s']:>9.0f} {ratio:>9} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['peak_mem_mib']:>9.0f} {r['cpu_ms_per_call']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
