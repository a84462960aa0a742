"""Training configuration: defaults, a TOML file, then ``key=value`` overrides, validated.

Configs are untrusted input: unknown keys and wrongly typed values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loss import LossConfig


@dataclass
class TrainConfig:
    # what to train
    model: str = "tiny"  # "tiny" (built-in CPU default) or a Hugging Face GPT-OSS checkpoint folder
    # a built-in task (ossrl.train.tasks.TASKS); "" means "arithmetic" unless a dataset or an
    # environment_factory is given (they replace it; setting both is an error)
    task: str = ""
    # bring your own task (TRL's conventions; see ossrl.train.task)
    dataset: str = ""  # .jsonl, .parquet or a datasets.save_to_disk folder; rows with a "prompt"
    eval_dataset: str = ""  # the same format; default: a fixed hash split of dataset
    sft_dataset: str = ""  # warm-up demonstrations: a "messages" column (OpenAI chat); none: no warm-up
    reward_funcs: list = field(default_factory=list)  # import paths "pkg.mod:fn"
    reward_weights: list = field(default_factory=list)  # one per reward function (default 1.0 each)
    tools: list = field(default_factory=list)  # "calculator", "python", "python_session" or import paths of functions
    environment_factory: str = ""  # import path of a class: one instance per episode
    success_threshold: float = 1.0  # eval_success_rate: the fraction of episodes whose reward reaches this
    agent: str = ""  # import path of `async def fn(client, **row) -> float | None` (OpenAI API; ossrl.train.agents)
    agent_timeout: float = 300.0  # seconds per agent episode
    chat_preamble: bool = True  # user tasks: the harmony system message and the tool declarations
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # the trainer's weights: auto = float32 (AdamW's master weights) | float32 | bfloat16
    # supervised warm-up on generated demonstrations, then RL
    sft_steps: int = 600
    sft_batch: int = 96
    sft_lr: float = 3e-3
    sft_warmup_steps: int = 10
    # the built-in task's teacher answers this fraction of its demonstrations from memory (a
    # wrong guess) instead of calling the tool: the warm-up teaches the tool format, RL has to
    # teach the policy to use the tool every time
    demo_guess_rate: float = 0.6
    steps: int = 50
    lr: float = 2e-4
    warmup_steps: int = 5  # RL: linear warm-up of the learning rate
    # both phases: linear warm-up, then cosine decay to min_lr_ratio * peak at the phase's end
    # ("constant": no decay). A decaying rate is what makes the warm-up's end point, and the RL
    # policy's, stop depending on the last few noisy steps.
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompts_per_step: int = 16
    group_size: int = 8
    # rollout
    max_new_tokens: int = 96  # per assistant turn
    max_turns: int = 3
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    kv_cache_tokens: int = 65536
    rollout_dtype: str = "same"  # same: the engine runs the trainer's modules; bfloat16/float32: its own copy
    tool_timeout: float = 5.0
    tool_concurrency: int = 64
    # the sandboxed python tools: a warm pool (a zygote forks each call) or a fresh interpreter per call
    sandbox_pool: bool = True
    sandbox_slots: int = 0  # sandboxes running at once, the pool's size (0: 2 per CPU, at least 4)
    sandbox_idle_s: float = 30.0  # a zygote without calls this long is stopped (restarted on demand)
    sandbox_pool_memory_mb: int = 256  # the zygote's own address-space limit
    tool_backend: str = "local"  # local | ray: python calls on Ray workers (pip install 'ossrl[ray]')
    ray_address: str = ""  # the Ray cluster for tool_backend = "ray" ("": start a local one)
    # stragglers: each step starts prompts_per_step + extra_groups groups and trains on the groups
    # complete when prompts_per_step of them are; the others are paused and resumed next step
    extra_groups: int = 4
    max_staleness: int = 4  # a carried group sampled more policy versions ago than this is dropped
    reproducible_rollouts: bool = True  # tool results rejoin at the next engine step (same run every time)
    # training
    adv_scale: str = "std"  # std (GRPO) | none (Dr. GRPO)
    # DAPO's dynamic sampling: groups whose rewards are all equal (no policy-gradient signal) are
    # not trained on, and a step with no such group anywhere takes no optimizer step at all
    # (Adam's momentum would otherwise keep moving the weights with nothing to learn from)
    filter_groups: bool = True
    # MoE routing replay: the trainer routes every token to the experts the rollout engine chose
    # (weights recomputed from the trainer's router logits: the router still learns)
    routing_replay: bool = False
    micro_batch_tokens: int = 8192
    parallel: str = "dp"  # under torchrun: dp (every rank holds the model) | fsdp (FSDP2 shards)
    expert_parallel: int = 1  # under torchrun: split each MoE layer's experts across this many ranks
    context_parallel: int = 1  # under torchrun: split each packed micro-batch's tokens across this many ranks
    activation_checkpointing: bool = False  # recompute each layer in the backward (long trajectories)
    offload_optimizer: bool = False  # optimizer state in host memory during rollouts (GPU)
    offload_activations: bool = False  # tensors saved for the backward kept in host memory (GPU)
    lora_rank: int = 0  # > 0: train LoRA adapters only; the engine runs the same frozen base (one copy)
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated; router and lm_head allowed too
    loss: LossConfig = field(default_factory=LossConfig)
    # bookkeeping
    eval_every: int = 5
    eval_prompts: int = 128
    checkpoint_every: int = 10
    keep_checkpoints: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if isinstance(current, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        numbers = key.endswith("weights")
        for v in value:
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) if numbers \
                else isinstance(v, str)
            if not ok:
                raise ValueError(f"config key {key!r} must be a list of {'finite numbers' if numbers else 'strings'}, "
                                 f"got {v!r} in it")
        return [float(v) for v in value] if numbers else list(value)
    raise ValueError(f"config key {key!r} cannot be set to {value!r}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {full!r} is a table; set {full}.NAME instead")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, current))


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    nested: dict[str, Any] = {}
    cur = nested
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    cfg = TrainConfig()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path}: {e}") from None
        _apply(cfg, data)
    for item in overrides:
        _apply(cfg, _parse_override(item))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    positive = ["sft_batch", "prompts_per_step", "group_size", "max_new_tokens", "max_turns", "kv_cache_tokens",
                "tool_concurrency", "micro_batch_tokens", "eval_prompts", "eval_every", "checkpoint_every",
                "keep_checkpoints", "expert_parallel", "context_parallel"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ValueError(f"config key {key!r} must be positive, got {getattr(cfg, key)}")
    for key in ("steps", "sft_steps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 0")
    if cfg.adv_scale not in ("std", "none"):
        raise ValueError(f"config key 'adv_scale' must be 'std' or 'none', got {cfg.adv_scale!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config key 'device' must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"config key 'dtype' must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.rollout_dtype not in ("same", "float32", "bfloat16"):
        raise ValueError(f"config key 'rollout_dtype' must be same, float32 or bfloat16, got {cfg.rollout_dtype!r}")
    for key in ("extra_groups", "max_staleness", "lora_rank"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.lora_rank:
        from ..model.lora import ALLOWED_TARGETS

        targets = cfg.lora_targets.split(",")
        if not targets or any(t not in ALLOWED_TARGETS for t in targets):
            raise ValueError(f"config key 'lora_targets' must list some of {', '.join(ALLOWED_TARGETS)}, "
                             f"got {cfg.lora_targets!r}")
    if cfg.tool_backend not in ("local", "ray"):
        raise ValueError(f"config key 'tool_backend' must be local or ray, got {cfg.tool_backend!r}")
    if cfg.sandbox_slots < 0 or cfg.sandbox_pool_memory_mb <= 0:
        raise ValueError("config keys 'sandbox_slots' must be >= 0 and 'sandbox_pool_memory_mb' positive")
    if cfg.parallel not in ("dp", "fsdp"):
        raise ValueError(f"config key 'parallel' must be dp or fsdp, got {cfg.parallel!r}")
    for key in ("warmup_steps", "sft_warmup_steps"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"config key 'lr_schedule' must be cosine or constant, got {cfg.lr_schedule!r}")
    if not 0 <= cfg.demo_guess_rate <= 1:
        raise ValueError(f"config key 'demo_guess_rate' must be in [0, 1], got {cfg.demo_guess_rate}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"config key 'min_lr_ratio' must be in [0, 1], got {cfg.min_lr_ratio}")
    # Every float is finite already (_coerce); these must also be positive / non-negative. A
    # NaN or negative rate would otherwise train garbage into checkpoints that rotate good ones away.
    floats = [(cfg, k, "> 0") for k in ("lr", "sft_lr", "grad_clip", "tool_timeout", "lora_alpha", "agent_timeout",
                                         "sandbox_idle_s")]
    floats += [(cfg, k, ">= 0") for k in ("weight_decay", "temperature")]
    floats += [(cfg.loss, k, ">= 0") for k in ("clip_low", "clip_high", "kl_coef")]
    for obj, key, rule in floats:
        v = getattr(obj, key)
        name = f"loss.{key}" if obj is cfg.loss else key
        if not math.isfinite(v) or (v <= 0 if rule == "> 0" else v < 0):
            raise ValueError(f"config key {name!r} must be a finite number {rule}, got {v}")
    if cfg.loss.clip_low >= 1:
        raise ValueError(f"config key 'loss.clip_low' must be below 1 (the ratio's lower bound is 1 - clip_low), "
                         f"got {cfg.loss.clip_low}")
    if not math.isfinite(cfg.loss.tis_cap):
        raise ValueError(f"config key 'loss.tis_cap' must be finite (<= 0 turns the correction off), got {cfg.loss.tis_cap}")
