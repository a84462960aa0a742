"""Metrics as JSON lines (one object per line) and ``ossrl plot`` curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl, flushed as written.

    On resume, records past the resumed step are dropped first, so the file reads as if the
    run had never been interrupted.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [r for r in read(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the log
    return out


PLOTS = {
    "reward": ["reward_mean"],
    "success_rate": ["eval_success_rate", "eval_greedy_success_rate"],
    "loss": ["loss", "sft_loss"],
    "phase_seconds": ["rollout_s", "train_s", "sync_s"],
    "importance_weights": ["tis_weight_mean", "tis_truncated_frac"],
}


def plot(run_dir: str | Path) -> list[Path]:
    """Writes RUN_DIR/plots/<name>.png for every curve the log has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys in PLOTS.items():
        series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None and "step" in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=k)
        ax.set_xlabel("step")
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
