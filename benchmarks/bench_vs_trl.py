"""ossrl train against TRL's GRPOTrainer: the same environment, data, reward and weights, on this CPU.

    python benchmarks/bench_vs_trl.py [--steps 6] [--json results.json]

Both start from the same tiny GPT-OSS weights (ossrl's tiny config after a short supervised
warm-up, so that the model writes harmony tool calls; saved as a Hugging Face folder with a
tokenizer that has ossrl's byte ids, a harmony chat template and a response template, see
``_hf_harmony_tokenizer.py``), then train for the same number of steps with the same
environment class (``NumberEnv``, TRL's ``environment_factory`` convention: ``reset(**row)``, a
``lookup`` tool), the same reward function, group size, rollouts per step, learning rate
(constant), temperature 1 and no KL term. Each system runs in its own process (peak RSS is that
process's). One evaluator scores both final models: ossrl's engine, greedy, on the same
held-out rows (success: the reward reaches 1.0, i.e. the right sum).

What differs, and cannot be made equal: TRL bounds a whole episode by ``max_completion_length``
(tool results included), ossrl bounds each model turn (``max_new_tokens``, given the same
number) and the number of turns (so an ossrl episode may generate more; both report what they
generated); TRL generates with transformers' padded ``generate`` and re-prefills the conversation at
every tool turn (no vLLM on a CPU), ossrl with its engine (continuous batching, KV kept across
the tool call); the loss aggregation (TRL's default ``loss_type``) and clipping follow each
library's defaults. ``trl`` is a benchmark dependency only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


class NumberEnv:
    """a + b, where b must be looked up: one instance per episode (TRL's convention)."""

    def reset(self, **kwargs) -> str:
        self.a, self.b = int(kwargs["a"]), int(kwargs["b"])
        return f" a is {self.a}."  # appended to the last prompt message (TRL and ossrl alike)

    def lookup(self, key: str) -> str:
        """Look up a stored number.

        Args:
            key: Which number to read: "a" or "b".
        """
        if key not in ("a", "b"):
            raise ValueError(f"no number named {key!r}")
        return str(getattr(self, key))


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": "What is a + b? Look up b."}],
             "a": rng.randint(1, 9), "b": rng.randint(1, 9)} for _ in range(n)]


def correct_sum(completions, a, b, **kwargs) -> list[float]:
    """1 for the right final answer, less for a near miss (so groups differ), +0.1 for using a tool."""
    out = []
    for msgs, x, y in zip(completions, a, b):
        final = next((m.get("content") or "" for m in reversed(msgs) if m["role"] == "assistant"), "").strip()
        used_tool = any(m["role"] == "tool" for m in msgs)
        score = 0.0
        if final.lstrip("-").isdigit():
            score = 1.0 if int(final) == x + y else 0.5 * max(0.0, 1 - abs(int(final) - x - y) / 10)
        out.append(score + 0.1 * used_tool)
    return out


def demo(row: dict) -> list[dict]:
    env = NumberEnv()
    prompt = [dict(m) for m in row["prompt"]]
    prompt[-1]["content"] += env.reset(**row)
    call = {"id": "c0", "type": "function", "function": {"name": "lookup", "arguments": '{"key": "b"}'}}
    return prompt + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c0", "content": env.lookup("b")},
                     {"role": "assistant", "content": str(env.a + env.b)}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the workers (each in its own process) ----


def prepare(a) -> None:
    """The shared starting point: warmed-up weights and the tokenizer, as a Hugging Face folder."""
    from _hf_harmony_tokenizer import build_tokenizer
    from ossrl.model import save_pretrained
    from ossrl.model.chat import from_openai
    from ossrl.rollout.function_tools import function_schema
    from ossrl.train.config import load_config
    from ossrl.train.episodes import demo_trajectory
    from ossrl.train.loop import build, pack, sft_step
    from ossrl.train.parallel import DataParallel

    model, tok = build(load_config(None, [f"seed={a.seed}", "device=cpu"]))
    specs = [function_schema(NumberEnv().lookup)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = make_rows(a.warmup_steps * 16, a.seed + 1)
    for i in range(a.warmup_steps):
        trajs = [demo_trajectory(tok, from_openai(demo(r), specs)) for r in rows[i * 16:(i + 1) * 16]]
        sft_step(model, opt, pack(trajs, torch.device("cpu")), 1.0, DataParallel())
    save_pretrained(model, a.model_dir)
    build_tokenizer().save_pretrained(a.model_dir)
    for name, part in (("train.jsonl", make_rows(a.steps * a.batch, a.seed)), ("eval.jsonl", make_rows(a.eval, 999))):
        with open(os.path.join(a.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)


def run_trl(a) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, GptOssForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    hf = GptOssForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    hf.set_experts_implementation("eager")
    rows = [json.loads(line) for line in open(os.path.join(a.out, "train.jsonl"))]
    cfg = GRPOConfig(output_dir=os.path.join(a.out, "trl"), max_steps=a.steps, per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=1, num_generations=a.group, max_completion_length=a.max_tokens,
                     max_tool_calling_iterations=a.turns - 1, learning_rate=a.lr, lr_scheduler_type="constant",
                     warmup_steps=0, beta=0.0, router_aux_loss_coef=0.0, temperature=1.0, use_vllm=False, bf16=False,
                     fp16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                     dataloader_num_workers=0, seed=a.seed, log_completions=False)

    class Timer(TrainerCallback):
        times, logs = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(logs)
    timer = Timer()
    trainer = GRPOTrainer(model=hf, processing_class=tok, reward_funcs=[correct_sum], args=cfg,
                          train_dataset=Dataset.from_list(rows), environment_factory=NumberEnv, callbacks=[timer])
    trainer.train()
    out_dir = os.path.join(a.out, "trl_final")
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    gen = [lg.get("completions/mean_length", 0.0) * a.batch for lg in timer.logs]
    return {"system": f"trl {trl.__version__}", "step_s": timer.times, "generated_tokens": gen,
            "reward": [lg["reward"] for lg in timer.logs], "peak_rss_mb": peak_rss_mb(), "final": out_dir}


def run_ossrl(a) -> dict:
    import ossrl
    from ossrl.train import run

    run_dir = os.path.join(a.out, "ossrl")
    cfg = {"model": a.model_dir, "device": "cpu", "seed": a.seed, "dataset": os.path.join(a.out, "train.jsonl"),
           "eval_dataset": os.path.join(a.out, "eval.jsonl"), "steps": a.steps, "prompts_per_step": a.batch // a.group,
           "group_size": a.group, "extra_groups": 0, "lr": a.lr, "lr_schedule": "constant", "warmup_steps": 0,
           "temperature": 1.0, "max_new_tokens": a.max_tokens, "max_turns": a.turns,
           "filter_groups": False, "eval_every": 10 ** 6, "eval_prompts": a.eval, "checkpoint_every": a.steps,
           "loss": {"kl_coef": 0.0}}
    run(cfg, run_dir=run_dir, environment_factory=NumberEnv, reward_funcs=[correct_sum], log=lambda *x: None)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in recs if "reward_mean" in r]
    return {"system": f"ossrl {ossrl.__version__}", "step_s": [r["rollout_s"] + r["train_s"] + r["sync_s"] for r in steps],
            "generated_tokens": [r["generated_tokens"] for r in steps], "reward": [r["reward_mean"] for r in steps],
            "peak_rss_mb": peak_rss_mb(), "final": run_dir}


def evaluate(a, folder: str) -> float:
    """Held-out greedy success of a final model, with one evaluator for both (ossrl's engine)."""
    from ossrl.rollout.engine import Engine
    from ossrl.serve import load_for_serving
    from ossrl.train.config import load_config
    from ossrl.train.episodes import run_episodes
    from ossrl.train.task import build_task

    model, tok, _, _ = load_for_serving(folder, device="cpu")
    cfg = load_config(None, [f"dataset={os.path.join(a.out, 'train.jsonl')}",
                             f"eval_dataset={os.path.join(a.out, 'eval.jsonl')}", f"max_turns={a.turns}",
                             f"max_new_tokens={a.max_tokens}", "device=cpu"])
    task = build_task(cfg, environment_factory=NumberEnv, reward_funcs=[correct_sum])
    rows = task.eval_rows(a.eval)
    _, sc = run_episodes(Engine(model.eval(), max_cache_tokens=1 << 16), tok, task, rows, cfg, greedy=True,
                         seeds=list(range(len(rows))))
    return sum(r >= 1.0 for r in sc.totals) / len(rows)


def worker(a) -> None:
    torch.set_num_threads(a.threads)
    res = {"prepare": lambda: prepare(a), "trl": lambda: run_trl(a), "ossrl": lambda: run_ossrl(a),
           "eval": lambda: {"success": evaluate(a, a.folder)}}[a.worker]()
    print("RESULT " + json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="rollouts per step (both)")
    p.add_argument("--group", type=int, default=4, help="rollouts per prompt (TRL num_generations)")
    p.add_argument("--max-tokens", type=int, default=160, help="TRL: max_completion_length (the episode); ossrl: max_new_tokens (each turn)")
    p.add_argument("--turns", type=int, default=4, help="model turns per episode (TRL: tool iterations + 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval", type=int, default=64, help="held-out rows")
    p.add_argument("--warmup-steps", type=int, default=80)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/bench_vs_trl")
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.model_dir = os.path.join(a.out, "start")
    if a.worker:
        return worker(a)
    os.makedirs(a.out, exist_ok=True)

    def call(*extra) -> dict:
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *extra]
        proc = subprocess.run(argv, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"error": (proc.stderr or proc.stdout)[-3000:]}
        return json.loads(lines[-1][len("RESULT "):]) or {}

    call("--worker", "prepare")
    start = call("--worker", "eval", "--folder", a.model_dir)
    results = {}
    for name in ("ossrl", "trl"):
        r = call("--worker", name)
        if "error" not in r:
            r["held_out_success"] = call("--worker", "eval", "--folder", r["final"]).get("success")
        results[name] = r
    import torch as _t

    print(f"torch {_t.__version__} | {a.threads} thread(s) | {a.steps} steps x {a.batch} rollouts ({a.group} per prompt),"
          f" up to {a.turns} turns / {a.max_tokens} tokens | held-out success before training: {start.get('success')}")
    print(f"{'system':<14} {'s/step':>8} {'gen tok/s':>10} {'reward (last)':>14} {'held-out':>9} {'peak RSS MB':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14} could not run: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        st = r["step_s"][1:] or r["step_s"]  # the first step pays one-time costs in both
        tps = sum(r["generated_tokens"][-len(st):]) / max(sum(st), 1e-9)
        r.update(mean_step_s=sum(st) / len(st), generated_tokens_per_s=tps)
        print(f"{r['system']:<14} {r['mean_step_s']:>8.2f} {tps:>10.0f} {r['reward'][-1]:>14.3f} "
              f"{r['held_out_success']:>9.3f} {r['peak_rss_mb']:>12.0f}")
    if "error" not in results.get("ossrl", {"error": 1}) and "error" not in results.get("trl", {"error": 1}):
        o, t = results["ossrl"], results["trl"]
        print(f"ossrl vs TRL: {t['mean_step_s'] / o['mean_step_s']:.2f}x faster per step, "
              f"{o['generated_tokens_per_s'] / max(t['generated_tokens_per_s'], 1e-9):.2f}x generated tokens/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "folder")},
                       "start_success": start.get("success"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
