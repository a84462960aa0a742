"""Attention benchmark: ossrl's varlen/paged attention against what people use today, one run.

Every implementation gets the same packed inputs (GPT-OSS heads by default: Hq=64, Hkv=8, D=64,
sliding window 128 or full causal, learned sinks), forward and forward+backward; then a decode
step (one query per sequence against a KV cache of mixed lengths). Peers:

- ``ossrl``: ossrl.ops.varlen_attention / paged_attention (sinks native).
- ``torch varlen_attn``: torch.nn.attention.varlen (FlashAttention inside PyTorch; CUDA only).
- ``FlexAttention``: document + causal + sliding-window block mask (compiled).
- ``FlashAttention``: flash_attn.flash_attn_varlen_func, if installed.
- ``SDPA padded``: F.scaled_dot_product_attention on a padded batch with a boolean mask
  (on the CPU: SDPA's CPU kernels).
- ``HF eager``: transformers' GPT-OSS eager_attention_forward, one sequence at a time (sinks
  native; quadratic memory, so skipped for sequences too long for --eager-max-gib).

Peers without sinks are timed twice: without sinks against ossrl without sinks (like for like),
and with the sinks emulated against ossrl with sinks: by renormalising with the peer's
log-sum-exp, out * sigmoid(lse - sink) ("lse renorm"), or for SDPA by one extra key whose score is
the sink and whose value is zero ("extra key"). The table says which. TFLOP/s count the unmasked
work only (4 * D * Hq per visible query-key pair forward, 2.5x that backward).

    python benchmarks/bench_attention.py                  # GPU if present, else scaled-down CPU
    python benchmarks/bench_attention.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

import ossrl
from ossrl.ops import paged_attention, paged_kv_append, varlen_attention
from _floor import floor_seconds  # noqa: E402  (benchmarks/, beside this script)
from _peers import transformers_available  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- inputs -----------------------------------------------------------------------------------


def mixed_lengths(total: int, max_len: int, seed: int) -> list[int]:
    """Packed sequences of mixed lengths summing to total (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    lo = min(128, max_len)
    while left > 0:
        n = int(torch.randint(lo, max_len + 1, (1,), generator=g))
        n = min(n, left)
        lens.append(n)
        left -= n
    return lens


def visible_pairs(lens_q, lens_k, window) -> int:
    total = 0
    for lq, lk in zip(lens_q, lens_k):
        for i in range(lq):
            p = i + lk - lq
            hi = min(lk, p + 1)
            lo = max(0, p - window + 1) if window else 0
            total += max(0, hi - lo)
    return total


def cu_of(lens, device):
    c = [0]
    for n in lens:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


# ---- timing -----------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, repeat) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Unavailable(Exception):
    pass


# ---- peers: each returns a callable out = f(q, k, v, sinks) on the packed layout -------------------
# q (T, Hq, D), k/v (T, Hkv, D); sinks (Hq,) fp32 or None.


def renorm_with_sinks(out, lse_ht, sinks):
    """out (T, H, D), lse (H, T) natural log: fold exp(sink) into the denominator."""
    w = torch.sigmoid(lse_ht.float() - sinks.float()[:, None]).transpose(0, 1)[..., None]
    return (out.float() * w).to(out.dtype)


def peer_ossrl(ctx):
    def f(q, k, v, sinks):
        return varlen_attention(q, k, v, ctx.cu, ctx.cu, ctx.max_len, ctx.max_len, window=ctx.window, sinks=sinks)

    return f, "native"


def peer_varlen_attn(ctx, with_sinks):
    if ctx.device.type != "cuda":
        raise Unavailable("CUDA only")
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    ws = (ctx.window - 1, 0) if ctx.window else (-1, 0)

    def f(q, k, v, sinks):
        if sinks is None:
            return varlen_attn(q, k, v, ctx.cu, ctx.cu, ctx.max_len, ctx.max_len, window_size=ws, enable_gqa=True)
        out, lse = varlen_attn(q, k, v, ctx.cu, ctx.cu, ctx.max_len, ctx.max_len, window_size=ws, enable_gqa=True,
                               return_aux=AuxRequest(lse=True))
        return renorm_with_sinks(out, lse, sinks)

    return f, "lse renorm" if with_sinks else "none"


def peer_flash_attn(ctx, with_sinks):
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"flash_attn not importable ({type(e).__name__})")
    if ctx.device.type != "cuda":
        raise Unavailable("CUDA only")
    ws = (ctx.window - 1, 0) if ctx.window else (-1, -1)

    def f(q, k, v, sinks):
        r = flash_attn_varlen_func(q, k, v, ctx.cu, ctx.cu, ctx.max_len, ctx.max_len, causal=True, window_size=ws,
                                   return_attn_probs=sinks is not None)
        if sinks is None:
            return r
        return renorm_with_sinks(r[0], r[1], sinks)

    return f, "lse renorm (no lse grad)" if with_sinks else "none"


def peer_flex(ctx, with_sinks):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if ctx.device.type == "cpu" and (with_sinks or ctx.backward):
        raise Unavailable("CPU: inference only, no lse")
    doc = torch.repeat_interleave(torch.arange(len(ctx.lens), device=ctx.device),
                                  torch.tensor(ctx.lens, device=ctx.device))
    window = ctx.window

    def mask_mod(b, h, qi, ki):
        m = (doc[qi] == doc[ki]) & (qi >= ki)
        if window:
            m = m & (qi - ki < window)
        return m

    T = sum(ctx.lens)
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=ctx.device)
    flex = torch.compile(flex_attention, dynamic=False)

    def f(q, k, v, sinks):
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
        if sinks is None:
            out = flex(qh, kh, vh, block_mask=block_mask, enable_gqa=True)
            return out[0].transpose(0, 1)
        out, lse = flex(qh, kh, vh, block_mask=block_mask, enable_gqa=True, return_lse=True)
        return renorm_with_sinks(out[0].transpose(0, 1), lse[0], sinks)

    return f, "lse renorm" if with_sinks else "none"


def sdpa_with_extra_key(q, k, v, mask, sinks, scale):
    """SDPA (B, H, L, D) with sinks as one extra key (score = sink, value = 0) in front."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    Dp = (D + 1 + 7) // 8 * 8  # head dims of the fused kernels must be multiples of 8
    qa = torch.cat([q, (sinks.to(q.dtype) / scale)[None, :, None, None].expand(B, Hq, L, 1),
                    q.new_zeros(B, Hq, L, Dp - D - 1)], -1)
    key0 = k.new_zeros(B, Hkv, 1, Dp)
    key0[..., D] = 1
    ka = torch.cat([key0, torch.cat([k, k.new_zeros(B, Hkv, k.shape[2], Dp - D)], -1)], 2)
    va = torch.cat([v.new_zeros(B, Hkv, 1, D), v], 2)
    ma = torch.cat([mask.new_ones(B, 1, mask.shape[2], 1), mask], -1)
    return F.scaled_dot_product_attention(qa, ka, va, attn_mask=ma, scale=scale, enable_gqa=True)


def peer_sdpa(ctx, with_sinks):
    lens, Lmax, B = ctx.lens, ctx.max_len, len(ctx.lens)
    idx = torch.cat([b * Lmax + torch.arange(n) for b, n in enumerate(lens)]).to(ctx.device)
    i = torch.arange(Lmax, device=ctx.device)
    vis = i[None, :] <= i[:, None]
    if ctx.window:
        vis &= i[:, None] - i[None, :] < ctx.window
    valid = i[None, :] < torch.tensor(lens, device=ctx.device)[:, None]  # (B, L)
    mask = vis[None] & valid[:, None, :]
    mask[:, :, 0] |= ~valid  # padded query rows see key 0, so that no row is empty
    mask = mask[:, None]  # (B, 1, L, L)
    scale = ctx.D**-0.5

    def pad(t):
        out = t.new_zeros(B * Lmax, *t.shape[1:])
        out = out.index_copy(0, idx, t)
        return out.view(B, Lmax, *t.shape[1:]).transpose(1, 2)

    def f(q, k, v, sinks):
        qp, kp, vp = pad(q), pad(k), pad(v)
        if sinks is None:
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        else:
            out = sdpa_with_extra_key(qp, kp, vp, mask, sinks, scale)
        return out.transpose(1, 2).reshape(B * Lmax, ctx.Hq, ctx.D).index_select(0, idx)

    return f, "extra key" if with_sinks else "none"


def peer_eager(ctx, with_sinks):
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"transformers GPT-OSS not importable ({type(e).__name__})")
    elem = torch.finfo(ctx.dtype).bits // 8
    need = max(ctx.lens) ** 2 * ctx.Hq * elem * 6 / 2**30
    if need > ctx.eager_max_gib:
        raise Unavailable(f"quadratic memory: ~{need:.0f} GiB for the longest sequence")
    c = ctx.cu.tolist()
    masks = []
    for n in ctx.lens:
        i = torch.arange(n, device=ctx.device)
        vis = i[None, :] <= i[:, None]
        if ctx.window:
            vis &= i[:, None] - i[None, :] < ctx.window
        masks.append(torch.zeros(1, 1, n, n, device=ctx.device, dtype=ctx.dtype).masked_fill(~vis, -math.inf))

    def f(q, k, v, sinks):
        s = sinks if sinks is not None else torch.full((ctx.Hq,), -math.inf, device=q.device)
        module = types.SimpleNamespace(num_key_value_groups=ctx.Hq // ctx.Hkv, sinks=s.to(q.dtype), training=False)
        outs = []
        for b in range(len(ctx.lens)):
            sl = slice(c[b], c[b + 1])
            o, _ = eager_attention_forward(module, q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                           v[sl].transpose(0, 1)[None], masks[b], ctx.D**-0.5)
            outs.append(o[0])
        return torch.cat(outs)

    return f, "native"


PEERS = {
    "ossrl": lambda ctx, s: peer_ossrl(ctx),
    "torch varlen_attn": peer_varlen_attn,
    "FlexAttention": peer_flex,
    "FlashAttention": peer_flash_attn,
    "SDPA padded": peer_sdpa,
    "HF eager": peer_eager,
}


# ---- prefill / training ---------------------------------------------------------------------------


def run_packed(args, device, dtype, total, window, records):
    max_len = min(total, args.max_len)
    lens = mixed_lengths(total, max_len, seed=total)
    ctx = types.SimpleNamespace(device=device, dtype=dtype, lens=lens, cu=cu_of(lens, device), max_len=max(lens),
                                window=window, Hq=args.heads, Hkv=args.kv_heads, D=args.head_dim, backward=False,
                                eager_max_gib=args.eager_max_gib)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, args.heads, args.head_dim, generator=g).to(device, dtype)
    k = torch.randn(total, args.kv_heads, args.head_dim, generator=g).to(device, dtype)
    v = torch.randn(total, args.kv_heads, args.head_dim, generator=g).to(device, dtype)
    sinks = torch.randn(args.heads, generator=g).to(device)
    grad = torch.randn(q.shape, generator=g).to(device, dtype)
    pairs = visible_pairs(lens, lens, window)
    fwd_flop = 4 * args.head_dim * args.heads * pairs
    # The forward's least traffic: q, k and v read once, out written once.
    fwd_bytes = q.element_size() * (2 * q.numel() + k.numel() + v.numel())
    fwd_floor_ms = floor_seconds(fwd_flop, fwd_bytes, device.type, dtype) * 1e3
    mask_name = f"window {window}" if window else "causal"
    print(f"\n== {total} tokens in {len(lens)} sequences (longest {max(lens)}), {mask_name}, "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}")
    for with_sinks in (True, False):
        s = sinks if with_sinks else None
        ours_ms = {}
        rows = []
        ours_out = None
        for name in args.peers:
            row = dict(section="packed", tokens=total, sequences=len(lens), mask=mask_name, sinks=with_sinks,
                       peer=name)
            try:
                ctx.backward = False
                f, how = PEERS[name](ctx, with_sinks)
                row["sinks_how"] = how if with_sinks else "none"
                with torch.no_grad():
                    out = f(q, k, v, s)
                    if name == "ossrl":
                        ours_out = out
                    elif ours_out is not None:
                        row["max_abs_diff"] = (out.float() - ours_out.float()).abs().max().item()
                    row["fwd_ms"] = time_ms(lambda: f(q, k, v, s), device, args.warmup, args.repeat)
                row["fwd_tflops"] = fwd_flop / row["fwd_ms"] / 1e9
                row["fwd_over_floor"] = row["fwd_ms"] / fwd_floor_ms
                if not args.no_backward:
                    try:
                        ctx.backward = True
                        f, _ = PEERS[name](ctx, with_sinks)
                        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                        sg = s.detach().clone().requires_grad_(True) if s is not None else None

                        def step():
                            for t in (qg, kg, vg, sg):
                                if t is not None:
                                    t.grad = None
                            f(qg, kg, vg, sg).backward(grad)

                        row["fwdbwd_ms"] = time_ms(step, device, args.warmup, args.repeat)
                        row["fwdbwd_tflops"] = 3.5 * fwd_flop / row["fwdbwd_ms"] / 1e9
                    except Unavailable as e:
                        row["fwdbwd_note"] = str(e)
            except Unavailable as e:
                row["note"] = str(e)
            except Exception as e:  # noqa: BLE001  (a peer failing must not stop the run)
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if name == "ossrl":
                ours_ms = row
            rows.append(row)
        for row in rows:
            for key in ("fwd_ms", "fwdbwd_ms"):
                if key in row and key in ours_ms:
                    row[key.replace("_ms", "_speedup_of_ossrl")] = row[key] / ours_ms[key]
        print_table(rows, with_sinks)
        records.extend(rows)


def fmt(x, spec):
    if x is not None:
        return format(x, spec)
    width = spec.split(".")[0]
    return format("-", ">" + width) if width.isdigit() else "-"


def print_table(rows, with_sinks):
    print(f"-- sinks: {'yes' if with_sinks else 'no'}")
    head = (f"{'peer':<18} {'sinks':<24} {'fwd ms':>9} {'TFLOP/s':>8} {'x ossrl':>8} "
            f"{'f+b ms':>9} {'TFLOP/s':>8} {'x ossrl':>8} {'max|diff|':>9} {'fwd/floor':>9}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['peer']:<18} {r.get('sinks_how', '-'):<24} {fmt(r.get('fwd_ms'), '9.2f')} "
              f"{fmt(r.get('fwd_tflops'), '8.3g')} {fmt(r.get('fwd_speedup_of_ossrl'), '8.2f')} "
              f"{fmt(r.get('fwdbwd_ms'), '9.2f')} {fmt(r.get('fwdbwd_tflops'), '8.3g')} "
              f"{fmt(r.get('fwdbwd_speedup_of_ossrl'), '8.2f')} {fmt(r.get('max_abs_diff'), '9.2e')} "
              f"{fmt(r.get('fwd_over_floor'), '9.2f')}  "
              f"{r.get('note', r.get('fwdbwd_note', ''))}")
    print("(x ossrl: the peer's time over ossrl's; above 1 means ossrl is faster. fwd/floor: the forward's time over"
          " max(flops / torch matmul rate, bytes / torch copy bandwidth), both measured here: benchmarks/_floor.py)")


# ---- decode -------------------------------------------------------------------------------------


def run_decode(args, device, dtype, batch, max_ctx, window, records):
    g = torch.Generator().manual_seed(1)
    lens = [int(x) for x in torch.randint(max(1, max_ctx // 16), max_ctx + 1, (batch,), generator=g)]
    Hq, Hkv, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    k = torch.randn(sum(lens), Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(sum(lens), Hkv, D, generator=g).to(device, dtype)
    q = torch.randn(batch, Hq, D, generator=g).to(device, dtype)
    sinks = torch.randn(Hq, generator=g).to(device)
    cu_k = cu_of(lens, device)
    nblk = [-(-n // bs) for n in lens]
    max_blocks = max(nblk)
    perm = torch.randperm(sum(nblk), generator=g).to(torch.int32)
    bt = torch.zeros(batch, max_blocks, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[i: i + n]
        i += n
    bt = bt.to(device)
    kc = torch.zeros(sum(nblk), bs, Hkv, D, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    paged_kv_append(kc, vc, k, v, bt, cu_k, torch.zeros_like(seq_lens))
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    mask_name = f"window {window}" if window else "causal"
    print(f"\n== decode: {batch} sequences, context {min(lens)}..{max(lens)} (paged, block {bs}), {mask_name}")
    rows = []
    ours = {}
    for with_sinks in (True, False):
        s = sinks if with_sinks else None

        def f_ossrl():
            return paged_attention(q, kc, vc, bt, cu_q, seq_lens, 1, max(lens), window=window, sinks=s)

        # Peers that take a contiguous padded cache (B, H, L, D).
        Lmax = max(lens)
        kp = torch.zeros(batch, Lmax, Hkv, D, device=device, dtype=dtype)
        vp = torch.zeros_like(kp)
        c = cu_k.tolist()
        for b, n in enumerate(lens):
            kp[b, :n] = k[c[b]: c[b + 1]]
            vp[b, :n] = v[c[b]: c[b + 1]]
        kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)
        j = torch.arange(Lmax, device=device)
        L = torch.tensor(lens, device=device)[:, None]
        vis = j[None] < L
        if window:
            vis &= j[None] > L - 1 - window
        mask = vis[:, None, None, :]  # (B, 1, 1, L)

        def f_sdpa():
            qh = q[:, :, None]
            if s is None:
                out = F.scaled_dot_product_attention(qh, kp, vp, attn_mask=mask, enable_gqa=True)
            else:
                out = sdpa_with_extra_key(qh, kp, vp, mask, s, D**-0.5)
            return out[:, :, 0]

        peers = [("ossrl", f_ossrl, "native"), ("SDPA padded", f_sdpa, "extra key" if with_sinks else "none")]
        if device.type == "cuda":
            def f_varlen():
                from torch.nn.attention.varlen import AuxRequest, varlen_attn
                ws = (window - 1, 0) if window else (-1, 0)
                kw = dict(window_size=ws, enable_gqa=True, seqused_k=seq_lens, block_table=bt)
                if s is None:
                    return varlen_attn(q, kc, vc, cu_q, None, 1, Lmax, **kw)
                out, lse = varlen_attn(q, kc, vc, cu_q, None, 1, Lmax, return_aux=AuxRequest(lse=True), **kw)
                return renorm_with_sinks(out, lse, s)

            peers.append(("torch varlen_attn", f_varlen, "lse renorm" if with_sinks else "none"))
        ref = None
        group = []
        for name, fn, how in peers:
            row = dict(section="decode", batch=batch, mask=mask_name, sinks=with_sinks, peer=name, sinks_how=how)
            try:
                with torch.no_grad():
                    out = fn()
                    if ref is None:
                        ref = out
                    else:
                        row["max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
                    row["ms"] = time_ms(fn, device, args.warmup, args.repeat)
                row["tokens_per_s"] = batch / row["ms"] * 1e3
            except Exception as e:  # noqa: BLE001
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            if name == "ossrl":
                ours = row
            elif "ms" in row and "ms" in ours:
                row["speedup_of_ossrl"] = row["ms"] / ours["ms"]
            group.append(row)
        print(f"-- sinks: {'yes' if with_sinks else 'no'}")
        print(f"{'peer':<18} {'sinks':<12} {'ms':>9} {'tokens/s':>11} {'x ossrl':>8} {'max|diff|':>9}  note")
        for r in group:
            print(f"{r['peer']:<18} {r['sinks_how']:<12} {fmt(r.get('ms'), '9.3f')} "
                  f"{fmt(r.get('tokens_per_s'), '11.0f')} {fmt(r.get('speedup_of_ossrl'), '8.2f')} "
                  f"{fmt(r.get('max_abs_diff'), '9.2e')}  {r.get('note', '')}")
        rows.extend(group)
    records.extend(rows)


# ---- main ----------------------------------------------------------------------------------------


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--tokens", default=None, help="comma-separated totals; default 8192..65536 GPU, 2048,4096 CPU")
    p.add_argument("--max-len", type=int, default=None, help="longest packed sequence (default 8192 GPU, 2048 CPU)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 64 GPU, 16 CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 8 GPU, 2 CPU)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--masks", default="window,causal", help="which of window,causal to run")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--decode-batch", type=int, default=None, help="default 64 GPU, 8 CPU")
    p.add_argument("--decode-context", type=int, default=None, help="longest context, default 16384 GPU, 4096 CPU")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--eager-max-gib", type=float, default=None, help="skip HF eager above this (default 16 GPU, 4 CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[args.dtype]
    tokens = [int(x) for x in (args.tokens or ("8192,16384,32768,65536" if on_gpu else "2048,4096")).split(",")]
    args.max_len = args.max_len or (8192 if on_gpu else 2048)
    args.heads = args.heads or (64 if on_gpu else 16)
    args.kv_heads = args.kv_heads or (8 if on_gpu else 2)
    args.decode_batch = args.decode_batch or (64 if on_gpu else 8)
    args.decode_context = args.decode_context or (16384 if on_gpu else 4096)
    args.eager_max_gib = args.eager_max_gib or (16 if on_gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.repeat = args.repeat or (20 if on_gpu else 3)
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for name in args.peers:
        if name not in PEERS:
            p.error(f"unknown peer {name!r}")
    if "ossrl" not in args.peers:
        args.peers.insert(0, "ossrl")
    if "HF eager" in args.peers and not transformers_available(
            "transformers.models.gpt_oss.modeling_gpt_oss", "eager_attention_forward", "the HF eager rows"):
        args.peers.remove("HF eager")
    masks = [m.strip() for m in args.masks.split(",")]

    meta = dict(device=torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, ossrl=ossrl.__version__, dtype=args.dtype,
                heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, window=args.window)
    print("ossrl attention benchmark:", ", ".join(f"{k}={v}" for k, v in meta.items()))
    records = []
    for total in tokens:
        for m in masks:
            run_packed(args, device, dtype, total, args.window if m == "window" else None, records)
    if not args.no_decode:
        for m in masks:
            run_decode(args, device, dtype, args.decode_batch, args.decode_context,
                       args.window if m == "window" else None, records)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=records), fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
