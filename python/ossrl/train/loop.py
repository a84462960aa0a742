"""The colocated loop: supervised warm-up, then rollout -> train -> weight sync, every step.

    for step in 1..steps:
        rollout   multi-turn episodes from the engine (KV cache allocated), tools run concurrently
        train     KV cache released; trajectories packed without padding through varlen attention
                  and the MoE kernels; GRPO-family loss with truncated importance sampling
        sync      the engine reads the trainer's parameters (same storage on one device: nothing
                  to move)
        eval      greedy episodes on held-out problems every eval_every steps

Everything a step draws (problems, samples) comes from generators seeded by (seed, step), so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..model import ByteTokenizer, GptOss, GptOssConfig, load_pretrained, load_tokenizer
from ..model.harmony import encode_completion, encode_conversation
from ..rollout.agent import Trajectory, run_episodes
from ..rollout.engine import Engine, SamplingParams
from ..rollout.tools import ToolRegistry
from . import checkpoint
from .config import TrainConfig
from .loss import group_advantages, policy_loss
from .metrics import MetricsLog
from .tasks import make_task


def _device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    # Parameters stay in float32 (they are the optimizer's master weights); bf16 is for real checkpoints.
    dtype = torch.float32 if cfg.dtype in ("auto", "float32") else torch.bfloat16
    return device, dtype


def build(cfg: TrainConfig):
    device, dtype = _device_dtype(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.model == "tiny":
        model, tokenizer = GptOss(GptOssConfig.tiny()).to(device), ByteTokenizer()
    else:
        model, tokenizer = load_pretrained(cfg.model, device=device, dtype=dtype), load_tokenizer(cfg.model)
    return model, tokenizer


# ---- packing ----


def pack(trajs: list[Trajectory], device) -> dict[str, torch.Tensor]:
    """Concatenates trajectories with no padding. Position p predicts token p+1 of its sequence;
    a sequence's last position predicts nothing (mask 0)."""
    ids, targets, mask, roll, lens = [], [], [], [], []
    for t in trajs:
        n = len(t.tokens)
        ids += t.tokens
        targets += t.tokens[1:] + [0]
        mask += t.loss_mask[1:] + [0]
        roll += t.rollout_logprobs[1:] + [0.0]
        lens.append(n)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)
    return dict(ids=as_t(ids, torch.long), targets=as_t(targets, torch.long), mask=as_t(mask, torch.float32),
                rollout_logprobs=as_t(roll, torch.float32), cu_seqlens=cu, max_seqlen=max(lens))


def micro_batches(trajs: list, budget: int) -> list[list[int]]:
    """Indices of trajectories grouped so each group has at most ``budget`` tokens (one
    trajectory longer than the budget goes alone)."""
    groups, cur, size = [], [], 0
    for i, t in enumerate(trajs):
        n = len(t.tokens)
        if cur and size + n > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        groups.append(cur)
    return groups


# ---- phases ----


def demonstrations(task, tokenizer, problems) -> list[Trajectory]:
    """The task's demonstration conversations as trajectories (model turns carry the loss)."""
    trajs = []
    for p in problems:
        toks = encode_conversation(tokenizer, task.prompt(p), add_generation_prompt=True)
        mask = [0] * len(toks)
        for m in task.demonstration(p):
            if m.role == "assistant":
                piece = encode_completion(tokenizer, m)
                mask += [1] * len(piece)
            else:
                piece = encode_conversation(tokenizer, [m], add_generation_prompt=True)
                mask += [0] * len(piece)
            toks += piece
        trajs.append(Trajectory(toks, mask, [0.0] * len(toks)))
    return trajs


def sft_step(model, optimizer, batch: dict, grad_clip: float) -> float:
    logp = model.token_logprobs(batch["ids"], batch["cu_seqlens"], batch["targets"], max_seqlen=batch["max_seqlen"])
    loss = -(logp * batch["mask"]).sum() / batch["mask"].sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item()


ENGINE_RETRIES = 2


def rollout(engine, tokenizer, tools, task, problems, cfg: TrainConfig, *, greedy: bool, seed: int,
            failures: list | None = None):
    """Episodes for ``problems`` and their rewards. An exception or out-of-memory inside the engine
    resets it and re-queues the episodes (same seed, so the retry samples what the first try
    would have); each failure is appended to ``failures``. Tool failures never get here: they are
    error messages in the conversation."""
    prompts = [encode_conversation(tokenizer, task.prompt(p), add_generation_prompt=True) for p in problems]
    params = SamplingParams(temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens)
    was_training = engine.model.training
    engine.model.eval()
    try:
        for attempt in range(ENGINE_RETRIES + 1):
            engine.allocate_cache()
            try:
                trajs = run_episodes(engine, tokenizer, tools, prompts, params, max_turns=cfg.max_turns,
                                     tool_timeout=cfg.tool_timeout, max_concurrency=cfg.tool_concurrency, seed=seed)
                break
            except (RuntimeError, torch.OutOfMemoryError) as e:
                engine.reset()
                if failures is not None:
                    failures.append(f"{type(e).__name__}: {e}")
                if attempt == ENGINE_RETRIES:
                    raise
        engine.release_cache()  # the trainer takes the memory back
    finally:
        engine.model.train(was_training)
    rewards = [task.reward(p, t.final_answer) for p, t in zip(problems, trajs)]
    return trajs, rewards


def train_step(model, optimizer, trajs, advantages, cfg: TrainConfig, device) -> dict[str, float]:
    """One optimizer step on the rollout batch, micro-batched by token count; the loss is the mean
    over every loss token of the batch (DAPO's token-level aggregation)."""
    total = sum(sum(t.loss_mask[1:]) for t in trajs) or 1
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    loss_value = 0.0
    for idx in micro_batches(trajs, cfg.micro_batch_tokens):
        b = pack([trajs[i] for i in idx], device)
        adv = torch.repeat_interleave(
            torch.tensor([advantages[i] for i in idx], dtype=torch.float32, device=device),
            (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long())
        logp = model.token_logprobs(b["ids"], b["cu_seqlens"], b["targets"], max_seqlen=b["max_seqlen"])
        # One update per rollout batch: the trainer's log-probs before it ARE this forward's.
        loss, st = policy_loss(logp, logp.detach(), b["rollout_logprobs"], adv, b["mask"], cfg.loss)
        share = st["loss_tokens"] / total
        (loss * share).backward()
        loss_value += loss.item() * share
        for k in ("tis_weight_mean", "tis_truncated_frac", "clip_frac", "kl"):
            sums[k] = sums.get(k, 0.0) + st[k] * share
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": loss_value, "grad_norm": float(grad_norm), **sums}


# ---- the loop ----


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device, _ = _device_dtype(cfg)
    model, tokenizer = build(cfg)
    task = make_task(cfg.task)
    tools = ToolRegistry(builtins=task.tools)
    engine = Engine(model, max_cache_tokens=cfg.kv_cache_tokens, seed=cfg.seed)

    start_step, sft_done = 0, False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    last = checkpoint.latest(ckpt_dir) if resume else None
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        start_step, sft_done = state["step"], True
        log(f"resumed from {last} (step {start_step})")
    elif resume:
        log(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if last is not None else None)

    def evaluate(step: int) -> float:
        """Held-out success of the policy being trained (sampled as in rollouts, same seed every
        time so evaluations differ by the weights only) and of its greedy decoding."""
        problems = task.sample(random.Random(f"{cfg.seed}-eval"), cfg.eval_prompts, split="eval")
        rates, failures = {}, []
        for key, greedy in (("eval_success_rate", False), ("eval_greedy_success_rate", True)):
            _, rewards = rollout(engine, tokenizer, tools, task, problems, cfg, greedy=greedy, seed=cfg.seed + 7,
                                 failures=failures)
            rates[key] = sum(rewards) / len(rewards)
        metrics.write({"step": step, **rates, "engine_restarts": len(failures)})
        return rates["eval_success_rate"]

    if not sft_done:
        model.train()
        with tqdm(range(1, cfg.sft_steps + 1), desc="warm-up", disable=cfg.sft_steps == 0, leave=False) as bar:
            for i in bar:
                probs = task.sample(random.Random(f"{cfg.seed}-sft-{i}"), cfg.sft_batch)
                loss = sft_step(model, optimizer, pack(demonstrations(task, tokenizer, probs), device), cfg.grad_clip)
                metrics.write({"sft_step": i, "sft_loss": loss})
                bar.set_postfix(loss=f"{loss:.3f}")
        rate = evaluate(0)
        log(f"after warm-up: held-out success rate {rate:.3f}")
        checkpoint.save(ckpt_dir, 0, model, optimizer, {"sft_done": True}, keep=cfg.keep_checkpoints)

    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    eval_rate = float("nan")
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="RL", initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        problems = task.sample(random.Random(f"{cfg.seed}-{step}"), cfg.prompts_per_step)
        group = [p for p in problems for _ in range(cfg.group_size)]
        failures: list[str] = []
        trajs, rewards = rollout(engine, tokenizer, tools, task, group, cfg, greedy=False,
                                 seed=cfg.seed * 1_000_003 + step, failures=failures)
        for f in failures:
            log(f"step {step}: rollout engine failed and was reset ({f})")
        t1 = time.perf_counter()
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), cfg.group_size,
                               scale=cfg.adv_scale).tolist()
        model.train()
        stats = train_step(model, optimizer, trajs, adv, cfg, device)
        t2 = time.perf_counter()
        # Weight sync: the engine runs the trainer's own modules (same storage): nothing to move.
        sync_s = time.perf_counter() - t2
        gen_tokens = sum(sum(t.loss_mask) for t in trajs)
        record = {
            "step": step,
            "reward_mean": sum(rewards) / len(rewards),
            **stats,
            "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": sync_s, "sync_bytes": 0,
            "generated_tokens": gen_tokens,
            "rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
            "train_tokens_per_s": sum(len(t.tokens) for t in trajs) / max(t2 - t1, 1e-9),
            "mean_turns": sum(t.turns for t in trajs) / len(trajs),
            "tool_calls": sum(t.tool_calls for t in trajs),
            "tool_errors": sum(t.tool_errors for t in trajs),
            "answered_frac": sum(t.final_answer is not None for t in trajs) / len(trajs),
            "max_trajectory_tokens": max(len(t.tokens) for t in trajs),
            "staleness_mean": 0.0,  # every trained token was sampled by the current weights
            "engine_restarts": len(failures),
        }
        metrics.write(record)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_rate = evaluate(step)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", eval=f"{eval_rate:.2f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint.save(ckpt_dir, step, model, optimizer, {"sft_done": True}, keep=cfg.keep_checkpoints)
    bar.close()
    metrics.close()
    return run_dir
