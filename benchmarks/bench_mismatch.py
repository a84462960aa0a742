"""Rollout/training mismatch with and without MoE routing replay.

    python benchmarks/bench_mismatch.py [--steps 10] [--json results.json]

The default task with the tiny model, a bf16 rollout copy and the fp32 trainer (where routing
flips happen: the two pick different experts when router logits nearly tie), and a bf16 trainer
with its bf16 rollout copy, each with ``routing_replay`` off and on, and the fp32 engine sharing the trainer's modules as the
no-mismatch baseline. For each: the mean over the RL steps of ``mismatch_kl``, the largest
per-token log-prob gap, ``routing_agreement`` and the truncated-IS fraction, and the loss curve.
Then the cost of recording the routing: the bytes per token (layers x top_k, one byte each; for
the GPT-OSS-20b and -120b configs too) and the engine's generation time with recording on and off.

The effect on learning needs whole runs over several seeds; bench_learning makes them and this
script compares their metrics:

    python benchmarks/bench_learning.py --seeds 0,1,2 --out runs/r3_off rollout_dtype=bfloat16
    python benchmarks/bench_learning.py --seeds 0,1,2 --out runs/r3_on rollout_dtype=bfloat16 routing_replay=true
    python benchmarks/bench_mismatch.py --compare-runs runs/r3_off runs/r3_on
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def model_folder(name: str, out: str) -> str:
    """The built-in "small" model (bench_memory's preset, random weights) as a Hugging Face folder
    with a tokenizer of the tiny model's byte ids, so that ``ossrl train model=FOLDER`` runs it."""
    from _hf_harmony_tokenizer import build_tokenizer
    from bench_memory import PRESETS
    from ossrl.model import GptOss, GptOssConfig, save_pretrained

    torch.manual_seed(0)
    save_pretrained(GptOss(GptOssConfig.tiny(**PRESETS[name])), out)
    build_tokenizer().save_pretrained(out)
    return out


def run_config(name: str, overrides: dict, a) -> dict:
    from ossrl.train import run

    with tempfile.TemporaryDirectory() as d:
        cfg = {"model": a.model_dir, "seed": a.seed, "sft_steps": a.sft_steps, "sft_batch": a.sft_batch, "steps": a.steps, "prompts_per_step": 8, "group_size": 4,
               "eval_every": 10 ** 6, "eval_prompts": 8, "checkpoint_every": 10 ** 6, "filter_groups": False,
               "extra_groups": 0,  # no paused groups: every trained token was sampled by the current weights
               **overrides}
        run(cfg, run_dir=d, log=lambda *x: None)
        recs = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    steps = [r for r in recs if "reward_mean" in r]

    def mean(k):
        v = [r[k] for r in steps if r.get(k) is not None]
        return statistics.mean(v) if v else None
    return {"name": name, "overrides": overrides, "mismatch_kl": mean("mismatch_kl"),
            "logprob_gap_max": max((r["logprob_gap_max"] for r in steps if r.get("logprob_gap_max") is not None),
                                   default=None),
            "routing_agreement": mean("routing_agreement"), "tis_truncated_frac": mean("tis_truncated_frac"),
            "loss": [r["loss"] for r in steps], "reward_mean": [r["reward_mean"] for r in steps]}


def recording_cost(a) -> dict:
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.rollout.engine import Engine, SamplingParams

    torch.manual_seed(0)
    model = GptOss(GptOssConfig.tiny()).eval()
    prompts = [list(range(10 + i, 60 + i)) for i in range(32)]
    params = SamplingParams(temperature=1.0, max_new_tokens=64)
    times = {}
    for rec in (False, True, False, True):  # interleaved, the second of each counts
        e = Engine(model, max_cache_tokens=1 << 16)
        e.record_routing = rec
        t0 = time.perf_counter()
        e.generate(prompts, params, seeds=list(range(len(prompts))))
        times[rec] = time.perf_counter() - t0
    tiny = GptOssConfig.tiny()
    # layers x top_k of the published configs (config.json: 24 / 36 layers, 4 experts per token)
    sizes = {"tiny": tiny.num_hidden_layers * tiny.num_experts_per_tok, "gpt-oss-20b": 24 * 4, "gpt-oss-120b": 36 * 4}
    return {"generate_s_off": times[False], "generate_s_on": times[True], "ratio": times[True] / times[False],
            "bytes_per_token": sizes}


def compare_runs(off: str, on: str) -> dict:
    """Per seed of two bench_learning output folders (replay off, on): the step means of the
    mismatch metrics, the mean reward of the first and last 10 steps and the held-out success."""
    import glob

    out = {}
    for name, folder in (("off", off), ("on", on)):
        for path in sorted(glob.glob(os.path.join(folder, "seed_*", "metrics.jsonl"))):
            recs = [json.loads(line) for line in open(path)]
            steps = [r for r in recs if "reward_mean" in r]
            evals = [r["eval_success_rate"] for r in recs if "eval_success_rate" in r]

            def mean(k, rs=steps):
                v = [r[k] for r in rs if r.get(k) is not None]
                return statistics.mean(v) if v else None
            seed = int(path.split("seed_")[1].split(os.sep)[0])
            out.setdefault(name, []).append({
                "seed": seed, "steps": len(steps), "mismatch_kl": mean("mismatch_kl"),
                "logprob_gap_max": max((r["logprob_gap_max"] for r in steps if r.get("logprob_gap_max") is not None),
                                       default=None),
                "routing_agreement": mean("routing_agreement"), "tis_truncated_frac": mean("tis_truncated_frac"),
                "reward_first10": mean("reward_mean", steps[:10]), "reward_last10": mean("reward_mean", steps[-10:]),
                "loss_mean": mean("loss"), "eval_start": evals[0] if evals else None,
                "eval_end": evals[-1] if evals else None})
    print(f"{'replay':<7} {'seed':>4} {'mismatch_kl':>12} {'max |gap|':>10} {'agreement':>10} {'TIS trunc':>10} "
          f"{'reward 1-10':>12} {'reward last 10':>15} {'mean loss':>10} {'eval start':>11} {'eval end':>9}")
    for name in ("off", "on"):
        for r in out.get(name, []):
            print(f"{name:<7} {r['seed']:>4} {r['mismatch_kl']:>12.2e} {r['logprob_gap_max']:>10.3f} "
                  f"{r['routing_agreement']:>10.4f} {r['tis_truncated_frac']:>10.4f} {r['reward_first10']:>12.3f} "
                  f"{r['reward_last10']:>15.3f} {r['loss_mean']:>10.4f} {r['eval_start']:>11.3f} {r['eval_end']:>9.3f}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-runs", nargs=2, metavar=("OFF", "ON"),
                   help="compare two bench_learning output folders (routing replay off / on) and exit")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-batch", type=int, default=96)
    p.add_argument("--model", default="tiny", choices=["tiny", "small"], help="small: bench_memory's 56M preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()
    if a.compare_runs:
        got = compare_runs(*a.compare_runs)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(got, f, indent=1)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="bench-mismatch-")
    a.model_dir = "tiny" if a.model == "tiny" else model_folder(a.model, os.path.join(tmp, a.model))
    configs = [("fp32 engine = trainer (baseline)", {}),
               ("bf16 rollout, fp32 trainer", {"rollout_dtype": "bfloat16"}),
               ("bf16 rollout, fp32 trainer, replay", {"rollout_dtype": "bfloat16", "routing_replay": True}),
               # the same bf16 weights on both sides: what is left is the kernels and batch layouts
               ("bf16 rollout, bf16 trainer", {"dtype": "bfloat16", "rollout_dtype": "bfloat16"}),
               ("bf16 rollout, bf16 trainer, replay", {"dtype": "bfloat16", "rollout_dtype": "bfloat16",
                                                       "routing_replay": True})]
    rows = [run_config(n, o, a) for n, o in configs]
    cost = recording_cost(a)
    print(f"torch {torch.__version__} | {a.model} model | {a.sft_steps} warm-up steps, {a.steps} RL steps x 32 episodes, "
          f"seed {a.seed}")
    print(f"{'configuration':<38} {'mismatch_kl':>12} {'max |gap|':>10} {'agreement':>10} {'TIS trunc':>10} "
          f"{'final loss':>11}")
    for r in rows:
        agree = "-" if r["routing_agreement"] is None else f"{r['routing_agreement']:.4f}"
        print(f"{r['name']:<38} {r['mismatch_kl']:>12.2e} {r['logprob_gap_max']:>10.3f} {agree:>10} "
              f"{r['tis_truncated_frac']:>10.4f} {r['loss'][-1]:>11.4f}")
    print(f"recording the routing: {', '.join(f'{k} {v} B/token' for k, v in cost['bytes_per_token'].items())}; "
          f"generation {cost['generate_s_on']:.2f} s with vs {cost['generate_s_off']:.2f} s without "
          f"({cost['ratio']:.2f}x; 32 prompts x 64 tokens)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "recording": cost, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
