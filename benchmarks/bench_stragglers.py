"""What pausing stragglers buys: the RL loop with and without over-provisioned groups.

Agentic trajectories have a long tail of lengths. A step that waits for every group decodes its
last tokens with a nearly empty batch; a step that starts ``extra_groups`` more groups than it
trains on stops at its quota of complete groups, pauses the rest (their sampled tokens kept) and
resumes them next step, so the batch stays full. Both runs here are the same ``ossrl train``
(same model, task, seeds, steps); only ``extra_groups`` differs. Per setting it prints:

- trained generated tokens per rollout second (summed over the steps; the median of --repeats
  interleaved runs) and the ratio to waiting for everything;
- the engine's mean batch (tokens sampled per forward pass): how full decoding kept the batch;
- forward tokens per generated token: the price of pausing (a resumed episode re-feeds its prefix);
- staleness of the trained tokens (policy versions between sampling and training).

Default: the tiny model with no warm-up, sampled at temperature 1, so each episode runs until a
stop token comes up: lengths are geometric-like, most under a few hundred tokens, the longest
near the 1024-token cap, like a long-tailed agentic batch in miniature. Anything after the flags overrides the config (`key=value`), e.g.
``model=/path/to/gpt-oss-20b device=cuda max_new_tokens=16384`` on a GPU.

    python benchmarks/bench_stragglers.py
    python benchmarks/bench_stragglers.py --extra 0,8,16 prompts_per_step=32
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ossrl.train.config import load_config
from ossrl.train.loop import train
from ossrl.train.metrics import read

DEFAULTS = ["sft_steps=0", "steps=10", "prompts_per_step=8", "group_size=4", "max_turns=1",
            "max_new_tokens=1024", "temperature=1.0", "eval_prompts=1", "eval_every=1000000",
            "checkpoint_every=1000000"]


def run(overrides: list[str], extra: int) -> list[dict]:
    cfg = load_config(None, [*DEFAULTS, *overrides, f"extra_groups={extra}"])
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d, log=lambda *a, **k: None)
        return [r for r in read(f"{d}/metrics.jsonl") if "reward_mean" in r]


def summarize(extra: int, steps: list[dict]) -> dict:
    rollout_s = sum(r["rollout_s"] for r in steps)
    generated = sum(r["generated_tokens"] for r in steps)
    engine_steps = sum(r["engine_steps"] for r in steps)
    sampled = sum(r["engine_batch_mean"] * r["engine_steps"] for r in steps)
    return dict(extra_groups=extra, steps=len(steps), rollout_s=rollout_s, trained_generated_tokens=generated,
                tokens_per_rollout_s=generated / rollout_s, engine_batch_mean=sampled / engine_steps,
                forward_per_generated=sum(r["engine_forward_tokens"] for r in steps) / generated,
                staleness_mean=sum(r["staleness_mean"] * r["generated_tokens"] for r in steps) / generated,
                staleness_max=max(r["staleness_max"] for r in steps),
                paused_per_step=sum(r["paused_episodes"] for r in steps) / len(steps),
                longest_trajectory=max(r["max_trajectory_tokens"] for r in steps),
                episodes=sum(r["episodes"] for r in steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra", default="0,4,8", help="extra_groups settings; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved; the median is shown")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="config key=value")
    args = ap.parse_args()
    extras = [int(x) for x in args.extra.split(",")]
    run(args.overrides + ["steps=2"], extras[-1])  # warm-up: the first run in a process pays one-time costs
    runs: dict[int, list[dict]] = {e: [] for e in extras}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every setting
        for e in extras:
            runs[e].append(summarize(e, run(args.overrides, e)))
    rows = []
    for e in extras:
        # the samples are the same every repeat (seeded); only the times differ
        speeds = sorted(r["tokens_per_rollout_s"] for r in runs[e])
        rows.append({**runs[e][0], "tokens_per_rollout_s": speeds[len(speeds) // 2], "tokens_per_rollout_s_all": speeds})
    base = rows[0]["tokens_per_rollout_s"]
    print(f"{'extra_groups':>12} {'tok/rollout-s':>14} {'vs first':>9} {'batch mean':>11} {'fwd/gen':>8} "
          f"{'stale mean':>11} {'stale max':>10} {'paused/step':>12} {'longest':>8}")
    for r in rows:
        print(f"{r['extra_groups']:>12} {r['tokens_per_rollout_s']:>14.0f} {r['tokens_per_rollout_s'] / base:>8.2f}x "
              f"{r['engine_batch_mean']:>11.1f} {r['forward_per_generated']:>8.2f} {r['staleness_mean']:>11.2f} "
              f"{r['staleness_max']:>10} {r['paused_per_step']:>12.1f} {r['longest_trajectory']:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(defaults=DEFAULTS, overrides=args.overrides, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
