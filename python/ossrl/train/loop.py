"""The colocated loop: supervised warm-up, then rollout -> train -> weight sync, every step.

    for step in 1..steps:
        rollout   groups of multi-turn episodes from the engine (KV cache allocated), tools run
                  concurrently; the phase ends when the step's quota of groups is complete: the
                  stragglers are paused (KV dropped, tokens and log-probs kept) and carried over
        train     KV cache released; the complete groups packed without padding through varlen
                  attention and the MoE kernels; GRPO-family loss with truncated importance
                  sampling (which also covers the carried tokens' older policy)
        sync      the engine gets the new weights in place (nothing to move when it shares the
                  trainer's modules, LoRA included)
        eval      held-out episodes every eval_every steps

Everything a step draws (problems, samples) comes from generators seeded by the run's seed and
the group's number, and paused episodes are checkpointed, so a resumed run repeats exactly what
an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import reshard
from ..model import ByteTokenizer, GptOss, GptOssConfig, load_pretrained, load_tokenizer
from ..model.gpt_oss import RoutingTape
from ..model.lora import adapters_disabled, apply_lora
from ..rollout.agent import CONTEXT, Trajectory
from ..rollout.engine import Engine
from ..rollout.tool_metrics import tool_step_metrics
from . import checkpoint
from .config import TrainConfig
from .loss import group_advantages, policy_loss, signal_groups
from .schedule import scheduled_lr, set_lr
from .metrics import MetricsLog
from .fsdp import padding_pass
from .parallel import DataParallel, make_parallel
from .agents import agent_eval, agent_rollout
from .episodes import Group, demo_trajectory, rollout, run_episodes, score
from .task import Task, build_task
from .utilization import BusyMeter


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
        model, tokenizer = GptOss(GptOssConfig.tiny()).to(device=device, dtype=dtype), ByteTokenizer()
    else:
        model, tokenizer = load_pretrained(cfg.model, device=device, dtype=dtype), load_tokenizer(cfg.model)
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
    return model, tokenizer


def rollout_copy(model, cfg: TrainConfig, *, replica: bool = False):
    """The engine's model. rollout_dtype="same" (and no ``replica`` asked for): the trainer's own
    modules (shared storage, nothing to move). Otherwise a copy in that dtype, made before the
    trainer is sharded and refreshed in place after every step by :func:`sync_plan`."""
    if cfg.rollout_dtype == "same" and not replica:
        return model
    dtype = next(model.parameters()).dtype if cfg.rollout_dtype == "same" else getattr(torch, cfg.rollout_dtype)
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(False)


def sync_plan(model, engine_model, *, trainable_only: bool = False):
    """The resharding plan from the trainer's parameters (plain or FSDP2 shards) into the engine's
    copy: one fused cast-copy per bucket, destinations that never move; None when shared.
    trainable_only: only what the optimizer changes (LoRA: the adapters; the frozen base in the
    copy never goes stale)."""
    if engine_model is model:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    # FSDP2 and expert parallelism together shard over two meshes: a plan for each
    return reshard.build_plans([reshard.cast(n, n) for n in names], model, engine_model, strict=not trainable_only)


# ---- packing ----


def pack(trajs: list[Trajectory], device, routing_shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Concatenates trajectories with no padding. Position p predicts token p+1 of its sequence;
    a sequence's last position predicts nothing (mask 0). ``routing_shape`` (layers, top_k):
    also ``routing`` (T, layers, top_k) int32, the experts the engine recorded, -1 where none."""
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
    out = dict(ids=as_t(ids, torch.long), targets=as_t(targets, torch.long), mask=as_t(mask, torch.float32),
               rollout_logprobs=as_t(roll, torch.float32), cu_seqlens=cu, max_seqlen=max(lens))
    if routing_shape is not None and any(t.routing for t in trajs):
        import numpy as np

        width = routing_shape[0] * routing_shape[1]
        rows = []
        for t in trajs:
            n = len(t.tokens)
            got = np.frombuffer(t.routing, dtype=np.uint8)
            if got.size % width or got.size > n * width:
                raise ValueError(f"pack: a trajectory's routing record ({got.size} bytes) does not fit "
                                 f"{n} tokens x {routing_shape[0]} layers x {routing_shape[1]} experts")
            r = np.full((n, width), -1, dtype=np.int32)
            r[: got.size // width] = got.reshape(-1, width)
            rows.append(r)
        out["routing"] = torch.from_numpy(np.concatenate(rows)).view(-1, *routing_shape).to(device)
    return out


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


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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


def activations_on_host(enabled: bool):
    """Tensors saved for the backward go to (pinned) host memory and come back when needed: with
    activation checkpointing that is one hidden state per layer, so GPU memory no longer grows
    with the trajectory's length times the depth."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


def sft_step(model, optimizer, batch: dict, grad_clip: float, dp: DataParallel) -> float:
    """Mean negative log-likelihood of the demonstrations' model turns over the global batch."""
    device = batch["ids"].device
    (total,) = dp.sum([batch["mask"].sum().item()], device)
    optimizer.zero_grad(set_to_none=True)
    for _ in dp.passes(model, 1):
        logp = model.token_logprobs(batch["ids"], batch["cu_seqlens"], batch["targets"], max_seqlen=batch["max_seqlen"])
        loss = -(logp * batch["mask"]).sum() / max(total, 1.0)
        loss.backward()
    dp.reduce_grads(model)
    dp.clip_grads(model, grad_clip)
    optimizer.step()
    return dp.sum([loss.item()], device)[0]


def _reference_forward(model, ref_model):
    """``token_logprobs`` of the reference policy: the base model with the adapters switched off in
    LoRA mode (no extra memory), else a frozen copy of the post-warm-up weights."""
    if ref_model is not None:
        return ref_model.token_logprobs

    def base(*args, **kwargs):
        with adapters_disabled(model):
            return model.token_logprobs(*args, **kwargs)
    return base


def reference_logprobs(model, ref_model, batch: dict) -> torch.Tensor | None:
    """Log-probs under the reference policy for the KL penalty (see :func:`_reference_forward`)."""
    with torch.no_grad():
        return _reference_forward(model, ref_model)(batch["ids"], batch["cu_seqlens"], batch["targets"],
                                                    max_seqlen=batch["max_seqlen"])


def train_step(model, optimizer, trajs, advantages, cfg: TrainConfig, device, dp: DataParallel,
               ref_model=None) -> dict[str, float]:
    """One optimizer step on the rollout batch, micro-batched by token count; the loss is the mean
    over every loss token of the global batch (DAPO's token-level aggregation)."""
    (total,) = dp.sum([sum(sum(t.loss_mask[1:]) for t in trajs)], device)
    total = total or 1
    # Context parallelism: the ranks of a block train on the union of their trajectories, each on
    # 1/C of every micro-batch's tokens (so a micro-batch may hold C times the per-rank budget).
    peers = dp.context_peers(list(zip(trajs, advantages)))
    trajs, advantages = [t for p in peers for t, _ in p], [a for p in peers for _, a in p]
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    loss_value, gap_max, agree, compared = 0.0, 0.0, 0.0, 0.0
    mc = model.config  # FSDP2 keeps the module (and its config); dp does not wrap
    routing_shape = (mc.num_hidden_layers, mc.num_experts_per_tok)
    batches = micro_batches(trajs, cfg.micro_batch_tokens * dp.cp)
    if len(batches) > 1 and sum(len(trajs[i].tokens) for i in batches[-1]) < dp.cp:
        last = batches.pop()  # every rank of a context-parallel block needs a token of each
        batches[-1] = batches[-1] + last
    for k in dp.passes(model, len(batches)):
        if k is None:  # FSDP, expert parallelism: as many passes as the busiest rank, these add zeros
            padding_pass(model, _reference_forward(model, ref_model) if cfg.loss.kl_coef else None)
            continue
        idx = batches[k]
        b = pack([trajs[i] for i in idx], device, routing_shape=routing_shape)
        b["adv"] = torch.repeat_interleave(
            torch.tensor([advantages[i] for i in idx], dtype=torch.float32, device=device),
            (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long())
        shard = dp.context_shard(b["cu_seqlens"])
        if shard is not None:  # this rank's tokens of the micro-batch
            b.update({key: shard.local(b[key]) for key in ("ids", "targets", "mask", "rollout_logprobs", "adv",
                                                             "routing") if key in b},
                     cu_seqlens=shard.cu_seqlens_q, max_seqlen=shard.max_q)
        adv = b["adv"]
        tape = RoutingTape(b.get("routing"), replay=cfg.routing_replay)
        contexts = [m.context_shard(shard) for m in (model, ref_model) if m is not None]
        with model.routing_tape(tape), contextlib.ExitStack() as stack:  # around the backward too
            for c in contexts:
                stack.enter_context(c)
            with activations_on_host(cfg.offload_activations):
                logp = model.token_logprobs(b["ids"], b["cu_seqlens"], b["targets"], max_seqlen=b["max_seqlen"])
            # One update per rollout batch: the trainer's log-probs before it ARE this forward's.
            ref = reference_logprobs(model, ref_model, b) if cfg.loss.kl_coef else None
            loss, st = policy_loss(logp, logp.detach(), b["rollout_logprobs"], adv, b["mask"], cfg.loss, logp_ref=ref)
            share = st["loss_tokens"] / total
            (loss * share).backward()
        if tape.compared is not None:
            agree += float(tape.agree)
            compared += float(tape.compared)
        loss_value += loss.item() * share
        for k in ("tis_weight_mean", "tis_truncated_frac", "clip_frac", "kl", "mismatch_kl"):
            sums[k] = sums.get(k, 0.0) + st[k] * share
        gap_max = max(gap_max, st["logprob_gap_max"])
    dp.reduce_grads(model)
    grad_norm = dp.clip_grads(model, cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    finite = bool(torch.isfinite(grad_norm))  # the same on every rank: the norm of the summed gradients
    if finite:
        optimizer.step()
    else:  # one bad batch (an overflow, a NaN log-prob) must not poison the weights: skip the update
        optimizer.zero_grad(set_to_none=True)
    keys = ["tis_weight_mean", "tis_truncated_frac", "clip_frac", "kl", "mismatch_kl"]
    values = dp.sum([loss_value] + [sums.get(k, 0.0) for k in keys] + [agree, compared], device)
    agree, compared = values[-2:]
    return {"loss": values[0], "grad_norm": float(grad_norm) if finite else None, "nonfinite_grad": not finite,
            **dict(zip(keys, values[1:-2])), "logprob_gap_max": dp.max(gap_max, device),
            # token-layer pairs whose trainer top-k set equals the rollout's (before any replay)
            "routing_agreement": agree / compared if compared else None}


# ---- the loop ----


def _env_rollout(task, engine, tokenizer, cfg, carry, quota, extra, next_group, version, step, dp, optimizer, log):
    """One rollout phase of environment episodes (built-in or a user's): carried groups first
    (those sampled too long ago are dropped: their tokens would be too stale), new ones to fill
    the quota plus extra_groups; the phase ends when quota groups are complete, the rest are
    paused and carried. Returns what the step trains on and what it carries."""
    fresh = [g for g in carry if (g.oldest_version() is None or version - g.oldest_version() <= cfg.max_staleness)]
    dropped = len(carry) - len(fresh)
    kept = {id(g) for g in fresh}
    for g in carry:
        if id(g) not in kept:
            g.close()
    active = fresh + [Group.new((next_group + k) * dp.world + dp.rank, task, tokenizer, cfg)
                      for k in range(quota + extra - len(fresh))]
    next_group += len(active) - len(fresh)
    trajs = [t for g in active for t in g.trajs]
    members = [list(range(k * cfg.group_size, (k + 1) * cfg.group_size)) for k in range(len(active))]
    failures: list[str] = []
    with offloaded(optimizer, cfg.offload_optimizer):
        done = rollout(engine, tokenizer, [ep.registry for g in active for ep in g.episodes], trajs, cfg,
                       greedy=False, version=version, groups=members, quota=min(quota, len(active)),
                       failures=failures)
    for f in failures:
        log(f"step {step}: rollout engine failed and was reset ({f})")
    finished = [active[k] for k in done]
    carry = [g for k, g in enumerate(active) if k not in set(done)]
    trajs = [t for g in finished for t in g.trajs]
    scores = [score(task, [g.row] * len(g.trajs), g.episodes, g.trajs, step=step) for g in finished]
    for g in finished:
        g.close()
    rewards = [r for sc in scores for r in sc.totals]
    return trajs, list(range(len(trajs))), rewards, scores, {}, finished, dropped, failures, carry, next_group


def _sum_count(values) -> tuple[float, int]:
    got = [v for v in values if v is not None]
    return sum(got), len(got)


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, log=print, task: Task | None = None) -> Path:
    """Runs the loop; under torchrun every process takes an equal share of each step's groups
    (rank 0 writes the metrics and checkpoints). ``task``: what to train on (default: the one
    the config describes, see :func:`ossrl.train.task.build_task`)."""
    task = task if task is not None else build_task(cfg)  # every task error before any model is built
    dp = make_parallel(cfg.parallel, cfg.expert_parallel, cfg.context_parallel)
    log = log if dp.main else (lambda *a, **k: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    device, _ = _device_dtype(cfg)
    model, tokenizer = build(cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    engine_model = rollout_copy(model, cfg, replica=dp.sharded or dp.ep > 1)  # the engine needs every expert
    # The KL reference: the post-warm-up policy (a frozen copy, sharded like the trainer; in LoRA
    # mode the base model itself). Copied before sharding, filled after the warm-up.
    ref_model = copy.deepcopy(model).requires_grad_(False).eval() if cfg.loss.kl_coef and not cfg.lora_rank else None
    model = dp.prepare(model)
    ref_model = dp.prepare(ref_model) if ref_model is not None else None
    plan = sync_plan(model, engine_model, trainable_only=bool(cfg.lora_rank))
    engine = Engine(engine_model, max_cache_tokens=cfg.kv_cache_tokens, seed=cfg.seed)
    engine.record_routing = True  # routing_agreement every step; the experts to replay with routing_replay
    busy = BusyMeter(device)

    def sync_weights():
        return plan.sync(model) if plan is not None else None
    quota_lo, quota_hi = dp.bounds(cfg.prompts_per_step, "prompts_per_step")
    extra_lo, extra_hi = dp.bounds(cfg.extra_groups, "extra_groups")
    quota, extra = quota_hi - quota_lo, extra_hi - extra_lo  # this rank's groups per step
    for n, what in ((cfg.sft_batch, "sft_batch"), (cfg.eval_prompts, "eval_prompts")):
        dp.bounds(n, what)  # fail early, not at the first step that needs it

    start_step, sft_done = 0, False
    carry: list[Group] = []  # this rank's unfinished groups, resumed next step
    next_group = 0  # this rank's groups started so far; group numbers are next_group * world + rank
    optimizer = torch.optim.AdamW(trainable(model), lr=cfg.sft_lr, weight_decay=cfg.weight_decay,
                                  **dp.optimizer_options())
    last = checkpoint.latest(ckpt_dir) if resume else None
    if last is not None:
        state, tensors, optim = checkpoint.load(last)
        checkpoint.check_names(last, model, tensors)
        dp.load_state_dicts(model, optimizer, tensors, optim)
        start_step, sft_done = state["step"], True
        mine = state.get("ranks", [{}] * dp.world)
        if len(mine) != dp.world:
            raise ValueError(f"{last} was written by {len(mine)} processes; resume it with as many, not {dp.world}")
        try:  # a checkpoint is untrusted input: a clear error, not a stack of TypeErrors
            carry = [Group.from_json(g, task) for g in mine[dp.rank].get("carry", [])]
            next_group = int(mine[dp.rank].get("next_group", 0))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise ValueError(f"{last}/state.json: malformed paused episodes ({type(e).__name__}: {e})") from None
        full = sync_plan(model, engine_model)  # the whole model once; then what training changes
        if full is not None:
            full.sync(model)
        log(f"resumed from {last} (step {start_step})")
    elif resume:
        log(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    metrics = None
    if dp.main:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if last is not None else None)
    write = metrics.write if metrics else (lambda record: None)

    def save(step: int) -> None:
        ranks = dp.gather({"carry": [g.to_json() for g in carry], "next_group": next_group})
        tensors, optim = dp.state_dicts(model, optimizer)  # collective under FSDP
        # every rank learns that rank 0 refuses non-finite weights (none may wait at the barrier)
        (bad,) = dp.sum([len(checkpoint.nonfinite(tensors)) if dp.main else 0], device)
        if bad and not dp.main:
            raise FloatingPointError(f"step {step}: non-finite weights; rank 0 did not write the checkpoint")
        if dp.main:
            checkpoint.save(ckpt_dir, step, tensors, optim, {"sft_done": True, "ranks": ranks},
                            keep=cfg.keep_checkpoints)
        dp.barrier()

    def evaluate(step: int) -> float:
        """Held-out success of the policy being trained (sampled as in rollouts, the same seeds
        every time so evaluations differ by the weights only) and of its greedy decoding: the
        fraction of episodes whose total reward reaches success_threshold."""
        rows = task.eval_rows(cfg.eval_prompts)
        lo, hi = dp.bounds(len(rows), "eval_prompts")
        seeds = [cfg.seed * 7919 + i for i in range(lo, hi)]
        sums, failures = [], []
        if task.agent is not None:  # the agent itself, once per row (it chooses how to sample)
            rewards = agent_eval(task, engine, tokenizer, rows[lo:hi], cfg, step)
            ok, total = dp.sum([sum(r >= cfg.success_threshold for r in rewards), sum(rewards)], device)
            write({"step": step, "eval_success_rate": ok / len(rows), "eval_greedy_success_rate": None,
                   "eval_reward_mean": total / len(rows), "engine_restarts": 0})
            return ok / len(rows)
        for greedy in (False, True):
            _, sc = run_episodes(engine, tokenizer, task, rows[lo:hi], cfg, greedy=greedy, seeds=seeds,
                                 failures=failures)
            sums += [sum(r >= cfg.success_threshold for r in sc.totals), sum(sc.totals)]
        sampled, _, greedy, reward_sum, restarts = dp.sum([*sums, len(failures)], device)
        write({"step": step, "eval_success_rate": sampled / len(rows),
               "eval_greedy_success_rate": greedy / len(rows), "eval_reward_mean": reward_sum / len(rows),
               "engine_restarts": int(restarts)})
        return sampled / len(rows)

    ref_path = ckpt_dir / "reference.safetensors"
    if not sft_done:
        model.train()
        steps = cfg.sft_steps if task.demos is not None else 0  # no demonstrations: no warm-up
        with tqdm(range(1, steps + 1), desc="warm-up", disable=steps == 0 or not dp.main, leave=False) as bar:
            for i in bar:
                set_lr(optimizer, scheduled_lr(cfg.sft_lr, i, cfg.sft_steps, cfg, cfg.sft_warmup_steps))
                lo, hi = dp.bounds(cfg.sft_batch, "sft_batch")
                demos = [demo_trajectory(tokenizer, task.conversation(c)) for c in task.demos(i, cfg.sft_batch, lo, hi)]
                loss = sft_step(model, optimizer, pack(demos, device), cfg.grad_clip, dp)
                write({"sft_step": i, "sft_loss": loss})
                bar.set_postfix(loss=f"{loss:.3f}")
        sync_weights()
        # RL gets an optimizer of its own: Adam's second moments from the warm-up (its large early
        # gradients, remembered over ~1/(1-beta2) = 1000 steps) would otherwise set the size of
        # the first RL updates.
        optimizer = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      **dp.optimizer_options())
        rate = evaluate(0)
        log(f"after warm-up: held-out success rate {rate:.3f}")
        if ref_model is not None:
            tensors, _ = dp.state_dicts(model, None)  # collective under FSDP; full on rank 0
            if dp.main:  # before the first checkpoint that needs it
                checkpoint.save_weights(ref_path, tensors)
            dp.load_state_dicts(ref_model, None, tensors, None)
        save(0)
    elif ref_model is not None:
        dp.load_state_dicts(ref_model, None, checkpoint.read_weights(ref_path), None)

    eval_rate = float("nan")
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="RL", initial=start_step, total=cfg.steps,
               disable=not dp.main)
    for step in bar:
        version = step - 1  # RL steps since the warm-up: what the engine holds now
        lr = scheduled_lr(cfg.lr, step, cfg.steps, cfg, cfg.warmup_steps)
        set_lr(optimizer, lr)
        t0 = time.perf_counter()
        busy.start()
        before = dict(engine.stats)
        if task.agent is not None:  # external agents against the engine (ossrl.train.agents): never paused
            rows = [task.train_row((next_group + k) * dp.world + dp.rank) for k in range(quota)]
            next_group += quota
            trajs, owners, rewards, scores, agent_stats = agent_rollout(task, engine, tokenizer, rows, cfg, version, step)
            finished, carry, failures, dropped = [], [], [], 0
        else:
            trajs, owners, rewards, scores, agent_stats, finished, dropped, failures, carry, next_group = _env_rollout(
                task, engine, tokenizer, cfg, carry, quota, extra, next_group, version, step, dp, optimizer, log)
        t1 = time.perf_counter()
        engine_steps, sampled, fed, preempted = (engine.stats[k] - before[k] for k in
                                                 ("steps", "generated_tokens", "forward_tokens", "preemptions"))
        logged: dict[str, list] = {}
        for sc in scores:
            for k, v in sc.logged.items():
                logged.setdefault(k, []).extend(x for x in v if isinstance(x, (int, float)))
        names = task.reward_names()
        per_func = [x for name in names for x in _sum_count(v for sc in scores for v in sc.by_func.get(name, []))]
        per_func = dp.sum(per_func + [sum(sc.reward_errors for sc in scores), sum(sc.env_errors for sc in scores)],
                          device)
        reward_errors, env_errors = int(per_func[-2]), int(per_func[-1])
        # advantages per episode, shared by the training sequences an episode made
        ep_adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), cfg.group_size,
                                  scale=cfg.adv_scale).tolist() if rewards else []
        adv = [ep_adv[o] for o in owners]
        signal = signal_groups(rewards, cfg.group_size)
        (signal_all,) = dp.sum([len(signal)], device)
        if cfg.filter_groups:
            chosen = set(signal)
            keep = [i for i, o in enumerate(owners) if o // cfg.group_size in chosen]
            train_trajs, train_adv = [trajs[i] for i in keep], [adv[i] for i in keep]
        else:
            train_trajs, train_adv = trajs, adv
        model.train()
        if signal_all or not cfg.filter_groups:
            stats = train_step(model, optimizer, train_trajs, train_adv, cfg, device, dp, ref_model)
        else:  # nothing to learn from anywhere: no step (Adam's momentum would still move the weights)
            stats = dict.fromkeys(("loss", "grad_norm", "tis_weight_mean", "tis_truncated_frac", "clip_frac", "kl",
                                   "mismatch_kl", "logprob_gap_max", "routing_agreement"))
            stats["nonfinite_grad"] = False
        t2 = time.perf_counter()
        # Weight sync into the engine's layout, in place (nothing to move when it shares storage).
        synced = sync_weights()
        t3 = time.perf_counter()
        stale = [version - v for t in trajs for v, m in zip(t.versions[1:], t.loss_mask[1:]) if m and v != CONTEXT]
        totals = dp.sum([len(rewards), sum(rewards), sum(sum(t.loss_mask) for t in trajs),
                         sum(len(t.tokens) for t in trajs), sum(t.turns for t in trajs),
                         sum(t.tool_calls for t in trajs), sum(t.tool_errors for t in trajs),
                         sum(t.final_answer is not None for t in trajs), len(failures), sum(stale), len(stale),
                         sum(not t.done for g in carry for t in g.trajs), len(carry), dropped], device)
        (n, reward_sum, gen_tokens, all_tokens, turns, calls, errors, answered, restarts, stale_sum, stale_n,
         paused, carried, dropped_all) = totals
        n = max(n, 1)
        record = {
            "step": step,
            "reward_mean": reward_sum / n,
            # each reward function's mean over the episodes it scored (None: not scored)
            **{f"reward_mean/{name}": (per_func[2 * k] / per_func[2 * k + 1] if per_func[2 * k + 1] else None)
               for k, name in enumerate(names)},
            "reward_errors": reward_errors,  # episodes a reward function failed on (they got 0)
            "env_errors": env_errors,  # environment resets, get_reward calls and tools that failed
            # what reward functions passed to log_metric (this process's episodes)
            **{f"reward/{k}": sum(v) / len(v) for k, v in logged.items() if v},
            **stats,
            "lr": lr,
            "signal_groups": int(signal_all),  # groups with unequal rewards (what the step learns from)
            "trained_episodes": int(dp.sum([len(train_trajs)], device)[0]),
            "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": t3 - t2,
            "gpu_busy_frac": busy.stop(),
            "sync_bytes": synced.bytes_moved if synced else 0,
            "episodes": int(n),
            "generated_tokens": int(gen_tokens),
            "rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
            # this process's engine: how full its batches were (tokens sampled per forward pass),
            # and what the forward passes carried (prompts, tool results and resumed prefixes included)
            "engine_steps": int(engine_steps),
            "engine_batch_mean": sampled / max(engine_steps, 1),
            "engine_forward_tokens": int(fed),
            "engine_preemptions": int(preempted),  # caches dropped for room, recomputed later
            "train_tokens_per_s": all_tokens / max(t2 - t1, 1e-9),
            "mean_turns": turns / n,
            "tool_calls": int(calls),
            "tool_errors": int(errors),
            **tool_step_metrics(),  # this process's tool latency, queue wait, calls/s, warm sandboxes
            "answered_frac": answered / n,
            "max_trajectory_tokens": int(dp.max(max((len(t.tokens) for t in trajs), default=0), device)),
            "staleness_mean": stale_sum / max(stale_n, 1),  # policy versions between sampling and training
            "staleness_max": int(dp.max(max(stale, default=0), device)),
            "paused_episodes": int(paused),  # cut off this step, resumed in the next
            "carried_groups": int(carried),
            "dropped_groups": int(dropped_all),  # carried too long (max_staleness)
            "engine_restarts": int(restarts),
            "processes": dp.world,
        }
        if task.agent is not None:  # this process's agents: requests, cache reuse, failures
            record.update(agent_stats)
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


def run(config: TrainConfig | str | Path | dict | None = None, *, run_dir: str | Path = "runs/default",
        resume: bool = False, environment_factory=None, reward_funcs=None, tools=None, agent=None, log=print,
        **overrides) -> Path:
    """``ossrl train`` from Python, with your own objects instead of import paths::

        ossrl.train.run({"dataset": "rows.jsonl", "steps": 20}, environment_factory=Wordle,
                        reward_funcs=[exact], tools=[search], run_dir="runs/wordle")

    config: a TrainConfig, a TOML file, a dict of config keys, or None (the defaults); keyword
    ``overrides`` are config keys too. The objects given here take the place of the config's
    ``environment_factory``, ``reward_funcs``, ``tools`` and ``agent``. Returns the run folder."""
    from .config import _apply, load_config, validate

    if isinstance(config, TrainConfig):
        cfg = copy.deepcopy(config)
    elif config is None or isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = TrainConfig()
        _apply(cfg, config)
    else:
        raise TypeError(f"run: config must be a TrainConfig, a TOML path, a dict or None, got {type(config).__name__}")
    _apply(cfg, overrides)
    validate(cfg)
    task = build_task(cfg, environment_factory=environment_factory, reward_funcs=reward_funcs, tools=tools, agent=agent)
    return train(cfg, run_dir, resume=resume, log=log, task=task)
