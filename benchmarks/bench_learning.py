"""Does the RL loop learn, seed after seed? One ``ossrl train`` config run over several seeds.

Each seed runs as its own ``python -m ossrl train`` (one after another: they would compete for
the cores), its output in OUT/seed_N.log. Per seed: held-out success (``eval_success_rate``, at the
rollout temperature; greedy too) after the warm-up (step 0) and at the last evaluation, the gain,
the wall time, and whether it passes (gain >= 0.3 and end >= 0.6). Then min / median / max
over seeds, the pass count and the runs over 5 minutes. Failing seeds are reported, not hidden;
the exit status is 1 only if a run crashed (the other seeds still run). The plots show the median
seed's curve (median end value; the lower middle for an even count) in the band of all seeds.

``key=value`` arguments override the config in every run; the script's ``seed=N`` comes last,
so it wins over any seed set in the config or the overrides.

    python benchmarks/bench_learning.py                      # the default config, seeds 0-9
    python benchmarks/bench_learning.py --seeds 0,3,5 --json out.json steps=30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ossrl.train.metrics import read

MIN_GAIN, MIN_END, MAX_WALL_S = 0.3, 0.6, 300.0
# per-seed numeric columns and their format
COLS = {"warmup": ".3f", "end": ".3f", "gain": ".3f", "greedy_warmup": ".3f", "greedy_end": ".3f", "wall_s": ".0f",
        "sft_loss": ".3f", "skipped_steps": "d"}


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())


def run_seed(seed: int, args, env) -> dict:
    run_dir = Path(args.out) / f"seed_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale metrics.jsonl must never mix in
    cmd = [sys.executable, "-m", "ossrl", "train", "--run-dir", str(run_dir),
           *(["--config", args.config] if args.config else []), *args.overrides, f"seed={seed}"]
    log = Path(args.out) / f"seed_{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    res = {"seed": seed, "wall_s": time.perf_counter() - t0, "log": str(log)}
    recs = read(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    evals = [r for r in recs if r.get("eval_success_rate") is not None]
    if rc != 0 or not evals:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return {**res, "error": f"exit {rc}: {lines[-1] if lines else 'no output'}" if rc
                else "no held-out evaluation in metrics.jsonl"}
    first = next((r for r in evals if r["step"] == 0), evals[0])
    rl = [r for r in recs if "reward_mean" in r]
    sft = [r["sft_loss"] for r in recs if r.get("sft_loss") is not None]
    return {**res, "warmup_step": first["step"], "warmup": first["eval_success_rate"],
            "end": evals[-1]["eval_success_rate"], "end_step": evals[-1]["step"],
            "gain": evals[-1]["eval_success_rate"] - first["eval_success_rate"],
            "greedy_warmup": first.get("eval_greedy_success_rate"), "greedy_end": evals[-1].get("eval_greedy_success_rate"),
            "sft_loss": sft[-1] if sft else None,
            # RL steps with no update (every group's rewards equal) or a non-finite norm; older logs lack grad_norm
            "skipped_steps": sum(r["grad_norm"] is None for r in rl) if any("grad_norm" in r for r in rl) else None,
            "curve": [(r["step"], r["eval_success_rate"], r.get("eval_greedy_success_rate")) for r in evals],
            "reward": [(r["step"], r["reward_mean"]) for r in rl]}


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def band_plot(path: Path, ok: list[dict], median: dict, series, ylabel: str, greedy=None, line=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    by_step: dict[int, list[float]] = {}
    for r in ok:
        for step, y in series(r):
            if y is not None:
                by_step.setdefault(step, []).append(y)
    xs = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.fill_between(xs, [min(by_step[x]) for x in xs], [max(by_step[x]) for x in xs], alpha=0.25,
                    label=f"min-max over {len(ok)} seeds")
    ax.plot(*zip(*series(median)), marker="o" if len(xs) < 30 else None, label=f"median seed ({median['seed']})")
    if greedy is not None:
        ax.plot(*zip(*greedy(median)), lw=1, ls="--", label="median seed, greedy")
    if line is not None:  # the success criterion's end value; success is a fraction
        ax.axhline(line, ls=":", color="k", lw=1, label=f"pass: end >= {line}")
        ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="RL step", ylabel=ylabel, title=f"{ylabel}: {len(ok)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="TOML file (default: the embedded default config)")
    ap.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5")
    ap.add_argument("--out", default="runs/bench_learning", help="OUT/seed_N/ (run dirs) and OUT/seed_N.log")
    ap.add_argument("--json")
    ap.add_argument("--plot", help="default OUT/success_rate.png; reward.png goes beside it")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads per run (default: torch's choice)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run at once (default 1: wall times then are one run's alone; with N > 1 the "
                         "runs share the cores, and their wall times say so)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = ap.parse_args()
    import torch

    import ossrl

    seeds, env, out = parse_seeds(args.seeds), dict(os.environ), Path(args.out)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out.mkdir(parents=True, exist_ok=True)
    header = {"ossrl": ossrl.__version__, "torch": torch.__version__, "cpu": cpu_model(),
              "threads": args.threads or torch.get_num_threads(), "jobs": args.jobs,
              "config": args.config or "(default)", "overrides": " ".join(args.overrides)}
    print(" | ".join(f"{k} {v}" for k, v in header.items()))
    from concurrent.futures import ThreadPoolExecutor, as_completed

    by_seed = {}
    with tqdm(total=len(seeds), desc="seeds") as bar, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_seed, seed, args, env): seed for seed in seeds}  # each a subprocess
        for fut in as_completed(futures):
            r = by_seed[futures[fut]] = fut.result()
            msg = r.get("error") or f"{r['warmup']:.3f} -> {r['end']:.3f}"
            bar.write(f"seed {r['seed']}: {msg} ({r['wall_s']:.0f} s, log {r['log']})")
            bar.update()
    results = [by_seed[s] for s in seeds]
    ok = [r for r in results if "error" not in r]
    for r in ok:
        r["pass"] = r["gain"] >= MIN_GAIN and r["end"] >= MIN_END
    late = sorted({r["warmup_step"] for r in ok} - {0})
    print(f"\nwarm-up: held-out success at step {f'{late} (the first evaluation: no step-0 one)' if late else 0}; "
          "end: at the last evaluation; sampled at the rollout temperature unless greedy")
    names = ["seed", "warm-up", "end", "gain", "greedy warm-up", "greedy end", "wall s", "sft loss", "skipped", "pass"]
    row = lambda cells: print("  ".join(f"{c:>{max(len(n), 6)}}" for c, n in zip(cells, names)))
    row(names)
    for r in results:
        if "error" in r:
            print(f"{r['seed']:>6}  CRASHED: {r['error']}")
        else:
            row([r["seed"], *(fmt(r[c], spec) for c, spec in COLS.items()), "yes" if r["pass"] else "no"])
    summary = {}
    for c in COLS:
        vals = [r[c] for r in ok if r[c] is not None]
        summary[c] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)} if vals else None
    for stat in ("min", "median", "max") if ok else ():
        row([stat, *(fmt(summary[c] and summary[c][stat], ".1f" if spec == "d" else spec) for c, spec in COLS.items())])
    slow = [r["seed"] for r in ok if r["wall_s"] > MAX_WALL_S]
    summary.update(passed=sum(r["pass"] for r in ok), of=len(seeds), slow=slow,
                   crashed=[r["seed"] for r in results if "error" in r])
    print(f"{summary['passed']} of {len(seeds)} seeds pass (gain >= {MIN_GAIN}, end >= {MIN_END}); "
          f"over {MAX_WALL_S:.0f} s wall: {slow or 'none'}")
    if summary["crashed"]:
        print(f"crashed: seeds {summary['crashed']} (see their logs)")
    if ok:
        median = sorted(ok, key=lambda r: (r["end"], r["seed"]))[(len(ok) - 1) // 2]
        summary["median_seed"] = median["seed"]
        plot = Path(args.plot or out / "success_rate.png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        band_plot(plot, ok, median, lambda r: [(s, y) for s, y, _ in r["curve"]], "held-out success",
                  greedy=lambda r: [(s, g) for s, _, g in r["curve"] if g is not None], line=MIN_END)
        band_plot(plot.with_name("reward.png"), ok, median, lambda r: r["reward"], "reward_mean")
        print(f"plots: {plot}, {plot.with_name('reward.png')}")
    if args.json:
        cfg = next((json.loads((out / f"seed_{r['seed']}" / "config.json").read_text()) for r in ok), None)
        with open(args.json, "w") as f:  # "resolved": the first good run's config.json (its seed included)
            json.dump({"header": header, "config": {"file": args.config, "overrides": args.overrides, "resolved": cfg},
                       "seeds": results, "summary": summary}, f, indent=1)
    return 1 if summary["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
