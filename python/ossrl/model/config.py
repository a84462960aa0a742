"""GPT-OSS configuration: what a checkpoint's config.json says, validated.

A config.json is untrusted input: every value is type- and range-checked here, and a bad one
raises :class:`ConfigError` naming the key. Two spellings of the rotary settings exist in the
wild and both are read:

- ``"rope_scaling": {...}`` next to a top-level ``"rope_theta"`` (the openai/gpt-oss checkpoints,
  transformers 4.x), and
- ``"rope_parameters": {..., "rope_theta": ...}`` (transformers 5 ``save_pretrained``).

Defaults for absent keys are those of transformers' ``GptOssConfig`` (gpt-oss-20b shapes), so a
config.json written by either reads the same here as there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConfigError", "RopeConfig", "GptOssConfig"]

LAYER_TYPES = ("sliding_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json (or a config built in code) that ossrl cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. ``type`` is "yarn" (GPT-OSS) or "default" (plain RoPE)."""

    theta: float = 150000.0
    type: str = "yarn"
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False
    # YaRN's cos/sin scale; None = 0.1 * ln(factor) + 1 (or the mscale ratio when both are set).
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class GptOssConfig:
    """The shapes and constants of a GPT-OSS model (defaults: gpt-oss-20b)."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    layer_types: tuple[str, ...] = tuple(("sliding_attention", "full_attention") * 12)
    sliding_window: int = 128
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        # lists as Hugging Face's config.json writes them; stored as tuples (the config is hashable)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ---- construction ----

    @classmethod
    def tiny(cls, **overrides: Any) -> "GptOssConfig":
        """The CPU default: two layers (sliding, full), hidden 64, 4 experts top-2, the vocabulary
        of ossrl's built-in byte tokenizer (``ossrl.model.tokenizer.ByteTokenizer``)."""
        from .tokenizer import ByteTokenizer

        vocab = ByteTokenizer.VOCAB_SIZE
        kw: dict[str, Any] = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=("sliding_attention", "full_attention"),
            sliding_window=128,  # GPT-OSS's own window
            max_position_embeddings=4096,
            eos_token_id=(ByteTokenizer.SPECIAL["<|return|>"], ByteTokenizer.SPECIAL["<|call|>"]),
            pad_token_id=ByteTokenizer.SPECIAL["<|endoftext|>"],
        )
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            n = overrides["num_hidden_layers"]
            kw["layer_types"] = tuple(LAYER_TYPES[i % 2] for i in range(n)) if isinstance(n, int) else ()
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GptOssConfig":
        """Reads a config.json file (or the config.json inside a checkpoint folder)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a GPT-OSS checkpoint folder needs a config.json)") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: Any) -> "GptOssConfig":
        """Builds a config from the parsed JSON object of a Hugging Face config.json."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "gpt_oss")
        if model_type != "gpt_oss":
            raise ConfigError(f"'model_type' is {model_type!r}; ossrl reads GPT-OSS checkpoints ('gpt_oss')")
        quant = d.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            if method != "mxfp4":
                raise ConfigError(f"'quantization_config.quant_method' is {method!r}; only 'mxfp4' is supported")

        default = cls()
        n_layers = _int(d, "num_hidden_layers", default.num_hidden_layers)
        layer_types = d.get("layer_types")
        if layer_types is None:  # transformers' default: alternate, sliding first
            layer_types = [LAYER_TYPES[i % 2] for i in range(n_layers)]
        elif not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ConfigError(f"'layer_types' must be a list of strings, got {layer_types!r}")
        n_heads = _int(d, "num_attention_heads", default.num_attention_heads)
        hidden = _int(d, "hidden_size", default.hidden_size)
        head_dim = d.get("head_dim")
        if head_dim is None:
            head_dim = hidden // n_heads if n_heads > 0 else 0
        n_experts_per_tok = d.get("num_experts_per_tok", d.get("experts_per_token", default.num_experts_per_tok))
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=_int(d, "vocab_size", default.vocab_size),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", default.intermediate_size),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=_int(d, "num_key_value_heads", n_heads, none_ok=True),
            head_dim=head_dim,
            num_local_experts=_int(d, "num_local_experts", default.num_local_experts),
            num_experts_per_tok=n_experts_per_tok,
            layer_types=tuple(layer_types),
            sliding_window=_int(d, "sliding_window", default.sliding_window, none_ok=True),
            rope=_rope_from_dict(d),
            max_position_embeddings=_int(d, "max_position_embeddings", default.max_position_embeddings),
            rms_norm_eps=d.get("rms_norm_eps", default.rms_norm_eps),
            swiglu_alpha=d.get("swiglu_alpha", default.swiglu_alpha),
            swiglu_limit=d.get("swiglu_limit", default.swiglu_limit),
            attention_bias=d.get("attention_bias", default.attention_bias),
            tie_word_embeddings=d.get("tie_word_embeddings", default.tie_word_embeddings),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            bos_token_id=d.get("bos_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face style config.json object (``rope_scaling`` + ``rope_theta`` spelling)."""
        d = dataclasses.asdict(self)
        rope = d.pop("rope")
        d["model_type"] = "gpt_oss"
        d["architectures"] = ["GptOssForCausalLM"]
        d["layer_types"] = list(self.layer_types)
        d["rope_theta"] = rope.pop("theta")
        rope["rope_type"] = rope.pop("type")
        d["rope_scaling"] = {k: v for k, v in rope.items() if v is not None}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    # ---- checks ----

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                    "max_position_embeddings"):
            _check_pos_int(key, getattr(self, key))
        if self.head_dim % 2:
            raise ConfigError(f"'head_dim' must be even (rotary embedding), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                f"'num_local_experts' ({self.num_local_experts})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"'layer_types' has {len(self.layer_types)} entries but 'num_hidden_layers' is {self.num_hidden_layers}"
            )
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"'layer_types[{i}]' is {t!r}; expected one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types:
            _check_pos_int("sliding_window", self.sliding_window)
        for key in ("rms_norm_eps", "swiglu_alpha", "swiglu_limit"):
            _check_pos_float(key, getattr(self, key))
        for key in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"'{key}' must be true or false, got {getattr(self, key)!r}")
        if not self.attention_bias:
            raise ConfigError("'attention_bias' is false; GPT-OSS attention projections have biases")
        ids = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        for key, vals in (("eos_token_id", ids), ("pad_token_id", (self.pad_token_id,)),
                          ("bos_token_id", (self.bos_token_id,))):
            for v in vals:
                if v is not None and (not _is_int(v) or not 0 <= v < self.vocab_size):
                    raise ConfigError(f"'{key}' must be a token id in [0, {self.vocab_size}), got {v!r}")
        _validate_rope(self.rope)

    # ---- derived ----

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (None = full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else e if isinstance(e, tuple) else (e,)


# ---- helpers ----


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(d: dict, key: str, default: Any, none_ok: bool = False) -> Any:
    v = d.get(key, default)
    if v is None and none_ok:
        return default
    return v  # type/range checked in validate(), which names the key


def _check_pos_int(key: str, v: Any) -> None:
    if not _is_int(v) or v <= 0:
        raise ConfigError(f"'{key}' must be a positive integer, got {v!r}")


def _check_pos_float(key: str, v: Any) -> None:
    if not _is_num(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"'{key}' must be a positive finite number, got {v!r}")


def _rope_from_dict(d: dict) -> RopeConfig:
    # transformers gives `rope_scaling` priority over `rope_parameters`, and rope_theta inside the dict
    # priority over the top-level key; GPT-OSS's default theta is 150000.
    params = d.get("rope_scaling") or d.get("rope_parameters")
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    theta = d.get("rope_theta", RopeConfig.theta)
    if params is None:
        return RopeConfig(theta=theta)
    if not isinstance(params, dict):
        raise ConfigError(f"'{key}' must be a JSON object, got {params!r}")
    known = {"rope_type", "type", "rope_theta", "factor", "beta_fast", "beta_slow", "original_max_position_embeddings",
             "truncate", "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"'{key}' has keys ossrl does not implement: {unknown}")
    prf = params.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise ConfigError(f"'{key}.partial_rotary_factor' is {prf!r}; only 1.0 (full rotary) is supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", theta)
    if rope_type == "default":
        return RopeConfig(theta=theta, type="default")
    if rope_type != "yarn":
        raise ConfigError(f"'{key}.rope_type' is {rope_type!r}; GPT-OSS uses 'yarn' ('default' is also accepted)")
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings", d.get("max_position_embeddings", 131072))
    if factor is None and _is_int(orig) and orig > 0:
        factor = d.get("max_position_embeddings", 131072) / orig
    return RopeConfig(
        theta=theta,
        type="yarn",
        factor=factor,
        # transformers: `get("beta_fast") or 32`, `get("truncate", True)`
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        original_max_position_embeddings=orig,
        truncate=params.get("truncate", True),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
    )


def _validate_rope(r: RopeConfig) -> None:
    if r.type not in ("yarn", "default"):
        raise ConfigError(f"'rope_scaling.rope_type' is {r.type!r}; expected 'yarn' or 'default'")
    _check_pos_float("rope_theta", r.theta)
    if r.type == "default":
        return
    _check_pos_float("rope_scaling.factor", r.factor)
    _check_pos_float("rope_scaling.beta_fast", r.beta_fast)
    _check_pos_float("rope_scaling.beta_slow", r.beta_slow)
    _check_pos_int("rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings)
    if not isinstance(r.truncate, bool):
        raise ConfigError(f"'rope_scaling.truncate' must be true or false, got {r.truncate!r}")
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        v = getattr(r, key)
        if v is not None:
            _check_pos_float(f"rope_scaling.{key}", v)
