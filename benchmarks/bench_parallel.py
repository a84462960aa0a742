"""Memory and step time per rank for the parallel layouts, and the longest trajectory per context size.

    python benchmarks/bench_parallel.py [--json results.json] [--worlds 2,4]

Measured on the CPU with gloo (each rank a process, one thread each), on bench_memory's "small"
built-in model (8 layers, hidden 512, 8 experts top-4, ~56M parameters, fp32) with activation
checkpointing:

1. One training step (chunked log-probs, a token-mean loss, backward, gradient reduction, clipping,
   AdamW) on a global batch of 8 trajectories of 1024 tokens, for dp, fsdp, ep (expert_parallel =
   N), cp (context_parallel = N) and ep+cp on N = 2 and 4 processes (and one process): the peak
   resident memory of each rank beyond its size once torch is imported (weights, gradients,
   optimizer state, activations, communication buffers; the largest rank's), and the step time
   (the second of two steps; with more ranks than cores, the ranks share the cores).
2. The longest single trajectory one step trains within a per-rank budget, for cp = 1, 2, 4: what
   the forward and backward of the second step add to the memory each rank has in use (malloc's
   count over every arena, sampled every millisecond) at two lengths per rank, a straight line through them, extrapolated to
   --budget-gib less what the rank holds between steps (arithmetic, reported as such, not a run).
3. On paper: the memory per GPU of GPT-OSS-120b (its config.json figures) training 1M-token
   trajectories on 16 H200, by component and layout: computed, not measured (see paper()).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {"dp": ("dp", 1, 1), "fsdp": ("fsdp", 1, 1), "ep": ("dp", "N", 1), "cp": ("dp", 1, "N"),
           "ep+cp": ("dp", "N", "N"), "fsdp+ep": ("fsdp", "N", 1)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _MallInfo2


def _now_mib() -> float:
    """Bytes malloc has handed out and not had back, over every arena (mmapped blocks included).
    Unlike the resident size, memory freed but kept by the allocator does not count, so what one
    step needs does not depend on what earlier steps left cached."""
    m = _libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2 ** 20


class _PeakSampler:
    """The most memory in use while the block runs (sampled every millisecond), beyond what was in
    use when it started: what the forward and backward add to what the process already holds."""

    def __enter__(self):
        import threading

        self.start = self.peak = _now_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _now_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _now_mib())
        self.added = self.peak - self.start


def _step(model, dp, optimizer, seqs: list[torch.Tensor], n_tokens: int, sampler) -> None:
    ids = torch.cat(seqs)
    targets = torch.cat([torch.roll(s, -1) for s in seqs])
    cu = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mask = torch.ones(len(ids))
    mask[cu[1:].long() - 1] = 0
    shard = dp.context_shard(cu)
    if shard is not None:
        ids, targets, mask = (shard.local(t) for t in (ids, targets, mask))
        cu = shard.cu_seqlens_q
    optimizer.zero_grad(set_to_none=True)
    with sampler, model.context_shard(shard):  # the part that grows with the tokens
        logp = model.token_logprobs(ids, cu, targets)
        (-(logp * mask).sum() / n_tokens).backward()
    dp.reduce_grads(model)
    dp.clip_grads(model, 1.0)
    optimizer.step()


def _worker(rank: int, world: int, port: int, kind: str, ep: int, cp: int, lengths: list[int], steps: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from bench_memory import PRESETS
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.train.parallel import make_parallel

    try:
        before, in_use_before = _rss_mib(), _now_mib()  # torch and ossrl imported, nothing built
        dp = make_parallel(kind, ep, cp)
        torch.manual_seed(0)
        model = GptOss(GptOssConfig.tiny(max_position_embeddings=1 << 20, **PRESETS["small"]))
        model.activation_checkpointing = True
        model = dp.prepare(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                      **dp.optimizer_options())
        g = torch.Generator().manual_seed(1)
        seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]
        data_ranks = world // cp
        mine = seqs[rank // cp::data_ranks]
        times = []
        for _ in range(steps):
            sampled = _PeakSampler()
            t0 = time.perf_counter()
            _step(model, dp, optimizer, mine, sum(n - 1 for n in lengths), sampled)
            times.append(time.perf_counter() - t0)
        held = _now_mib()  # weights, gradients, optimizer state, between steps (in use, not resident)
        results.put((rank, {"peak_mib": _rss_mib() - before, "step_s": times[-1], "fb_added_mib": sampled.added,
                            "held_mib": held - in_use_before}))
    except BaseException as e:
        results.put((rank, {"error": repr(e)}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(kind: str, ep: int, cp: int, world: int, lengths: list[int], steps: int = 2) -> dict:
    """Runs the step on ``world`` fresh processes; the largest peak and the slowest rank's time."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, kind, ep, cp, lengths, steps, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    errors = [v["error"] for v in got.values() if "error" in v]
    if errors:
        raise RuntimeError(f"{kind} ep={ep} cp={cp} on {world}: {errors[0]}")
    return {k: max(v[k] for v in got.values()) for k in ("peak_mib", "step_s", "fb_added_mib", "held_mib")}


def layout_table(worlds: list[int], lengths: list[int], names: list[str], log) -> list[dict]:
    rows = []
    if "one" in names:
        rows.append({"layout": "one process", "world": 1, **measure("dp", 1, 1, 1, lengths)})
        log(rows[-1])
    for world in worlds:
        for name, (kind, ep, cp) in LAYOUTS.items():
            if name not in names:
                continue
            ep, cp = (world if ep == "N" else ep), (world if cp == "N" else cp)
            rows.append({"layout": name, "world": world, "ep": ep, "cp": cp, **measure(kind, ep, cp, world, lengths)})
            log(rows[-1])
    return rows


def longest_table(cps: list[int], per_rank: list[int], budget_mib: float, log) -> list[dict]:
    rows = []
    for cp in cps:
        peaks = {}
        held = {}
        for n in per_rank:
            # the second step: the first allocated the optimizer state and the gradients
            got = measure("dp", 1, cp, cp, [n * cp], steps=2)
            peaks[n * cp], held[n * cp] = got["fb_added_mib"], got["held_mib"]
            log(cp, n * cp, got)
        (a, pa), (b, pb) = sorted(peaks.items())[-2:]
        slope = (pb - pa) / (b - a)
        fixed = max(held.values())  # weights, gradients, optimizer state, buffers: held between steps
        rows.append({"cp": cp, "fb_added_mib": peaks, "held_mib": fixed, "mib_per_token": slope,
                     "longest_extrapolated": int(b + (budget_mib - fixed - pb) / slope)})
    return rows


# ---- on paper: GPT-OSS-120b, 1M-token trajectories, 16 H200 ----

# config.json of openai/gpt-oss-120b: 36 layers (sliding window 128 on every other one), hidden 2880,
# 128 experts of intermediate size 2880, 4 per token, 64 query heads and 8 KV heads of 64,
# vocabulary 201088, lm_head not tied.
GPT_OSS_120B = dict(layers=36, hidden=2880, inter=2880, experts=128, top_k=4, heads=64, kv_heads=8, head_dim=64,
                    vocab=201088, window=128)
SMALL = dict(layers=8, hidden=512, inter=512, experts=8, top_k=4, heads=8, kv_heads=2, head_dim=64)


def param_counts(c: dict) -> tuple[int, int]:
    """(dense, expert) parameter counts of a GPT-OSS config (biases, sinks, norms, router included)."""
    h, i, e = c["hidden"], c["inter"], c["experts"]
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h + c["heads"]
    dense = c["layers"] * (attn + h * e + e + 2 * h) + 2 * c["vocab"] * h + h
    return dense, c["layers"] * e * (h * 2 * i + 2 * i + i * h + h)


def activation_bytes_per_token(c: dict, b: int) -> tuple[float, float]:
    """(saved, live) bytes per token with activation checkpointing, elements of b bytes: the layer
    input kept for every layer, and one layer recomputed with its backward (its activations and
    their gradients: q, k, v, the attention output, three hidden-sized tensors, the router logits,
    and per routed slot the gathered row, the gate/up output, the activation and the expert output)."""
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    layer = q + 2 * kv + q + 3 * c["hidden"] + c["experts"] + c["top_k"] * (2 * c["hidden"] + 3 * c["inter"])
    return b * c["hidden"] * c["layers"], 2 * b * layer


def paper(measured_mib_per_token: float | None, tokens: int = 1 << 20, gpus: int = 16, hbm_gb: float = 141.0) -> dict:
    """Memory per GPU (GB) of GPT-OSS-120b training one ``tokens``-token trajectory on ``gpus`` GPUs,
    by component and layout. Computed from the config, not measured; the activation formula is
    scaled by what the small model measured here (``measured_mib_per_token``, cp = 1, fp32) over what
    the same formula predicts for it. With ``dtype = "bfloat16"``: weights, gradients and AdamW's
    two moments 2 bytes each (the default float32 master weights double all four)."""
    c = GPT_OSS_120B
    dense, experts = param_counts(c)
    saved, live = activation_bytes_per_token(c, 2)
    s_saved, s_live = activation_bytes_per_token(SMALL, 4)
    calib = 1.0 if measured_mib_per_token is None else measured_mib_per_token * 2 ** 20 / (s_saved + s_live)
    kv_token_layer = 2 * c["kv_heads"] * c["head_dim"] * 2  # K and V, bf16
    full_layers = c["layers"] // 2
    gb = 1e9
    cp = gpus
    local = tokens / cp
    layouts = [  # name, expert shards, dense shards, engine: own full bf16 replica?, optimizer offloaded, built?
        ("fsdp=16, cp=16", gpus, gpus, True, False, "yes"),
        ("ep=16, cp=16", gpus, 1, True, False, "yes"),
        ("ep=16, fsdp=16 (dense), cp=16", gpus, gpus, True, False, "yes"),
        ("ep=16, cp=16, engine on the trainer's shards", gpus, 1, False, False, "no: the engine is not expert-parallel"),
        ("ep=16, fsdp=16 (dense), cp=16, engine on the shards, offload_optimizer", gpus, gpus, False, True,
         "no: the engine is not expert-parallel"),
    ]
    per_layer = (dense - 2 * c["vocab"] * c["hidden"]) / c["layers"] + experts / c["layers"]
    rows = []
    for name, e_div, d_div, replica, offload, built in layouts:
        params = experts / e_div + dense / d_div
        fsdp_only = name.startswith("fsdp")
        comp = {
            "weights (bf16)": 2 * params / gb,
            "gradients (bf16)": 2 * params / gb,
            "AdamW moments (2 x bf16)": 4 * params / gb,
            "engine replica (bf16, all experts)": 2 * (dense + experts) / gb if replica else 0.0,
            "activations, checkpointed": calib * (saved + live) * local / gb,
            "log-prob chunk (1024 x vocab fp32, fwd+bwd)": 2 * 1024 * c["vocab"] * 4 / gb,
            # K/V of the whole trajectory gathered for one layer, and their gradient in the backward
            "cp all-gather of K/V (one layer, fwd+bwd)": 2 * tokens * kv_token_layer / gb,
            # ep: routed rows out and back and their gradients (tokens x top_k x hidden, bf16, one
            # layer); fsdp: one layer's parameters gathered, and the next one prefetched
            "ep all-to-all / fsdp all-gather (one layer)": (2 * 2 * per_layer * 2 if fsdp_only else
                                                            4 * local * c["top_k"] * c["hidden"] * 2) / gb,
            # the whole trajectory's cache on one GPU (the engine does not split a sequence), every
            # layer (the paged cache keeps blocks outside the sliding window too)
            "rollout KV cache of the 1M tokens": tokens * kv_token_layer * c["layers"] / gb,
        }
        resident = comp["weights (bf16)"] + comp["engine replica (bf16, all experts)"]
        moments = comp["AdamW moments (2 x bf16)"]
        training = resident + moments + comp["gradients (bf16)"] + sum(
            v for k, v in comp.items() if k.startswith(("activations", "log-prob", "cp ", "ep ")))
        rollout = resident + (0.0 if offload else moments) + comp["rollout KV cache of the 1M tokens"]
        rows.append({"layout": name, "built": built, "components_gb": comp, "training_phase_gb": training,
                     "rollout_phase_gb": rollout, "fits": max(training, rollout) <= hbm_gb})
    return {"dense_params": dense, "expert_params": experts, "tokens": tokens, "gpus": gpus, "hbm_gb": hbm_gb,
            "activation_calibration": calib, "rows": rows}


def print_paper(p: dict) -> None:
    print(f"\nON PAPER (computed, not measured): GPT-OSS-120b ({p['dense_params'] / 1e9:.2f}B dense + "
          f"{p['expert_params'] / 1e9:.1f}B expert parameters), one {p['tokens']:,}-token trajectory, "
          f"{p['gpus']} GPUs of {p['hbm_gb']:.0f} GB; activations scaled by {p['activation_calibration']:.2f} "
          f"(measured small-model cost / formula); trainer dtype = bfloat16 (float32, the default, doubles the first "
          f"three rows); GB per GPU")
    names = [r["layout"] for r in p["rows"]]
    print(f"{'component':<46}" + "".join(f"{i + 1:>8}" for i in range(len(names))))
    for k in p["rows"][0]["components_gb"]:
        print(f"{k:<46}" + "".join(f"{r['components_gb'][k]:>8.1f}" for r in p["rows"]))
    print(f"{'peak, training phase':<46}" + "".join(f"{r['training_phase_gb']:>8.1f}" for r in p["rows"]))
    print(f"{'peak, rollout phase (grads freed)':<46}" + "".join(f"{r['rollout_phase_gb']:>8.1f}" for r in p["rows"]))
    print(f"{'fits in ' + format(p['hbm_gb'], '.0f') + ' GB':<46}" +
          "".join(f"{'yes' if r['fits'] else 'no':>8}" for r in p["rows"]))
    for i, r in enumerate(p["rows"]):
        print(f"  {i + 1}: {r['layout']} (built today: {r['built']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--length", type=int, default=1024, help="tokens per trajectory of the 8-trajectory batch")
    ap.add_argument("--per-rank", default="1024,2048", help="per-rank lengths of the longest-trajectory fit")
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--layouts", default=",".join(["one", *LAYOUTS]), help="which rows of the first table")
    ap.add_argument("--skip-layouts", action="store_true")
    ap.add_argument("--skip-longest", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    worlds = [int(w) for w in a.worlds.split(",")]
    out = {"args": vars(a), "torch": torch.__version__}
    if not a.skip_layouts:
        out["layouts"] = layout_table(worlds, [a.length] * 8, a.layouts.split(","), log)
    if not a.skip_longest:
        out["longest"] = longest_table([1, *worlds], [int(n) for n in a.per_rank.split(",")], a.budget_gib * 1024,
                                       log)
    cp1 = next((r for r in out.get("longest", []) if r["cp"] == 1), None)
    out["paper"] = paper(cp1["mib_per_token"] if cp1 else None)
    print(f"torch {torch.__version__} | small model (56M, fp32, activation checkpointing) | gloo, 1 thread per rank")
    if "layouts" in out:
        print(f"one step on 8 x {a.length} tokens: peak RSS of the largest rank (weights, grads, AdamW state, activations, "
              f"buffers), slowest rank's time")
        print(f"{'layout':<14} {'ranks':>5} {'ep':>3} {'cp':>3} {'peak MiB/rank':>14} {'step s':>8}")
        for r in out["layouts"]:
            print(f"{r['layout']:<14} {r['world']:>5} {r.get('ep', 1):>3} {r.get('cp', 1):>3} {r['peak_mib']:>14.0f} "
                  f"{r['step_s']:>8.2f}")
    if "longest" in out:
        print(f"longest single trajectory within {a.budget_gib:g} GiB per rank: what the forward and backward add to "
              f"a rank's memory in use (malloc's count, sampled every ms; the second step) at two lengths, a straight line through "
              f"them, extrapolated to the budget less what the rank holds between steps (not run)")
        print(f"{'cp':>3} {'fwd+bwd add (tokens: MiB)':<34} {'held MiB':>9} {'MiB/token':>10} {'longest':>10}")
        for r in out["longest"]:
            pk = ", ".join(f"{n}: {v:.0f}" for n, v in r["fb_added_mib"].items())
            print(f"{r['cp']:>3} {pk:<34} {r['held_mib']:>9.0f} {r['mib_per_token']:>10.4f} "
                  f"{r['longest_extrapolated']:>10}")
    print_paper(out["paper"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
