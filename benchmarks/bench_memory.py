"""The longest trajectory one training step takes, per memory mode.

Modes: full fine-tuning, + activation checkpointing, + activations offloaded to host memory;
the same three with LoRA (frozen base, adapters only). A step is what the loop does with one trajectory: chunked token
log-probs, the GRPO loss, backward, AdamW.

On a GPU the search is direct: lengths double until a step runs out of memory, then bisect; the
peak (torch.cuda.max_memory_allocated) is printed for each length that fit. On the CPU nothing
runs out within minutes, so the peak resident memory of one step is measured at a few lengths
(each in a fresh process), a line is drawn through the two longest, and the longest trajectory
under --budget-gb is extrapolated from it (reported as such); --search-gb adds a direct search
(doubling and bisection, every length measured) for a smaller budget that the CPU can reach.

    python benchmarks/bench_memory.py                       # tiny model, CPU
    python benchmarks/bench_memory.py --model small         # big enough to tell the modes apart
    python benchmarks/bench_memory.py --model /path/to/gpt-oss-20b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

# mode: (activation checkpointing, LoRA rank, activations offloaded to host memory)
MODES = {"full": (False, 0, False), "full+ckpt": (True, 0, False), "full+ckpt+offload": (True, 0, True),
         "lora": (False, 16, False), "lora+ckpt": (True, 16, False), "lora+ckpt+offload": (True, 16, True)}

# Built-in models: "tiny" (the `ossrl train` default) has activations too small to tell the modes
# apart; "small" (8 layers, hidden 512, 8 experts top-4; ~56M parameters, random weights) is big
# enough per token for activation checkpointing and LoRA to show on the CPU.
PRESETS = {"tiny": {}, "small": dict(hidden_size=512, intermediate_size=512, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                     num_local_experts=8, num_experts_per_tok=4)}


def build(model_path: str, device: str, lora_rank: int, ckpt: bool):
    from ossrl.model import GptOss, GptOssConfig, load_pretrained
    from ossrl.model.lora import apply_lora

    torch.manual_seed(0)
    if model_path in PRESETS:
        model = GptOss(GptOssConfig.tiny(max_position_embeddings=1 << 20, **PRESETS[model_path])).to(device)
    else:
        model = load_pretrained(model_path, device=device, dtype=torch.bfloat16)
    if lora_rank:
        apply_lora(model, lora_rank)
    model.activation_checkpointing = ckpt
    return model


def one_step(model, n: int, device: str, offload: bool = False) -> None:
    from ossrl.train.loop import activations_on_host
    from ossrl.train.loss import policy_loss

    ids = torch.randint(0, model.config.vocab_size, (n,), device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    with activations_on_host(offload):
        logp = model.token_logprobs(ids, cu, ids.roll(-1), max_seqlen=n)
    mask = torch.ones(n, device=device)
    loss, _ = policy_loss(logp, logp.detach(), logp.detach(), torch.ones(n, device=device), mask)
    loss.backward()
    opt.step()


def cpu_peak(model_path: str, mode: str, n: int) -> int:
    """Peak resident bytes of a fresh process doing one step (minus the same process idle)."""
    code = ("import sys, resource, torch; sys.path.insert(0, %r); import bench_memory as b; "
            "ckpt, r, off = b.MODES[%r]; m = b.build(%r, 'cpu', r, ckpt); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "b.one_step(m, %d, 'cpu', off); print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (os.path.dirname(os.path.abspath(__file__)), mode, model_path, n))
    # glibc keeps freed heap memory resident and raises its mmap threshold as it goes, so the peak
    # RSS would depend on the allocation order more than on what was live; a fixed threshold makes
    # tensor-sized blocks mmap'd and unmapped on free, and the peak RSS follows the live bytes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    base, peak = int(out[-2]), int(out[-1])
    return (peak - base) * 1024  # ru_maxrss is in KiB on Linux


def cpu_longest(model_path: str, mode: str, budget: float, peaks: dict[int, int]) -> int:
    """Direct search on the CPU: the longest trajectory whose measured step peak stays within
    ``budget`` bytes (doubling, then bisection to ~3%); ``peaks`` holds the lengths measured so
    far and gains the new ones."""
    def fits(n: int) -> bool:
        if n not in peaks:
            peaks[n] = cpu_peak(model_path, mode, n)
        return peaks[n] <= budget

    lo = max((n for n, p in peaks.items() if p <= budget), default=0)
    hi = min((n for n, p in peaks.items() if p > budget), default=None)
    if hi is None:
        hi = max(lo, 512) * 2
        while fits(hi):
            lo, hi = hi, hi * 2
    while hi - lo > max(lo // 32, 128):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gpu_longest(model_path: str, mode: str, start: int, limit: int) -> tuple[int, dict[int, int]]:
    ckpt, rank, offload = MODES[mode]
    model = build(model_path, "cuda", rank, ckpt)
    peaks: dict[int, int] = {}

    def fits(n: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            one_step(model, n, "cuda", offload)
            torch.cuda.synchronize()
            peaks[n] = torch.cuda.max_memory_allocated()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)

    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > max(lo // 64, 256):  # within ~1.5%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    del model
    torch.cuda.empty_cache()
    return lo, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help=f"built in ({', '.join(PRESETS)}) or a GPT-OSS checkpoint folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="2048,8192,16384", help="CPU: lengths to measure")
    ap.add_argument("--budget-gb", type=float, default=None, help="CPU: memory for the extrapolation "
                    "(default: MemAvailable now)")
    ap.add_argument("--search-gb", type=float, default=None, help="CPU: also search directly for the longest "
                    "trajectory whose step stays within this many GiB (a fresh process per length tried)")
    ap.add_argument("--limit", type=int, default=1 << 17, help="GPU: longest length tried")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    if args.device == "cuda":
        print(f"{'mode':<18} {'longest trajectory (tokens)':>28} {'peak at longest (GiB)':>22}")
        for mode in MODES:
            n, peaks = gpu_longest(args.model, mode, 4096, args.limit)
            peak = peaks.get(n, 0) / 2**30
            rows.append(dict(mode=mode, longest=n, peak_gib=peak, peaks={k: v for k, v in sorted(peaks.items())}))
            print(f"{mode:<18} {n:>28} {peak:>22.2f}")
    else:
        budget = args.budget_gb * 2**30 if args.budget_gb else _mem_available()
        lengths = sorted(int(x) for x in args.lengths.split(","))
        if len(lengths) < 2 or lengths[0] <= 0 or len(set(lengths)) != len(lengths):
            ap.error("--lengths: at least two different positive lengths")
        print(f"CPU, budget {budget / 2**30:.1f} GiB; peak resident memory of one step (MiB) at each length")
        print(f"{'mode':<18} " + " ".join(f"{n:>9}" for n in lengths) + f" {'MiB/token':>10} {'longest (extrapolated)':>24}")
        for mode in MODES:
            peaks = [cpu_peak(args.model, mode, n) for n in lengths]
            # the line through the two longest: at short lengths the peak can be the optimizer
            # step's (weights, gradients, AdamW state) rather than the activations'
            slope = (peaks[-1] - peaks[-2]) / (lengths[-1] - lengths[-2])
            base = peaks[-1] - slope * lengths[-1]
            longest = int((budget - base) / slope) if slope > 0 else None
            rows.append(dict(mode=mode, lengths=lengths, peak_bytes=peaks, bytes_per_token=slope,
                             longest_extrapolated=longest, budget_bytes=budget))
            print(f"{mode:<18} " + " ".join(f"{p / 2**20:>9.0f}" for p in peaks)
                  + f" {slope / 2**20:>10.3f} {longest if longest else 'n/a':>24}")
        if args.search_gb:
            cap = args.search_gb * 2**30
            print(f"\nDirect search: longest trajectory whose step peaks within {args.search_gb:g} GiB")
            print(f"{'mode':<18} {'longest (measured)':>19} {'peak there (MiB)':>17} {'lengths tried':>14}")
            for row in rows:
                tried = dict(zip(row["lengths"], row["peak_bytes"]))
                n = cpu_longest(args.model, row["mode"], cap, tried)
                row.update(search_budget_bytes=cap, longest_measured=n,
                           search_peaks={k: v for k, v in sorted(tried.items())})
                peak = f"{tried[n] / 2**20:.0f}" if n in tried else "n/a"
                print(f"{row['mode']:<18} {n:>19} {peak:>17} {len(tried):>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, model=args.model, rows=rows), f, indent=1)


def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo: pass --budget-gb")


if __name__ == "__main__":
    main()
