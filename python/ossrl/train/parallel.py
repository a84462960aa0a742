"""Data parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs), launched by torchrun.

Every rank holds the whole model (the rollout engine runs on it), takes an equal slice of each
step's prompts, and the gradients are summed across ranks before the optimizer step, so N ranks
compute what one process computes on the same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class DataParallel:
    def __init__(self):
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [lo, hi) of n items split evenly."""
        if n % self.world:
            raise ValueError(f"{what} ({n}) must be divisible by the number of processes ({self.world})")
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def sum(self, values: list[float], device) -> list[float]:
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float, device) -> float:
        if not self.on:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, model: torch.nn.Module) -> None:
        """One all-reduce over every gradient, flattened into a single buffer."""
        if not self.on:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.on:
            dist.barrier()
