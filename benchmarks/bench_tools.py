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
freed by one) are not counted. Peak memory is the largest proportional resident memory (PSS:
pages shared between processes counted once) of that tree above this process's own before the
run (so the zygote and the processes of the calls), sampled every 0.2 s; the sampler's CPU time
is subtracted.

    python benchmarks/bench_tools.py                          # 1,000 calls at 64 and 256
    python benchmarks/bench_tools.py --sizes 10000x1024 --runners pool --json out.json
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
        while not self._stop.wait(0.2):
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


def measure(runner: str, n: int, conc: int, ray=None) -> dict:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000x64,1000x256", help="CALLSxCONCURRENCY, comma-separated")
    ap.add_argument("--runners", default="pool,fresh,plain,ray")
    ap.add_argument("--ray-address", default=None, help="an existing cluster; default: a local one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
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
