"""Data parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs), launched by torchrun.

Every rank takes an equal share of each step's groups, and gradients are summed across ranks
before the optimizer step, so N ranks compute what one process computes on the same global
batch. Two ways to hold the trainer's weights:

- ``DataParallel``: every rank holds the whole model (the rollout engine may run on it);
- ``FullyShardedDataParallel``: FSDP2, every rank holds 1/N of each parameter
  (``ossrl.train.fsdp``); the engine gets its own full replica, refreshed in place from the
  shards by a reshard plan after every optimizer step.

Two more dimensions, on top of either (see :mod:`ossrl.model.distributed` for the layers):

- ``expert_parallel = E``: consecutive blocks of E ranks split every MoE layer's experts; each
  expert's weights are a ``Shard(0)`` DTensor on the block's 1-D mesh (replicated across the
  world // E blocks, whose expert gradients are summed). The engine gets a full replica,
  refreshed from the expert shards by the same reshard plan as FSDP's (an all-gather per bucket),
  so the rollout costs one full copy of the experts per rank.
- ``context_parallel = C``: consecutive blocks of C ranks train on the union of their
  trajectories, each rank on a contiguous 1/C of every packed micro-batch's tokens (so one
  trajectory may be C times longer than one rank could hold). Rollout stays data parallel over
  every rank (each rank's engine generates its own groups).

Losses are divided by the global loss-token count and gradients summed over all ranks, so every
layout computes what one process computes on the same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class DataParallel:
    sharded = False

    def __init__(self, expert_parallel: int = 1, context_parallel: int = 1):
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.on = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.ep, self.cp = expert_parallel, context_parallel
        for n, key in ((self.ep, "expert_parallel"), (self.cp, "context_parallel")):
            if n < 1 or self.world % n:
                raise ValueError(f"{key}={n} must divide the number of processes ({self.world}; "
                                 f"launch with torchrun --nproc-per-node N)")
        self.ep_mesh = self.cp_group = None
        if self.ep > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.ep_mesh = init_device_mesh(_device().type, (self.world // self.ep, self.ep),
                                            mesh_dim_names=("replica", "ep"))
        if self.cp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.cp_group = init_device_mesh(_device().type, (self.world // self.cp, self.cp),
                                             mesh_dim_names=("dp", "cp"))["cp"].get_group()

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

    def gather(self, obj, group=None) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (of ``group``)."""
        if not self.on:
            return [obj]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def sum_grads(self, model: torch.nn.Module) -> None:
        """One all-reduce over every gradient, flattened into a single buffer; expert shards
        (DTensors) over the ranks holding the same experts."""
        if not self.on:
            return
        for p in model.parameters():  # a rank with nothing to train on this step adds zeros
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        _all_reduce_flat([g for g in grads if not hasattr(g, "to_local")], None)
        self._sum_expert_grads(model)

    def _sum_expert_grads(self, model: torch.nn.Module) -> None:
        """Expert shards: summed over the world // ep blocks that hold the same experts."""
        if self.ep > 1 and self.world > self.ep:
            _all_reduce_flat([p.grad.to_local() for p in _expert_params(model) if p.grad is not None],
                             self.ep_mesh["replica"].get_group())

    def clip_grads(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Scales the gradients to a total 2-norm of at most max_norm (the norm over the whole
        model: expert shards counted once each) and returns the norm before scaling."""
        params = [p for p in model.parameters() if p.grad is not None]
        if self.ep == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # Shards of several meshes (experts over their block, FSDP's over every rank): each mesh's
        # squares summed over its ranks, whole (replicated) gradients counted once.
        total = torch.zeros((), dtype=torch.float64, device=_device())
        by_mesh: dict = {}
        for p in params:
            if hasattr(p.grad, "to_local"):
                mesh = p.grad.device_mesh
                by_mesh.setdefault(id(mesh), [mesh, []])[1].append(p.grad.to_local())
            else:
                total += p.grad.double().pow(2).sum().to(total.device)
        for mesh, local in by_mesh.values():  # the same meshes, in the same order, on every rank
            sq = torch.stack([g.double().pow(2).sum().to(total.device) for g in local]).sum()
            if mesh.size() > 1:
                dist.all_reduce(sq, group=mesh.get_group())
            total += sq
        norm = total.sqrt().float()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g.mul_(scale.to(g.device, g.dtype))
        return norm

    # ---- context parallelism ----

    def context_peers(self, obj) -> list:
        """``obj`` of every rank in this rank's context-parallel block, in rank order."""
        return [obj] if self.cp_group is None else self.gather(obj, self.cp_group)

    def context_shard(self, cu_seqlens: torch.Tensor):
        """This rank's piece of a packed batch of its block (None without context parallelism)."""
        if self.cp_group is None:
            return None
        from ..model.distributed import ContextShard

        return ContextShard(self.cp_group, cu_seqlens)

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    # ---- what the loop calls, the same for both ways ----

    def optimizer_options(self) -> dict:
        # foreach kernels cannot mix DTensors (the expert shards) and plain tensors in one call
        return {"foreach": False} if self.ep > 1 else {}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ep > 1:
            shard_experts(model, self.ep_mesh["ep"])
        return model

    def passes(self, model: torch.nn.Module, n: int):
        """Indices of this rank's n micro-batches, then None for padding passes where a way needs
        every rank to run as many forward/backward passes as the busiest one."""
        if self.ep == 1:
            return iter(range(n))
        from .fsdp import equal_micro_batches  # every pass's all-to-alls need the whole block

        return (i if i < n else None for i in range(equal_micro_batches(n)))

    def reduce_grads(self, model: torch.nn.Module) -> None:
        self.sum_grads(model)

    def state_dicts(self, model, optimizer) -> tuple[dict, dict]:
        """Full model tensors and optimizer state for a checkpoint (rank 0 writes them; other
        ranks may get empty dicts). optimizer may be None."""
        if self.ep > 1:  # expert shards gathered whole, as FSDP's are
            from .fsdp import full_state_dicts

            return full_state_dicts(model, optimizer)
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else {}

    def load_state_dicts(self, model, optimizer, tensors: dict, optim: dict | None) -> None:
        if self.ep > 1:
            from .fsdp import load_full_state_dicts

            load_full_state_dicts(model, optimizer, tensors, optim or {})
            return
        model.load_state_dict(tensors)
        if optim is not None:
            optimizer.load_state_dict(optim)


class FullyShardedDataParallel(DataParallel):
    sharded = True

    def __init__(self, expert_parallel: int = 1, context_parallel: int = 1):
        super().__init__(expert_parallel, context_parallel)
        if not self.on:
            raise ValueError("parallel = 'fsdp' needs several processes (torchrun --nproc-per-node N)")

    def prepare(self, model):
        from .fsdp import shard_model

        # Expert shards stay out of FSDP: expert parallelism already splits them (FSDP2 would
        # shard them again over every rank); the dense weights are FSDP's.
        experts = set(shard_experts(model, self.ep_mesh["ep"])) if self.ep > 1 else None
        return shard_model(model, ignored_params=experts)

    def passes(self, model, n):
        from .fsdp import equal_micro_batches, sync_on_last

        for i in sync_on_last(model, equal_micro_batches(n)):
            yield i if i < n else None

    def reduce_grads(self, model):
        self._sum_expert_grads(model)  # the dense ones are reduce-scattered by FSDP in the last backward

    def state_dicts(self, model, optimizer):
        from .fsdp import full_state_dicts

        return full_state_dicts(model, optimizer)

    def load_state_dicts(self, model, optimizer, tensors, optim):
        from .fsdp import load_full_state_dicts

        load_full_state_dicts(model, optimizer, tensors, optim or {})


def _device() -> torch.device:
    """Where the default process group's collectives run: the current GPU for NCCL, else the CPU."""
    if dist.is_initialized() and "nccl" in dist.get_backend():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _expert_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from ..model.gpt_oss import MoE

    return [p for m in model.modules() if isinstance(m, MoE) and m.expert_shard is not None
            for p in m.experts.parameters()]


def shard_experts(model: torch.nn.Module, mesh) -> list[torch.nn.Parameter]:
    """Keeps this rank's experts of every MoE layer of ``model`` (the same full weights on every
    rank, as after loading): each expert weight becomes a ``Shard(0)`` DTensor on the 1-D ``mesh``,
    and each layer an :class:`~ossrl.model.distributed.ExpertShard` over its group."""
    from torch.distributed.tensor import DTensor, Shard

    from ..model.distributed import ExpertShard
    from ..model.gpt_oss import MoE

    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        shard = ExpertShard(mesh.get_group(), m.experts.gate_up_proj.shape[0])
        lo = shard.rank * shard.local
        for name, p in list(m.experts.named_parameters(recurse=False)):
            local = p.detach()[lo: lo + shard.local].clone()
            new = torch.nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                     requires_grad=p.requires_grad)
            setattr(m.experts, name, new)
        m.expert_shard = shard
    return _expert_params(model)


def make_parallel(kind: str, expert_parallel: int = 1, context_parallel: int = 1) -> DataParallel:
    cls = FullyShardedDataParallel if kind == "fsdp" else DataParallel
    return cls(expert_parallel, context_parallel)
