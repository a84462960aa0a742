"""Loading a Hugging Face GPT-OSS checkpoint folder into :class:`GptOss`.

The folder holds config.json and either model.safetensors or model.safetensors.index.json plus
its shards. Shards are read one at a time and tensor by tensor (``safetensors.safe_open``), each
tensor copied into the model (built on the meta device, then allocated once on ``device``) and
dropped, so host memory beyond the model itself stays at about one tensor.

Tensor names are the model's parameter names. The expert matrices come either as plain tensors
(``...experts.gate_up_proj`` (E, H, 2I), ``...experts.down_proj`` (E, I, H)) or MXFP4-quantised,
as in the openai/gpt-oss checkpoints: ``<name>_blocks`` uint8 (E, R, C/32, 16) and
``<name>_scales`` uint8 (E, R, C/32) holding the transposed (E, R, C) matrix, R = 2I, C = H for
gate_up_proj and R = H, C = I for down_proj. Each byte of a block holds two FP4 (e2m1) values,
the low nibble first; each block of 32 values shares one UE8M0 scale 2^(s - 127). They are
dequantised to ``dtype`` on load (on ``device``, one expert at a time).

Errors (:class:`CheckpointError`, a ValueError) name the tensor or file: a missing tensor, a
wrong shape or dtype, a tensor stored twice, a malformed index or safetensors file. Tensors the
model has no place for are an error too (``strict=True``, the default) or, with
``strict=False``, a warning listing them; either way nothing is silently dropped.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .config import GptOssConfig
from .gpt_oss import GptOss

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "dequantize_mxfp4", "FP4_VALUES"]

# e2m1: sign bit, 2 exponent bits, 1 mantissa bit; index = the 4-bit code.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MXFP4 = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold the model its config.json describes."""


def load_pretrained(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16, strict: bool = True) -> GptOss:
    """Builds a :class:`GptOss` from a Hugging Face GPT-OSS checkpoint folder, weights in ``dtype`` on
    ``device``. The model is returned in eval mode with gradients enabled on its parameters."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    if not dtype.is_floating_point:
        raise ValueError(f"load_pretrained: dtype must be a floating-point dtype, got {dtype}")
    config = GptOssConfig.from_json_file(os.path.join(path, "config.json"))
    headers = _read_headers(path)
    _check_layer_count(path, config, headers)  # before building: 20k layers take minutes even on meta
    with torch.device("meta"):
        model = GptOss(config)
    _check_headers(path, config, model, headers)  # before allocating anything
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty allocates each module's parameters anew, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight

    params = dict(model.named_parameters())
    seen: set[str] = set()  # checkpoint tensor names
    filled: set[str] = set()  # model parameter names
    unexpected: list[str] = []
    pending: dict[str, dict[str, Tensor]] = {}  # MXFP4 name -> {"blocks"/"scales": tensor} until both arrive

    with torch.no_grad():
        for shard, name, tensor in _iter_tensors(path):
            if name in seen:
                raise CheckpointError(f"{shard}: tensor {name!r} is stored more than once in the checkpoint")
            seen.add(name)
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied to the embedding (transformers ignores it too)
            base, _, part = name.rpartition("_")
            if part in ("blocks", "scales") and base.endswith(_MXFP4) and base in params:
                pending.setdefault(base, {})[part] = tensor
                if len(pending[base]) == 2:
                    q = pending.pop(base)
                    if base in filled:
                        raise CheckpointError(f"tensor {base!r} is stored both dense and as MXFP4 blocks/scales")
                    _load_mxfp4(params[base], base, q["blocks"], q["scales"])
                    filled.add(base)
                continue
            if name not in params:
                unexpected.append(name)
                continue
            if name in filled:
                raise CheckpointError(f"tensor {name!r} is stored both dense and as MXFP4 blocks/scales")
            _copy(params[name], name, tensor)
            filled.add(name)

    for base, parts in pending.items():
        missing_part = "scales" if "blocks" in parts else "blocks"
        raise CheckpointError(f"checkpoint has {base}_{next(iter(parts))} but no {base}_{missing_part}")
    missing = [n for n in params if n not in filled and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"{path}: checkpoint is missing tensor(s) {missing[:10]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""
        msg = f"{path}: checkpoint has tensor(s) the model does not use: {unexpected[:10]}{more}"
        if strict:
            raise CheckpointError(msg + " (load_pretrained(..., strict=False) warns instead)")
        warnings.warn(msg, stacklevel=2)
    return model.eval()


def save_pretrained(model: GptOss, path: str | os.PathLike) -> None:
    """Writes config.json and model.safetensors (dense, in the model's dtype) into the folder ``path``:
    a Hugging Face GPT-OSS checkpoint that :func:`load_pretrained` and transformers both read."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()
               if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_dict(), f, indent=2)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """MXFP4 -> dense. blocks uint8 (..., G, 16), scales uint8 (..., G) -> (..., G * 32) in ``dtype``.

    Value 2k of a block is the low nibble of byte k, value 2k+1 the high nibble; the block's 32
    values are multiplied by 2^(scale - 127). Computed in float32, which holds every product
    exactly, then cast.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"dequantize_mxfp4: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"dequantize_mxfp4: blocks {tuple(blocks.shape)} must be scales {tuple(scales.shape)} + (16,)")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).int()  # (..., G, 16, 2): low nibble first
    values = lut[codes].flatten(-2)  # (..., G, 32)
    values = values * torch.exp2(scales.float() - 127.0)[..., None]
    return values.flatten(-2).to(dtype)


# ---- internals ----


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            # Shards are plain file names inside the folder: never an absolute path or a way out of it.
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard file name {name!r} is not a plain file name in the folder")
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{index}: shard {name!r} does not exist in {path}")
        return [os.path.join(path, n) for n in files]
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_headers(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (shard, shape) from the safetensors headers alone (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in _shard_files(path):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in out:
                        raise CheckpointError(f"{shard}: tensor {name!r} is stored more than once in the checkpoint")
                    out[name] = (shard, tuple(f.get_slice(name).get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: cannot read safetensors file ({e})") from None
    return out


def _check_layer_count(path: str, config: GptOssConfig, headers: dict) -> None:
    layers = {int(n.split(".")[2]) for n in headers if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    have = max(layers) + 1 if layers else 0
    if have != config.num_hidden_layers:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: num_hidden_layers is {config.num_hidden_layers} "
                              f"but the checkpoint's tensors hold {have} layers")


def _check_headers(path: str, config: GptOssConfig, model: GptOss, headers: dict) -> None:
    """Every parameter's shape (dense, or MXFP4 blocks and scales) against the headers."""
    for name, p in model.named_parameters():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        want = tuple(p.shape)
        if name in headers:
            shard, got = headers[name]
            if got != want:
                raise CheckpointError(f"{shard}: tensor {name!r} has shape {got}, expected {want} from config.json")
        elif name.endswith(_MXFP4) and want[1] % 32 == 0 and (f"{name}_blocks" in headers or f"{name}_scales" in headers):
            e, c, r = want
            for part, shape in (("blocks", (e, r, c // 32, 16)), ("scales", (e, r, c // 32))):
                if f"{name}_{part}" not in headers:
                    other = "scales" if part == "blocks" else "blocks"
                    raise CheckpointError(f"checkpoint has {name}_{other} but no {name}_{part}")
                shard, got = headers[f"{name}_{part}"]
                if got != shape:
                    raise CheckpointError(f"{shard}: tensor '{name}_{part}' has shape {got}, expected {shape} "
                                          f"from config.json")


def _iter_tensors(path: str) -> Iterator[tuple[str, str, Tensor]]:
    """(shard, name, tensor) for every tensor, one shard open at a time, one tensor in memory at a time."""
    from safetensors import SafetensorError, safe_open

    for shard in _shard_files(path):
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield shard, name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: cannot read safetensors file ({e})") from None


def _copy(param: Tensor, name: str, tensor: Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)} from config.json")
    if not tensor.dtype.is_floating_point:
        raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, expected a floating-point dtype")
    param.copy_(tensor)


def _load_mxfp4(param: Tensor, name: str, blocks: Tensor, scales: Tensor) -> None:
    """param (E, C, R) <- transpose of the dequantised (E, R, C) blocks, one expert at a time."""
    e, c, r = param.shape
    if c % 32:
        raise CheckpointError(f"tensor {name!r}: MXFP4 needs its input dimension ({c}) to be a multiple of 32")
    want_blocks, want_scales = (e, r, c // 32, 16), (e, r, c // 32)
    for part, t, want in (("blocks", blocks, want_blocks), ("scales", scales, want_scales)):
        if t.dtype != torch.uint8:
            raise CheckpointError(f"tensor '{name}_{part}' has dtype {t.dtype}, expected torch.uint8")
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"tensor '{name}_{part}' has shape {tuple(t.shape)}, expected {want} from config.json")
    blocks, scales = blocks.to(param.device), scales.to(param.device)
    for i in range(e):
        param[i].copy_(dequantize_mxfp4(blocks[i], scales[i], param.dtype).T)
