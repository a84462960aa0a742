"""The GPT-OSS expert block: ossrl's fused op against what people use today, same inputs, one run.

Peers: a torch.nn.functional.grouped_mm pipeline (gather, grouped_mm, bias, SwiGLU, grouped_mm,
bias, weighted index_add), a per-expert loop of plain torch ops, and transformers' GptOssExperts.
Each is timed forward and forward+backward; ratios are peer time / ours (> 1: ours is faster).
On an sm_90 GPU with a build that has them, an "ossrl cutlass" row runs every GEMM, forward and
backward, on the CUTLASS sm90 kernels (OSSRL_MOE_GEMM=cutlass).

    python benchmarks/bench_moe.py                      # CPU: scaled-down shapes, fp32
    python benchmarks/bench_moe.py --device cuda        # GPU: GPT-OSS 20b/120b shapes, bf16
    python benchmarks/bench_moe.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

import ossrl
from _floor import floor_seconds, median_seconds, rates
from ossrl.ops import moe_experts, moe_route
from _peers import transformers_available  # noqa: E402  (benchmarks/, beside this script)
from _kernels import cutlass_available, with_kernels

ALPHA, LIMIT = 1.702, 7.0


def swiglu(h):
    gate, up = h[..., ::2].clamp(max=LIMIT), h[..., 1::2].clamp(-LIMIT, LIMIT)
    return (up + 1) * gate * torch.sigmoid(ALPHA * gate)


def grouped_mm_pipeline(x, r, wgu, bgu, wd, bd):
    k = r.weights.shape[1]
    tokens = (r.order // k).long()
    expert_of_row = torch.repeat_interleave(
        torch.arange(len(r.offsets), device=x.device), torch.diff(r.offsets, prepend=r.offsets.new_zeros(1)),
        output_size=r.order.numel(),
    )
    xs = x[tokens]
    h = F.grouped_mm(xs, wgu, offs=r.offsets) + bgu[expert_of_row]
    y = F.grouped_mm(swiglu(h), wd, offs=r.offsets) + bd[expert_of_row]
    w = r.weights.reshape(-1)[r.order.long()].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y * w[:, None])


def per_expert_loop(x, r, wgu, bgu, wd, bd):
    k = r.weights.shape[1]
    out = torch.zeros_like(x)
    start = 0
    for e, end in enumerate(r.offsets.tolist()):
        if end > start:
            flat = r.order[start:end].long()
            t = flat // k
            y = swiglu(x[t] @ wgu[e] + bgu[e]) @ wd[e] + bd[e]
            out.index_add_(0, t, y * r.weights.reshape(-1)[flat, None].to(x.dtype))
        start = end
    return out


def make_transformers(H, I, E, device):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    m = GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)).to(device)
    names = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"]

    def run(x, r, *params):  # the module's own forward, on our weight tensors
        args = (x, r.experts.long(), r.weights.to(x.dtype))
        return torch.func.functional_call(m, dict(zip(names, params)), args)

    return run


def bench_case(T, H, I, E, k, dtype, device, repeat, peers):
    x = torch.randn(T, H, dtype=dtype, device=device)
    logits = torch.randn(T, E, device=device)
    params = [
        torch.randn(E, H, 2 * I, dtype=dtype, device=device) / H**0.5,
        torch.randn(E, 2 * I, dtype=dtype, device=device) * 0.1,
        torch.randn(E, I, H, dtype=dtype, device=device) / I**0.5,
        torch.randn(E, H, dtype=dtype, device=device) * 0.1,
    ]
    r = moe_route(logits, k)
    g = torch.randn_like(x)
    ours = lambda x, r, *p: moe_experts(x, r, *p, swiglu_alpha=ALPHA, swiglu_limit=LIMIT)  # noqa: E731
    impls = {"ossrl": with_kernels("mma", ours)}
    if cutlass_available(device):  # every GEMM on CUTLASS sm90 (OSSRL_MOE_GEMM=cutlass)
        impls["ossrl cutlass"] = with_kernels("cutlass", ours)
    impls.update({"grouped_mm": grouped_mm_pipeline, "per-expert loop": per_expert_loop})
    if "transformers" in peers:
        impls["transformers"] = make_transformers(H, I, E, device)

    ref = impls["ossrl"](x, r, *params).float()
    flops = 6 * T * k * H * I  # two GEMMs of 2*R*H*(2I) and 2*R*I*H flops, R = T*k routed rows
    # Bytes the forward must move at the least: x, both weights and biases, out, and h (saved for
    # the backward); activations between the GEMMs could stay on chip in a perfect kernel.
    R, size = T * k, x.element_size()
    nbytes = size * (T * H + E * (3 * H * I + 2 * I + H) + T * H + R * 2 * I)
    floor = floor_seconds(flops, nbytes, device, dtype)
    rows = []
    for name, fn in impls.items():
        if name not in ("ossrl", "ossrl cutlass", *peers):
            continue
        out = fn(x, r, *params).float()
        err = (out - ref).abs().max().item() / (ref.abs().max().item() + 1e-9)
        fwd = median_seconds(lambda: fn(x, r, *params), device, repeat)
        leaves = [p.detach().requires_grad_() for p in params]
        xg = x.detach().requires_grad_()

        def fwd_bwd():
            torch.autograd.grad((fn(xg, r, *leaves) * g).sum(), [xg, *leaves])

        fb = median_seconds(fwd_bwd, device, repeat)
        rows.append(dict(impl=name, fwd_ms=fwd * 1e3, fwd_tflops=flops / fwd / 1e12, fwd_floor_ms=floor * 1e3,
                         fwd_over_floor=fwd / floor, fwd_bwd_ms=fb * 1e3,
                         fwd_bwd_tflops=3 * flops / fb / 1e12, max_rel_diff_vs_ossrl=err))
    ours = rows[0]
    for row in rows:
        row["fwd_speedup_of_ossrl"] = row["fwd_ms"] / ours["fwd_ms"]
        row["fwd_bwd_speedup_of_ossrl"] = row["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts")
    p.add_argument("--hidden", type=int, help="H = I (default 2880 on GPU, 256 on CPU)")
    p.add_argument("--experts", type=int, nargs="*", help="expert counts (default 32 and 128; top-4)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--peers", default="grouped_mm,per-expert loop,transformers")
    p.add_argument("--json", help="write the rows here as JSON")
    a = p.parse_args()
    gpu = a.device == "cuda"
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if gpu else torch.float32)
    tokens = a.tokens or ([512, 4096, 16384, 65536] if gpu else [256, 1024])
    hidden = a.hidden or (2880 if gpu else 256)
    experts = a.experts or [32, 128]
    repeat = a.repeat or (20 if gpu else 5)
    peers = [s.strip() for s in a.peers.split(",") if s.strip()]
    if "transformers" in peers and not transformers_available(
            "transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts", "the transformers rows"):
        peers.remove("transformers")

    header = (f"ossrl {ossrl.__version__} | torch {torch.__version__} | "
              f"{torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()} "
              f"({torch.get_num_threads()} threads) | {dtype} | H=I={hidden}, top-4")
    print(header)
    print(f"{'E':>4} {'T':>6} {'impl':<16} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}"
          f" {'ours x fwd':>10} {'ours x f+b':>10} {'rel diff':>9} {'fwd/floor':>9}")
    results = []
    for E in experts:
        for T in tokens:
            try:
                rows = bench_case(T, hidden, hidden, E, 4, dtype, a.device, repeat, peers)
            except torch.OutOfMemoryError:
                print(f"{E:>4} {T:>6} out of memory, skipped")
                torch.cuda.empty_cache()
                continue
            for row in rows:
                row.update(E=E, T=T, H=hidden, I=hidden, k=4, dtype=str(dtype), device=a.device)
                print(f"{E:>4} {T:>6} {row['impl']:<16} {row['fwd_ms']:>9.2f} {row['fwd_tflops']:>8.3f}"
                      f" {row['fwd_bwd_ms']:>11.2f} {row['fwd_bwd_tflops']:>8.3f}"
                      f" {row['fwd_speedup_of_ossrl']:>10.2f} {row['fwd_bwd_speedup_of_ossrl']:>10.2f}"
                      f" {row['max_rel_diff_vs_ossrl']:>9.1e} {row['fwd_over_floor']:>9.2f}")
            results.extend(rows)
    print("ours x: peer time / ossrl time (> 1 means ossrl is faster). fwd/floor: forward time over"
          " max(flops / torch matmul rate, bytes / torch copy bandwidth), both measured here:")
    matmul, copy = rates(a.device, dtype)
    print(f"  torch matmul {matmul / 1e12:.2f} TFLOP/s, copy {copy / 1e9:.1f} GB/s ({dtype}).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(header=header, rows=results, torch_matmul_flops=matmul, torch_copy_bytes_per_s=copy),
                      f, indent=1)


if __name__ == "__main__":
    main()
