"""Atomic checkpoints: a run killed while saving resumes from the last complete one.

Each checkpoint is a folder checkpoints/step_NNNNNNNN/ holding the model (safetensors), the
optimizer state and the loop's state (JSON). It is written under a temporary name, flushed to
disk, then renamed into place: rename is atomic, so a folder with the final name is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"
_NAME = re.compile(PREFIX + r"(\d{8})")  # only folders this module wrote count as checkpoints


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite(model_state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save(ckpt_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: dict | None,
         state: dict[str, Any], keep: int = 2) -> Path:
    """model_state: full (unsharded) tensors by name; optimizer_state: anything torch.save takes.
    Weights that are not all finite are never written (nor do they rotate good checkpoints away)."""
    bad = nonfinite(model_state)
    if bad:
        good = latest(ckpt_dir)
        raise FloatingPointError(f"step {step}: non-finite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                                 f"checkpoint not written, the last good one is {good or 'none'}")
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
    return sorted(p for p in ckpt_dir.iterdir()
                  if _NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and (p / "state.json").is_file())


def latest(ckpt_dir: Path) -> Path | None:
    found = complete(ckpt_dir)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict | None]:
    """(loop state, model tensors, optimizer state) of a complete checkpoint. A checkpoint is
    untrusted input: anything missing or malformed is a ResumeError naming the file, never a
    guess (a fresh optimizer, a renumbered run)."""
    path = Path(path)
    m = _NAME.fullmatch(path.name)
    if m is None:
        raise ResumeError(f"{path}: not a checkpoint folder (expected {PREFIX}NNNNNNNN)")
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ResumeError(f"{state_file}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ResumeError(f"{state_file}: expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or step != int(m.group(1)):
        raise ResumeError(f"{state_file}: 'step' must be the folder's step number {int(m.group(1))}, got {step!r}")
    ranks = state.get("ranks", [{}])
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        raise ResumeError(f"{state_file}: 'ranks' must be a non-empty list of objects")
    for r in ranks:
        n = r.get("next_group", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ResumeError(f"{state_file}: 'next_group' must be a non-negative integer, got {n!r}")
        if not isinstance(r.get("carry", []), list):
            raise ResumeError(f"{state_file}: 'carry' must be a list")
    for name in ("model.safetensors", "optimizer.pt"):
        if not (path / name).is_file():
            raise ResumeError(f"{path / name} is missing: refusing to resume without it")
    try:
        tensors = load_file(path / "model.safetensors")
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ResumeError(f"{path / 'model.safetensors'}: cannot be read ({type(e).__name__}: {e})") from None
    try:
        optim = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors alike
        raise ResumeError(f"{path / 'optimizer.pt'}: cannot be read ({type(e).__name__}: {e})") from None
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
