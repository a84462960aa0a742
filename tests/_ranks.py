"""Running a test body on several gloo processes: each rank reports "ok" or its error.

A rank that dies by a signal without reporting makes the whole run start again once, after
``reset``. Two such aborts have been seen in CI, each once in hundreds of runs, with no error of
ours on either rank: one inside gloo's TCP transport ("Connection reset by peer"), and one
"terminate called without an active exception" (a C++ thread destroyed while still joinable)
just after a reshard test's last collective. The test still fails if the second run fails, or
if a rank reports a Python error. Each rank's stderr goes to a file whose end is shown with any
failure, so a crash in C++ says what it was.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import tempfile
import time
import traceback
import warnings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, init: bool, timeout: float, log: str, target, args, results) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)  # what C++ prints before an abort
    os.close(fd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:  # a collective that waits longer than the run may take raises instead of hanging
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
        target(rank, world, *args)
        results.put((rank, "ok"))
    except BaseException:  # reported to the test, which fails with it
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _attempt(target, world: int, args, init: bool, timeout: float, logs: list[str]) -> dict[int, str]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, init, timeout, logs[r], target, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    outcome: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world and time.monotonic() < deadline:
            try:
                rank, what = results.get(timeout=1)
                outcome[rank] = what
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                if dead:
                    time.sleep(1)  # a peer's report, if any, is worth waiting for
                    while True:
                        try:
                            rank, what = results.get_nowait()
                            outcome[rank] = what
                        except queue.Empty:
                            break
                    outcome.update({r: f"exited with code {procs[r].exitcode}" for r in dead if r not in outcome})
        outcome.update({r: f"no report within {timeout:.0f} s" for r in range(world) if r not in outcome})
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return outcome


def run_ranks(target, world: int, *args, timeout: float = 300, init: bool = True, reset=None) -> None:
    """Runs ``target(rank, world, *args)`` in ``world`` spawned processes (with a gloo process
    group unless ``init=False``: the target makes its own) and fails with every rank's error (or
    its exit code and the end of its stderr, or a hang) unless all of them return. A run in which
    a rank was killed by a signal is started again once, after ``reset()`` if given."""
    with tempfile.TemporaryDirectory(prefix="ossrl-ranks-") as d:
        logs = [os.path.join(d, f"rank{r}.log") for r in range(world)]
        report = ""
        for attempt in range(2):
            outcome = _attempt(target, world, args, init, timeout, logs)
            failed = {r: v for r, v in outcome.items() if v != "ok"}
            if not failed:
                if report:
                    warnings.warn(f"a rank was killed by a signal; the second run passed:\n{report}")
                return
            report += f"run {attempt + 1}:\n" + "\n".join(
                f"rank {r}: {v}" + (f"\n--- its stderr ends with:\n{_tail(logs[r])}" if "exited" in v or "no report" in v
                                    else "")
                for r, v in sorted(failed.items()))
            crashed = any(v.startswith("exited with code -") for v in failed.values())
            if not crashed or attempt == 1:
                break
            if reset is not None:
                reset()
        raise AssertionError(report)
