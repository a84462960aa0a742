"""Running a test body on several gloo processes: each rank reports "ok" or its error."""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo")
        target(rank, world, *args)
        results.put((rank, "ok"))
    except BaseException:  # reported to the test, which fails with it
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target, world: int, *args, timeout: float = 300) -> None:
    """Runs ``target(rank, world, *args)`` in ``world`` spawned processes with a gloo process group
    and fails with every rank's error (or its exit code, or a hang) unless all of them return."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, target, args, results)) for r in range(world)]
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
                    outcome.update({r: f"exited with code {procs[r].exitcode}" for r in dead if r not in outcome})
        outcome.update({r: f"no report within {timeout:.0f} s" for r in range(world) if r not in outcome})
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = {r: v for r, v in outcome.items() if v != "ok"}
    assert not failed, "\n".join(f"rank {r}: {v}" for r, v in sorted(failed.items()))
