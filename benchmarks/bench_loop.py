"""One RL step, phase by phase: ossrl's colocated loop against the common way, same model and task.

ours:   rollout with the paged-cache engine (multi-turn, prefix reused across turns) -> packed
        training step on ossrl's kernels -> weight sync (the engine shares the trainer's storage)
common: rollout with transformers' ``generate`` (padded batches, every turn re-encodes the whole
        conversation) -> padded training step on transformers' GptOssForCausalLM -> a full reload
        of the trainer's weights into a separate rollout copy (``load_state_dict``)

Both start from the same weights and run the same task with the same batch; the loss is the same
GRPO-family objective. Prints seconds per phase, tokens per second and ratios.

    python benchmarks/bench_loop.py                  # tiny model on the CPU, after a short warm-up
    python benchmarks/bench_loop.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import torch

import ossrl
from ossrl.model import save_pretrained
from ossrl.model.harmony import encode_conversation, parse_completion, tool_result
from ossrl.rollout.engine import Engine
from ossrl.rollout.tools import ToolCall
from ossrl.train.config import load_config
from ossrl.train.episodes import demo_trajectory, run_episodes
from ossrl.train.loop import build, pack, sft_step, train_step
from ossrl.train.loss import group_advantages, policy_loss
from ossrl.train.parallel import DataParallel
from ossrl.train.task import build_task
from ossrl.train.tasks import exact_answer
from _peers import transformers_available  # noqa: E402  (benchmarks/, beside this script)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_episodes(hf, tok, tools, task, problems, cfg, device):
    """Multi-turn episodes the common way: generate() per turn on the re-encoded conversation."""
    stops = list(tok.stop_token_ids)
    hist = [encode_conversation(tok, task.messages(p), add_generation_prompt=True) for p in problems]
    masks = [[0] * len(h) for h in hist]
    answers = [None] * len(problems)
    active = list(range(len(problems)))
    for turn in range(cfg.max_turns):
        width = max(len(hist[i]) for i in active)
        ids = torch.zeros(len(active), width, dtype=torch.long, device=device)
        att = torch.zeros_like(ids)
        for r, i in enumerate(active):
            ids[r, width - len(hist[i]):] = torch.tensor(hist[i])
            att[r, width - len(hist[i]):] = 1
        out = hf.generate(ids, attention_mask=att, do_sample=True, temperature=cfg.temperature, top_k=0,
                          max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=0)
        calls, nxt = [], []
        for r, i in enumerate(active):
            new = out[r, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))
            new = new[:cut]
            hist[i] += new
            masks[i] += [1] * len(new)
            try:
                msgs = parse_completion(new, tok)
            except ValueError:
                msgs = []
            last = msgs[-1] if msgs else None
            if last is not None and last.is_tool_call and last.end == "<|call|>" and turn < cfg.max_turns - 1:
                calls.append(ToolCall(last.tool_name, last.content, timeout=cfg.tool_timeout))
                nxt.append(i)
            else:
                final = [m for m in msgs if m.channel == "final" and m.end]
                answers[i] = final[-1].content if final else None
        if not calls:
            break
        for i, call, res in zip(nxt, calls, asyncio.run(tools.run_calls(calls))):
            ctx = encode_conversation(tok, [tool_result(call.name, res.content)], add_generation_prompt=True)
            hist[i] += ctx
            masks[i] += [0] * len(ctx)
        active = nxt
    completions = [[{"role": "assistant", "content": a}] if a is not None else [] for a in answers]
    return hist, masks, exact_answer(completions, [p["answer"] for p in problems])


def hf_train_step(hf, opt, hist, masks, adv, cfg, device):
    """The padded training step: one right-padded batch through transformers' model."""
    width = max(len(h) for h in hist)
    ids = torch.zeros(len(hist), width, dtype=torch.long, device=device)
    att = torch.zeros_like(ids)
    m = torch.zeros(len(hist), width, device=device)
    for i, (h, k) in enumerate(zip(hist, masks)):
        ids[i, :len(h)] = torch.tensor(h)
        att[i, :len(h)] = 1
        m[i, :len(h) - 1] = torch.tensor(k[1:], dtype=torch.float32)
    logits = hf(ids, attention_mask=att).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    a = torch.tensor(adv, dtype=torch.float32, device=device)[:, None].expand_as(logp)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), a, m[:, :-1], cfg.loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
    opt.step()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ossrl train config keys")
    p.add_argument("--warmup-steps", type=int, default=200, help="supervised steps first, so episodes use tools")
    p.add_argument("--json")
    a = p.parse_args()
    cfg = load_config(None, a.overrides)
    with_hf = transformers_available('transformers', 'GptOssForCausalLM', "the common way's column")
    model, tok = build(cfg)
    device = next(model.parameters()).device
    task = build_task(cfg)
    tools = task.registry()
    dp = DataParallel()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    for i in range(1, a.warmup_steps + 1):
        demos = [demo_trajectory(tok, task.conversation(c)) for c in task.demos(i, cfg.sft_batch, 0, cfg.sft_batch)]
        sft_step(model, opt, pack(demos, device), cfg.grad_clip, dp)
    for g in opt.param_groups:
        g["lr"] = cfg.lr

    if with_hf:
        from transformers import GptOssForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d)
            hf = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)
            hf_rollout = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
        if device.type == "cpu":
            hf.set_experts_implementation("eager")
            hf_rollout.set_experts_implementation("eager")
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr)

    problems = [task.train_row(100_000 + i) for i in range(cfg.prompts_per_step)]
    group = [q for q in problems for _ in range(cfg.group_size)]
    engine = Engine(model, max_cache_tokens=cfg.kv_cache_tokens)
    torch.manual_seed(0)

    # the whole batch to the end (no over-provisioning): the same episodes as the common way runs
    r_s, (trajs, scores) = timed(lambda: run_episodes(engine, tok, task, group, cfg, greedy=False,
                                                      seeds=list(range(len(group)))), device)
    rewards = scores.totals
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), cfg.group_size).tolist()
    model.train()
    t_s, _ = timed(lambda: train_step(model, opt, trajs, adv, cfg, device, dp), device)
    ours = dict(rollout_s=r_s, train_s=t_s, sync_s=0.0, tokens=sum(len(t.tokens) for t in trajs),
                generated=sum(sum(t.loss_mask) for t in trajs), reward=sum(rewards) / len(rewards))

    common = None
    if with_hf:
        with torch.no_grad():
            r2, (hist, masks, rew2) = timed(lambda: hf_episodes(hf_rollout, tok, tools, task, group, cfg, device),
                                            device)
        adv2 = group_advantages(torch.tensor(rew2, dtype=torch.float64), cfg.group_size).tolist()
        hf.train()
        t2, _ = timed(lambda: hf_train_step(hf, hf_opt, hist, masks, adv2, cfg, device), device)
        s2, _ = timed(lambda: hf_rollout.load_state_dict(hf.state_dict()), device)
        common = dict(rollout_s=r2, train_s=t2, sync_s=s2, tokens=sum(len(h) for h in hist),
                      generated=sum(sum(k) for k in masks), reward=sum(rew2) / len(rew2))

    header = (f"ossrl {ossrl.__version__} | torch {torch.__version__} | {device} | model {cfg.model} | "
              f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples, up to {cfg.max_turns} turns")
    print(header)
    phases = ("rollout_s", "train_s", "sync_s")
    tot_o = sum(ours[k] for k in phases)
    if common is None:
        print(f"{'phase':<12} {'ours s':>9}")
        for k in phases:
            print(f"{k[:-2]:<12} {ours[k]:>9.3f}")
        print(f"{'step':<12} {tot_o:>9.3f}")
        print(f"generated tokens/s in rollout: ours {ours['generated'] / ours['rollout_s']:.0f}; "
              f"step tokens/s: ours {ours['tokens'] / tot_o:.0f}; mean reward: ours {ours['reward']:.3f}")
    else:
        print(f"{'phase':<12} {'ours s':>9} {'common s':>9} {'common/ours':>12}")
        for k in phases:
            ratio = common[k] / ours[k] if ours[k] > 0 else float("inf")
            print(f"{k[:-2]:<12} {ours[k]:>9.3f} {common[k]:>9.3f} {ratio:>12.2f}")
        tot_c = sum(common[k] for k in phases)
        print(f"{'step':<12} {tot_o:>9.3f} {tot_c:>9.3f} {tot_c / tot_o:>12.2f}")
        print(f"generated tokens/s in rollout: ours {ours['generated'] / ours['rollout_s']:.0f}, "
              f"common {common['generated'] / common['rollout_s']:.0f}; step tokens/s: ours {ours['tokens'] / tot_o:.0f}, "
              f"common {common['tokens'] / tot_c:.0f}; mean reward: ours {ours['reward']:.3f}, common {common['reward']:.3f}")
        print("sync: ours shares the trainer's storage with the engine (nothing moves); common reloads every tensor.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(header=header, ours=ours, common=common), f, indent=1)


if __name__ == "__main__":
    main()
