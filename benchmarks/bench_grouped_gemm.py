"""ossrl.ops.grouped_gemm, its two kernel families side by side, against torch's grouped_mm, same inputs.

Rows: "ossrl" (the default kernels: mma.sync on the GPU, C++ on the CPU), "ossrl cutlass"
(OSSRL_MOE_GEMM=cutlass: the CUTLASS sm90 kernels; only on an sm_90 GPU with a build that has
them), torch.nn.functional.grouped_mm (GPU) and a per-expert loop of torch matmuls. The problem is
GPT-OSS's gate/up projection: R = T*k routed rows sorted by expert, (R, H) @ (E, H, 2I) + bias.
Each is timed forward and forward+backward (dx, dw, db); ratios are row time / "ossrl" time
(> 1: the default is faster). `cutlass ran` counts the forward calls that took the CUTLASS
kernels (0 on its row would mean a fallback to the default).

    python benchmarks/bench_grouped_gemm.py                    # CPU: small shapes, fp32
    python benchmarks/bench_grouped_gemm.py --device cuda      # GPU: GPT-OSS 20b/120b shapes, bf16
    python benchmarks/bench_grouped_gemm.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

import ossrl
from _floor import floor_seconds, median_seconds, rates
from ossrl import _C
from ossrl.ops import grouped_gemm
from _kernels import cutlass_available, with_kernels


def torch_grouped_mm(x, w, off, b):
    rows = torch.repeat_interleave(torch.arange(len(off), device=x.device),
                                   torch.diff(off, prepend=off.new_zeros(1)), output_size=x.shape[0])
    return F.grouped_mm(x, w, offs=off) + b[rows]


def per_expert_loop(x, w, off, b):
    out, start = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device), 0
    for e, end in enumerate(off.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e] + b[e]
        start = end
    return out


def bench_case(T, H, N, E, k, dtype, device, repeat, impls):
    R = T * k
    # Routed rows per expert as top-k routing gives them: uneven, some experts may get none.
    counts = torch.bincount(torch.randint(0, E, (R,)), minlength=E)
    off = counts.cumsum(0).to(torch.int32).to(device)
    x = torch.randn(R, H, dtype=dtype, device=device)
    w = torch.randn(E, H, N, dtype=dtype, device=device) / H**0.5
    b = torch.randn(E, N, dtype=dtype, device=device) * 0.1
    g = torch.randn(R, N, dtype=dtype, device=device)
    flops = 2 * R * H * N
    nbytes = x.element_size() * (R * H + E * H * N + E * N + R * N)
    floor = floor_seconds(flops, nbytes, device, dtype)
    ref = per_expert_loop(x.double(), w.double(), off, b.double()) if device == "cpu" else None
    rows, base = [], None
    for name, fn in impls.items():
        before = _C.sm90_gemm_calls()
        out = fn(x, w, off, b)
        ran = _C.sm90_gemm_calls() - before
        base = out.float() if base is None else base
        err = ((out.double() - (ref if ref is not None else base.double())).norm()
               / (ref if ref is not None else base.double()).norm()).item()
        fwd = median_seconds(lambda: fn(x, w, off, b), device, repeat)
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

        def fwd_bwd():
            torch.autograd.grad((fn(xg, wg, off, bg) * g).sum(), [xg, wg, bg])

        fb = median_seconds(fwd_bwd, device, repeat)
        rows.append(dict(impl=name, fwd_ms=fwd * 1e3, fwd_tflops=flops / fwd / 1e12, fwd_floor_ms=floor * 1e3,
                         fwd_over_floor=fwd / floor, fwd_bwd_ms=fb * 1e3, fwd_bwd_tflops=3 * flops / fb / 1e12,
                         rel_diff=err, cutlass_ran=ran))
    for row in rows:
        row["fwd_speedup_of_ossrl"] = row["fwd_ms"] / rows[0]["fwd_ms"]
        row["fwd_bwd_speedup_of_ossrl"] = row["fwd_bwd_ms"] / rows[0]["fwd_bwd_ms"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (k = 4 routed rows each)")
    p.add_argument("--hidden", type=int, help="H, with N = 2H (default 2880 on GPU, 128 on CPU)")
    p.add_argument("--experts", type=int, nargs="*", help="expert counts (default 32 and 128)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--json", help="write the rows here as JSON")
    a = p.parse_args()
    gpu = a.device == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if gpu else torch.float32)
    tokens = a.tokens or ([512, 4096, 16384] if gpu else [64, 256])
    H = a.hidden or (2880 if gpu else 128)
    experts = a.experts or [32, 128]
    repeat = a.repeat or (20 if gpu else 3)
    impls = {"ossrl": with_kernels("mma", grouped_gemm)}
    sm90 = cutlass_available(a.device)
    if sm90:
        impls["ossrl cutlass"] = with_kernels("cutlass", grouped_gemm)
    if gpu:
        impls["grouped_mm"] = torch_grouped_mm
    impls["per-expert loop"] = per_expert_loop

    header = (f"ossrl {ossrl.__version__} | torch {torch.__version__} | "
              f"{torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()} "
              f"({torch.get_num_threads()} threads) | {dtype} | (T*4, {H}) @ (E, {H}, {2 * H}) + bias"
              f" | CUTLASS sm90 rows: {'yes' if sm90 else 'no (needs an sm_90 GPU and a build with them)'}")
    print(header)
    print(f"{'E':>4} {'T':>6} {'impl':<16} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}"
          f" {'ours x fwd':>10} {'ours x f+b':>10} {'rel diff':>9} {'fwd/floor':>9} {'cutlass ran':>11}")
    results = []
    for E in experts:
        for T in tokens:
            try:
                rows = bench_case(T, H, 2 * H, E, 4, dtype, a.device, repeat, impls)
            except torch.OutOfMemoryError:
                print(f"{E:>4} {T:>6} out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            for row in rows:
                row.update(E=E, T=T, H=H, N=2 * H, k=4, dtype=str(dtype), device=a.device)
                print(f"{E:>4} {T:>6} {row['impl']:<16} {row['fwd_ms']:>9.2f} {row['fwd_tflops']:>8.3f}"
                      f" {row['fwd_bwd_ms']:>11.2f} {row['fwd_bwd_tflops']:>8.3f}"
                      f" {row['fwd_speedup_of_ossrl']:>10.2f} {row['fwd_bwd_speedup_of_ossrl']:>10.2f}"
                      f" {row['rel_diff']:>9.1e} {row['fwd_over_floor']:>9.2f} {row['cutlass_ran']:>11}")
            results.extend(rows)
    print("ours x: row time / ossrl time (> 1 means the default kernels are faster). rel diff: normwise, against"
          " float64 on the CPU, against the first row on the GPU. fwd/floor: forward time over"
          " max(flops / torch matmul rate, bytes / torch copy bandwidth), both measured here:")
    matmul, copy = rates(a.device, dtype)
    print(f"  torch matmul {matmul / 1e12:.2f} TFLOP/s, copy {copy / 1e9:.1f} GB/s ({dtype}).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(header=header, rows=results, torch_matmul_flops=matmul, torch_copy_bytes_per_s=copy),
                      f, indent=1)


if __name__ == "__main__":
    main()
