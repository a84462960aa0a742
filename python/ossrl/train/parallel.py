"""Data parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs), launched by torchrun.

Every rank takes an equal share of each step's groups, and gradients are summed across ranks
before the optimizer step, so N ranks compute what one process computes on the same global
batch. Two ways to hold the trainer's weights:

- ``DataParallel``: every rank holds the whole model (the rollout engine may run on it);
- ``FullyShardedDataParallel``: FSDP2, every rank holds 1/N of each parameter
  (``ossrl.train.fsdp``); the engine gets its own full replica, refreshed in place from the
  shards by a reshard plan after every optimizer step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class DataParallel:
    sharded = False

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
        for p in model.parameters():  # a rank with nothing to train on this step adds zeros
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
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

    # ---- what the loop calls, the same for both ways ----

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def passes(self, model: torch.nn.Module, n: int):
        """Indices of this rank's n micro-batches, then None for padding passes where a way needs
        every rank to run as many forward/backward passes as the busiest one."""
        return iter(range(n))

    def reduce_grads(self, model: torch.nn.Module) -> None:
        self.sum_grads(model)

    def state_dicts(self, model, optimizer) -> tuple[dict, dict]:
        """Full model tensors and optimizer state for a checkpoint (rank 0 writes them; other
        ranks may get empty dicts). optimizer may be None."""
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else {}

    def load_state_dicts(self, model, optimizer, tensors: dict, optim: dict | None) -> None:
        model.load_state_dict(tensors)
        if optim is not None:
            optimizer.load_state_dict(optim)


class FullyShardedDataParallel(DataParallel):
    sharded = True

    def __init__(self):
        super().__init__()
        if not self.on:
            raise ValueError("parallel = 'fsdp' needs several processes (torchrun --nproc-per-node N)")

    def prepare(self, model):
        from .fsdp import shard_model

        return shard_model(model)

    def passes(self, model, n):
        from .fsdp import equal_micro_batches, sync_on_last

        for i in sync_on_last(model, equal_micro_batches(n)):
            yield i if i < n else None

    def reduce_grads(self, model):
        pass  # reduce-scattered by FSDP in the last backward

    def state_dicts(self, model, optimizer):
        from .fsdp import full_state_dicts

        return full_state_dicts(model, optimizer)

    def load_state_dicts(self, model, optimizer, tensors, optim):
        from .fsdp import load_full_state_dicts

        load_full_state_dicts(model, optimizer, tensors, optim or {})


def make_parallel(kind: str) -> DataParallel:
    return FullyShardedDataParallel() if kind == "fsdp" else DataParallel()
