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
import copy
import itertools
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import reshard
from ..model import ByteTokenizer, GptOss, GptOssConfig, load_pretrained, load_tokenizer
from ..model.harmony import encode_completion, encode_conversation
from ..rollout.agent import Trajectory, run_episodes
from ..rollout.engine import Engine, SamplingParams
from ..rollout.tools import ToolRegistry
from . import checkpoint
from .config import TrainConfig
from .loss import group_advantages, policy_loss
from .metrics import MetricsLog
from .parallel import DataParallel
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


def rollout_copy(model, cfg: TrainConfig):
    """The engine's model and the plan that syncs it after each optimizer step.

    rollout_dtype="same": the engine runs the trainer's own modules (shared storage, nothing to
    move). Otherwise the engine gets its own copy in that dtype, refreshed in place by a
    resharding plan (one fused cast-copy in one process) whose destinations never move.
    """
    if cfg.rollout_dtype == "same":
        return model, None
    dtype = getattr(torch, cfg.rollout_dtype)
    copy_ = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    plan = reshard.build_plan([reshard.cast(n, n) for n in names], model, copy_)
    return copy_, plan


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


@contextlib.contextmanager
def offloaded(optimizer: torch.optim.Optimizer, enabled: bool):
    """Moves the optimizer's state to host memory for the duration (the rollout's KV cache gets
    the room), then back to where it was."""
    if not enabled:
        yield
        return
    moved = []
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and v.device.type != "cpu":
                moved.append((state, k, v.device))
                state[k] = v.to("cpu", non_blocking=True)
    if moved and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for state, k, device in moved:
            state[k] = state[k].to(device, non_blocking=True)


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


def sft_step(model, optimizer, batch: dict, grad_clip: float, dp: DataParallel) -> float:
    """Mean negative log-likelihood of the demonstrations' model turns over the global batch."""
    device = batch["ids"].device
    (total,) = dp.sum([batch["mask"].sum().item()], device)
    logp = model.token_logprobs(batch["ids"], batch["cu_seqlens"], batch["targets"], max_seqlen=batch["max_seqlen"])
    loss = -(logp * batch["mask"]).sum() / max(total, 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    dp.sum_grads(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return dp.sum([loss.item()], device)[0]


ENGINE_RETRIES = 2


def rollout(engine, tokenizer, tools, task, problems, cfg: TrainConfig, *, greedy: bool, seeds: list[int],
            failures: list | None = None):
    """Episodes for ``problems`` and their rewards. An exception or out-of-memory inside the engine
    resets it and re-queues the episodes (same seeds, one per episode, so the retry samples what
    the first try would have); each failure is appended to ``failures``. Tool failures never get here: they are
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
                                     tool_timeout=cfg.tool_timeout, max_concurrency=cfg.tool_concurrency, seeds=seeds)
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


def train_step(model, optimizer, trajs, advantages, cfg: TrainConfig, device, dp: DataParallel) -> dict[str, float]:
    """One optimizer step on the rollout batch, micro-batched by token count; the loss is the mean
    over every loss token of the global batch (DAPO's token-level aggregation)."""
    (total,) = dp.sum([sum(sum(t.loss_mask[1:]) for t in trajs)], device)
    total = total or 1
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
    dp.sum_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    keys = ["tis_weight_mean", "tis_truncated_frac", "clip_frac", "kl"]
    values = dp.sum([loss_value] + [sums.get(k, 0.0) for k in keys], device)
    return {"loss": values[0], "grad_norm": float(grad_norm), **dict(zip(keys, values[1:]))}


# ---- the loop ----


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> Path:
    """Runs the loop; under torchrun every process takes an equal slice of each batch (rank 0
    writes the metrics and checkpoints)."""
    dp = DataParallel()
    log = log if dp.main else (lambda *a, **k: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device, _ = _device_dtype(cfg)
    model, tokenizer = build(cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    task = make_task(cfg.task)
    tools = ToolRegistry(builtins=task.tools)
    rollout_model, sync_plan = rollout_copy(model, cfg)
    engine = Engine(rollout_model, max_cache_tokens=cfg.kv_cache_tokens, seed=cfg.seed)

    def sync_weights():
        return sync_plan.sync(model) if sync_plan is not None else None
    for n, what in ((cfg.prompts_per_step, "prompts_per_step"), (cfg.sft_batch, "sft_batch"),
                    (cfg.eval_prompts, "eval_prompts")):
        dp.bounds(n, what)  # fail early, not at the first step that needs it

    start_step, sft_done = 0, False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    last = checkpoint.latest(ckpt_dir) if resume else None
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        start_step, sft_done = state["step"], True
        sync_weights()
        log(f"resumed from {last} (step {start_step})")
    elif resume:
        log(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    metrics = None
    if dp.main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if last is not None else None)
    write = metrics.write if metrics else (lambda record: None)

    def save(step: int) -> None:
        if dp.main:
            checkpoint.save(ckpt_dir, step, model, optimizer, {"sft_done": True}, keep=cfg.keep_checkpoints)
        dp.barrier()

    def evaluate(step: int) -> float:
        """Held-out success of the policy being trained (sampled as in rollouts, the same seeds
        every time so evaluations differ by the weights only) and of its greedy decoding."""
        problems = task.sample(random.Random(f"{cfg.seed}-eval"), cfg.eval_prompts, split="eval")
        lo, hi = dp.bounds(len(problems), "eval_prompts")
        seeds = [cfg.seed * 7919 + i for i in range(lo, hi)]
        sums, failures = [], []
        for greedy in (False, True):
            _, rewards = rollout(engine, tokenizer, tools, task, problems[lo:hi], cfg, greedy=greedy, seeds=seeds,
                                 failures=failures)
            sums.append(sum(rewards))
        sampled, greedy, restarts = dp.sum([*sums, len(failures)], device)
        write({"step": step, "eval_success_rate": sampled / len(problems),
               "eval_greedy_success_rate": greedy / len(problems), "engine_restarts": int(restarts)})
        return sampled / len(problems)

    if not sft_done:
        model.train()
        with tqdm(range(1, cfg.sft_steps + 1), desc="warm-up", disable=cfg.sft_steps == 0 or not dp.main,
                  leave=False) as bar:
            for i in bar:
                probs = task.sample(random.Random(f"{cfg.seed}-sft-{i}"), cfg.sft_batch)
                lo, hi = dp.bounds(len(probs), "sft_batch")
                batch = pack(demonstrations(task, tokenizer, probs[lo:hi]), device)
                loss = sft_step(model, optimizer, batch, cfg.grad_clip, dp)
                write({"sft_step": i, "sft_loss": loss})
                bar.set_postfix(loss=f"{loss:.3f}")
        sync_weights()
        rate = evaluate(0)
        log(f"after warm-up: held-out success rate {rate:.3f}")
        save(0)

    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
    eval_rate = float("nan")
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="RL", initial=start_step, total=cfg.steps,
               disable=not dp.main)
    for step in bar:
        t0 = time.perf_counter()
        problems = task.sample(random.Random(f"{cfg.seed}-{step}"), cfg.prompts_per_step)
        lo, hi = dp.bounds(len(problems), "prompts_per_step")
        group = [p for p in problems[lo:hi] for _ in range(cfg.group_size)]
        first = lo * cfg.group_size  # global index of this rank's first episode: its sampling seed
        seeds = [(cfg.seed * 1_000_003 + step) * 65_536 + first + i for i in range(len(group))]
        failures: list[str] = []
        with offloaded(optimizer, cfg.offload_optimizer):
            trajs, rewards = rollout(engine, tokenizer, tools, task, group, cfg, greedy=False, seeds=seeds,
                                     failures=failures)
        for f in failures:
            log(f"step {step}: rollout engine failed and was reset ({f})")
        t1 = time.perf_counter()
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), cfg.group_size,
                               scale=cfg.adv_scale).tolist()
        model.train()
        stats = train_step(model, optimizer, trajs, adv, cfg, device, dp)
        t2 = time.perf_counter()
        # Weight sync into the engine's layout, in place (nothing to move when it shares storage).
        synced = sync_weights()
        sync_s = time.perf_counter() - t2
        n = cfg.prompts_per_step * cfg.group_size
        totals = dp.sum([sum(rewards), sum(sum(t.loss_mask) for t in trajs), sum(len(t.tokens) for t in trajs),
                         sum(t.turns for t in trajs), sum(t.tool_calls for t in trajs),
                         sum(t.tool_errors for t in trajs), sum(t.final_answer is not None for t in trajs),
                         len(failures)], device)
        reward_sum, gen_tokens, all_tokens, turns, calls, errors, answered, restarts = totals
        record = {
            "step": step,
            "reward_mean": reward_sum / n,
            **stats,
            "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": sync_s,
            "sync_bytes": synced.bytes_moved if synced else 0,
            "generated_tokens": int(gen_tokens),
            "rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
            "train_tokens_per_s": all_tokens / max(t2 - t1, 1e-9),
            "mean_turns": turns / n,
            "tool_calls": int(calls),
            "tool_errors": int(errors),
            "answered_frac": answered / n,
            "max_trajectory_tokens": max(len(t.tokens) for t in trajs),
            "staleness_mean": 0.0,  # every trained token was sampled by the current weights
            "engine_restarts": int(restarts),
            "processes": dp.world,
        }
        write(record)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_rate = evaluate(step)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", eval=f"{eval_rate:.2f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(step)
    bar.close()
    if metrics:
        metrics.close()
    return run_dir
