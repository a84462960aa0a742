"""LoRA adapters on the linear layers of a GptOss, for training with the base weights frozen.

The base weights stay where they are, frozen and shared: the trainer and the rollout engine run
the same modules, so there is one copy of the model and nothing to sync after an optimizer step
(the engine sees the new adapters at once). Adapters are kept in float32 whatever the base dtype,
because they are the optimizer's master weights.

Targets are the attention projections by default (``q_proj,k_proj,v_proj,o_proj``); the router
(``router``) and the output head (``lm_head``) may be added. The experts' grouped weights are not
adapted: their fused kernels take the stacked (E, H, N) weights as they are.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALLOWED_TARGETS = (*DEFAULT_TARGETS, "router", "lm_head")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) (x A^T) B^T, with W and b frozen (the very Parameters of the
    layer it replaces, so their names and storage do not change) and B zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.scale = rank, alpha / rank
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A, self.lora_B
        delta = F.linear(F.linear(x.to(a.dtype), a), b) * self.scale
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0, targets=DEFAULT_TARGETS) -> list[str]:
    """Freezes every parameter of ``model`` and puts adapters on the nn.Linear modules whose
    name ends in one of ``targets``. Returns the adapted module names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    bad = [t for t in targets if t not in ALLOWED_TARGETS]
    if bad or not targets:
        raise ValueError(f"LoRA targets must be among {', '.join(ALLOWED_TARGETS)}; got {list(targets)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    model.requires_grad_(False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in targets:
        # the head's weight is the embedding: adapting it would not be the same function at both ends
        raise ValueError("LoRA on lm_head is not supported when word embeddings are tied")
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank, alpha))
            done.append(name)
    if not done:
        raise ValueError(f"apply_lora: no nn.Linear named {list(targets)} in the model")
    return done


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: the reference policy for a KL penalty, at no memory cost."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Folds every adapter into its base weight and puts plain nn.Linear layers back (for export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            w = module.weight
            w.copy_((w.float() + module.scale * (module.lora_B @ module.lora_A)).to(w.dtype))
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
