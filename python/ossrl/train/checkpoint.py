"""Atomic checkpoints: a run killed while saving resumes from the last complete one.

Each checkpoint is a folder checkpoints/step_NNNNNNNN/ holding the model (safetensors), the
optimizer state and the loop's state (JSON). It is written under a temporary name, flushed to
disk, then renamed into place: rename is atomic, so a folder with the final name is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict | None,
         state: dict[str, Any], keep: int = 2) -> Path:
    """model_state: full (unsharded) tensors by name; optimizer_state: anything torch.save takes."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(tensors, tmp / "model.safetensors")
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    for old in sorted(complete(ckpt_dir))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists())


def latest(ckpt_dir: Path) -> Path | None:
    found = complete(ckpt_dir)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict | None]:
    """(loop state, model tensors, optimizer state or None) of a complete checkpoint."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "model.safetensors")
    optim = torch.load(path / "optimizer.pt", weights_only=True) if (path / "optimizer.pt").exists() else None
    return state, tensors, optim


def check_names(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    have, want = set(tensors), set(model.state_dict())
    if have != want:
        raise ValueError(f"checkpoint {path} does not match the model: missing {sorted(want - have)[:5]}, "
                         f"unexpected {sorted(have - want)[:5]}")


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Weights as a single safetensors file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ValueError(f"{path} is missing: the run cannot resume its KL reference policy")
    return load_file(path)
