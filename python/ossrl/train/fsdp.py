"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: sharding, micro-batches, checkpoints.

Each rank holds 1/N of every parameter (a DTensor, ``Shard(0)`` on a 1-D mesh over the default
process group); a layer's parameters are all-gathered just before it runs and its gradients
reduce-scattered just after its backward. Unlike :mod:`ossrl.train.parallel` (every rank holds the
whole model), memory per rank falls with the number of ranks.

What the trainer must respect:

* Gradients are **summed** across ranks, not averaged (FSDP's default): our losses already divide
  by the global token count, so N ranks compute what one process computes on the same batch.
* Every rank must run the same number of forward/backward passes, because each one issues
  collectives. :func:`equal_micro_batches` agrees on the count; a rank with fewer real
  micro-batches runs :func:`padding_pass` for the rest.
* Rollout weights come from the shards through :func:`ossrl.reshard.build_plan` (it gathers
  ``Shard(0)`` DTensors itself); checkpoints through :func:`full_state_dicts`, whose keys are the
  plain Hugging Face names, so sharded and unsharded checkpoints are interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from ..model import GptOss

__all__ = [
    "shard_model",
    "sync_on_last",
    "equal_micro_batches",
    "padding_pass",
    "full_state_dicts",
    "load_full_state_dicts",
]


def _device() -> torch.device:
    """Where the default process group's collectives run: the current GPU for NCCL, else the CPU."""
    if "nccl" in dist.get_backend():  # "nccl" or e.g. "cpu:gloo,cuda:nccl"
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_model(model: GptOss, ignored_params: set | None = None) -> GptOss:
    """Shards ``model`` in place over all ranks of the default process group and returns it.

    One FSDP group per decoder layer (gathered one layer at a time), then the root (embedding,
    final norm, lm_head). ``token_logprobs`` is registered as a forward method: it is what the
    trainer calls, and without this FSDP would not gather the root's parameters for it.

    A tied lm_head (``tie_word_embeddings``) is one parameter under two names, both in the root
    group: FSDP shards it once, and the full state dict lists it under both names, as
    ``GptOss.state_dict()`` does. ``ignored_params``: left as they are (expert parallelism's
    shards).
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model: torch.distributed is not initialised (call init_process_group first)")
    device = _device()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored_params)
    fully_shard(model, mesh=mesh, ignored_params=ignored_params)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Sum, do not average. With factor 1 FSDP would ask for ReduceOp.PREMUL_SUM, which gloo
            # lacks; forcing plain SUM (and a division by 1, skipped) works on gloo and NCCL alike.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
            if hasattr(m, "set_reduce_scatter_unused_params"):
                # A parameter left without a gradient on one rank (our expert kernels give every
                # expert one, zeros if unrouted) must still join the reduce-scatter, as zeros, or
                # the ranks' reduce-scatters differ.
                m.set_reduce_scatter_unused_params(True, recurse=False)
    register_fsdp_forward_method(model, "token_logprobs")
    return model


def sync_on_last(model: FSDPModule, n: int) -> Iterator[int]:
    """``for i in sync_on_last(model, n):`` one forward/backward per i. Gradients accumulate
    unreduced on each rank and are reduce-scattered only in the last backward (one collective
    per layer per step instead of per micro-batch). Sync is back on when the loop ends or breaks."""
    try:
        for i in range(n):
            model.set_requires_gradient_sync(i == n - 1)
            yield i
    finally:
        model.set_requires_gradient_sync(True)


def equal_micro_batches(n_local: int) -> int:
    """The largest micro-batch count over all ranks (collective). Every rank must run that many
    forward/backward passes, since each pass issues FSDP's all-gathers and reduce-scatters; pad
    with :func:`padding_pass`."""
    t = torch.tensor([n_local], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def padding_pass(model: GptOss, reference=None) -> None:
    """A forward/backward on one token whose loss is multiplied by 0: it issues the same
    collectives as a real micro-batch and adds exact zeros to every gradient. ``reference``: also
    a no-grad forward of that model (what a real pass with a KL term runs; it issues collectives
    too: FSDP's all-gathers, expert parallelism's all-to-alls), run in the same order as there."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    loss = model.token_logprobs(ids, cu, ids, max_seqlen=1).sum() * 0.0
    if reference is not None:  # between the forward and the backward, as in a real pass
        with torch.no_grad():
            reference(ids, cu, ids, max_seqlen=1)
    loss.backward()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, optimizer state dict) gathered whole onto the CPU of rank 0. Collective:
    call on every rank; ranks other than 0 get empty dicts (torch's ``cpu_offload`` gathers to rank 0
    only, so no rank but the writer holds a full copy). Model keys are the plain names of
    ``GptOss.state_dict()``; optimizer state is keyed by the same names (not the integer ids of
    ``optimizer.state_dict()``; these functions give the same dicts for an unsharded model).
    ``optimizer=None`` gives an empty optimizer dict."""
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer is not None else {}
    return model_sd, optim_sd


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_sd: dict[str, torch.Tensor], optim_sd: dict) -> None:
    """The inverse of :func:`full_state_dicts`: rank 0 passes the full dicts (other ranks may pass
    empty ones); each tensor is broadcast from rank 0 and every rank keeps its own shard. Without a
    process group (one unsharded process) the dicts simply load."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    # Copies of the containers: torch replaces the values of the dicts it is given by this rank's
    # shards, which would leave the caller holding DTensors instead of its full tensors.
    set_model_state_dict(model, dict(model_sd), options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _copy_containers(optim_sd), options=opts)


def _copy_containers(x):
    if isinstance(x, dict):
        return {k: _copy_containers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_containers(v) for v in x]
    return x
