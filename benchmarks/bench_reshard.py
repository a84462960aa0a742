"""Weight sync, training layout -> rollout layout: ours vs the naive path vs a per-tensor loop.

One run, the same weights for every method: GPT-OSS-20b-shaped layers (hidden 2880, 64 query
and 8 key/value heads of 64, 32 experts of intermediate size 2880, vocabulary 201088), scaled
down by --scale (default 8 on the CPU, 1 on a GPU) and cut to --layers layers.

Training layout (fp32 by default, per-parameter tensors, FSDP2-style Shard(0) DTensors when run
under torchrun): q, k, v, o and their biases, sinks, router, separate expert gate and up
projections (E, H, I), down (E, I, H), norms, embedding and lm_head.
Rollout layout (bf16): fused qkv (concatenation), interleaved expert gate_up (E, H, 2I) with
gate at ::2, expert down transposed to (E, H, I), everything else cast; sinks kept fp32 (an
identity). With --tp, each rank keeps its tensor-parallel slice of attention and experts.

Methods:
  ours       ossrl.reshard plan.sync(): one fused multi_tensor_copy_ (one process), or bucketed
             all-gathers with two buffers in flight (several processes)
  naive      state_dict() + full_tensor() + build the rollout tensors (cat / interleave /
             transpose / cast) + load_state_dict()
  copy_loop  per tensor: (full_tensor() then) dst_view.copy_(src_view), one call per pair
  cast_copy  reference: contiguous copies with the same element counts and (source, destination)
             dtypes as the sync: the same reads and writes without any layout change
  d2d        reference: a plain contiguous copy of the destination bytes (device-to-device
             copy bandwidth; "of d2d" = a method's GB/s as a share of it)
References are timed on at most 2^28 elements per dtype pair and scaled to the full byte count.

GB/s = bytes of the rollout tensors written / seconds, the same byte count for every method.
Peak extra memory: measured with torch.cuda.max_memory_allocated on a GPU; on the CPU counted
(bytes of the buffers and tensors each method allocates and holds at once).

  python benchmarks/bench_reshard.py [--layers N] [--scale S] [--iters N] [--json out.json]
  torchrun --nproc-per-node 2 benchmarks/bench_reshard.py [--tp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn

from ossrl import reshard as R

# GPT-OSS-20b
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, INTER, VOCAB, LAYERS = 2880, 64, 8, 64, 32, 2880, 201088, 24


def shapes(scale: int, layers: int) -> dict:
    h = HIDDEN // scale
    nq = max(1, HEADS // scale)
    nkv = max(1, KV_HEADS // scale)
    i = INTER // scale
    e = EXPERTS
    v = VOCAB // scale
    return dict(h=h, nq=nq, nkv=nkv, d=HEAD_DIM, i=i, e=e, v=v, layers=layers)


def train_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, q, kv, i, e = c["h"], c["nq"] * c["d"], c["nkv"] * c["d"], c["i"], c["e"]
    out = {"embed": (c["v"], h), "lm_head": (c["v"], h), "norm": (h,)}
    for layer in range(c["layers"]):
        p = f"l{layer}_"
        out.update(
            {
                p + "q": (q, h), p + "k": (kv, h), p + "v": (kv, h),
                p + "q_b": (q,), p + "k_b": (kv,), p + "v_b": (kv,),
                p + "o": (h, q), p + "o_b": (h,), p + "sinks": (c["nq"],),
                p + "router": (e, h), p + "router_b": (e,),
                p + "gate": (e, h, i), p + "up": (e, h, i), p + "gate_b": (e, i), p + "up_b": (e, i),
                p + "down": (e, i, h), p + "down_b": (e, h),
                p + "norm1": (h,), p + "norm2": (h,),
            }
        )  # fmt: skip
    return out


def rollout(c: dict, tp_rank: int, tp_world: int, tp: bool, dtype=torch.bfloat16):
    """Mappings and rollout tensor shapes/dtypes."""
    h, q, kv, i, e = c["h"], c["nq"] * c["d"], c["nkv"] * c["d"], c["i"], c["e"]
    w = tp_world if tp else 1
    t0 = R.TensorParallel(0, tp_rank, tp_world) if tp else None
    tl = R.TensorParallel(-1, tp_rank, tp_world) if tp else None
    maps = [R.cast("embed", "embed"), R.cast("lm_head", "lm_head"), R.cast("norm", "norm")]
    dst = {"embed": ((c["v"], h), dtype), "lm_head": ((c["v"], h), dtype), "norm": ((h,), dtype)}
    for layer in range(c["layers"]):
        p = f"l{layer}_"
        maps += [
            R.concat(p + "qkv", [p + "q", p + "k", p + "v"], 0, tp=t0),
            R.concat(p + "qkv_b", [p + "q_b", p + "k_b", p + "v_b"], 0, tp=t0),
            R.tp_slice(p + "o", p + "o", 1, tp_rank, tp_world) if tp else R.cast(p + "o", p + "o"),
            R.cast(p + "o_b", p + "o_b"),
            R.identity(p + "sinks", p + "sinks", tp=t0),
            R.cast(p + "router", p + "router"),
            R.cast(p + "router_b", p + "router_b"),
            R.interleave(p + "gate_up", [p + "gate", p + "up"], -1, tp=tl),
            R.interleave(p + "gate_up_b", [p + "gate_b", p + "up_b"], -1, tp=tl),
            R.transpose(p + "down_t", p + "down", 1, 2, tp=R.TensorParallel(1, tp_rank, tp_world) if tp else None),
            R.cast(p + "down_b", p + "down_b"),
            R.cast(p + "norm1", p + "norm1"),
            R.cast(p + "norm2", p + "norm2"),
        ]
        dst.update(
            {
                p + "qkv": (((q + 2 * kv) // w, h), dtype), p + "qkv_b": (((q + 2 * kv) // w,), dtype),
                p + "o": ((h, q // w), dtype), p + "o_b": ((h,), dtype),
                p + "sinks": ((c["nq"] // w,), torch.float32),
                p + "router": ((e, h), dtype), p + "router_b": ((e,), dtype),
                p + "gate_up": ((e, h, 2 * i // w), dtype), p + "gate_up_b": ((e, 2 * i // w), dtype),
                p + "down_t": ((e, h, i // w), dtype), p + "down_b": ((e, h), dtype),
                p + "norm1": ((h,), dtype), p + "norm2": ((h,), dtype),
            }
        )  # fmt: skip
    return maps, dst


class Flat(nn.Module):
    """A module holding named tensors as parameters (training) or buffers (rollout)."""

    def __init__(self, tensors: dict[str, torch.Tensor], params: bool):
        super().__init__()
        for n, t in tensors.items():
            if params:
                self.register_parameter(n, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(n, t)


def naive_tensor(m: R.Mapping, full: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """What frameworks do today: materialise the rollout tensor from full parameters."""
    srcs = [full[n] for n in m.srcs]
    if m.tp is not None:
        srcs = [s.chunk(m.tp.world, m.tp.dim)[m.tp.rank] for s in srcs]
    if m.kind in ("identity", "cast", "slice"):
        out = srcs[0]
    elif m.kind == "concat":
        out = torch.cat(srcs, m.dim)
    elif m.kind == "interleave":
        out = torch.stack(srcs, m.dim if m.dim < 0 else m.dim + 1).flatten(m.dim - 1 if m.dim < 0 else m.dim, m.dim if m.dim < 0 else m.dim + 1)
    elif m.kind == "transpose":
        out = srcs[0].transpose(*m.dims).contiguous()
    else:
        raise ValueError(m.kind)
    return out.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="layers (default 2 on CPU, 4 on GPU: 24 full-size layers with an fp32 copy do not fit one GPU)")
    ap.add_argument("--scale", type=int, default=None, help="divide hidden/heads/intermediate/vocab by this (default 8 on CPU, 1 on GPU)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--train-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--bucket-mb", type=float, default=None, help="gather bucket size in MiB (default 256 on GPU, 32 on CPU)")
    ap.add_argument("--tp", action="store_true", help="rollout keeps a tensor-parallel slice per rank")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (naive,copy_loop)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    mesh = None
    if distributed:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh(device.type, (world,))
    gpu = device.type == "cuda"
    layers = args.layers if args.layers is not None else (4 if gpu else 2)
    scale = args.scale if args.scale is not None else (1 if gpu else 8)
    bucket = int((args.bucket_mb if args.bucket_mb is not None else (256 if gpu else 32)) * (1 << 20))
    train_dtype = getattr(torch, args.train_dtype)
    c = shapes(scale, layers)
    skip = set(filter(None, args.skip.split(",")))

    # ---- the same weights for every method ----
    g = torch.Generator(device=device).manual_seed(0)
    full = {}
    for n, s in train_shapes(c).items():
        full[n] = torch.randn(s, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(train_dtype)
    if distributed:
        from torch.distributed.tensor import Shard, distribute_tensor

        sources = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
        del full
    else:
        sources = full
    train = Flat(sources, params=True)
    maps, dst_spec = rollout(c, rank, world, args.tp and distributed)
    roll = Flat({n: torch.zeros(s, dtype=dt, device=device) for n, (s, dt) in dst_spec.items()}, params=False)
    dsts = dict(roll.named_buffers())
    dst_bytes = sum(t.numel() * t.element_size() for t in dsts.values())
    src_bytes = sum(p.numel() * p.element_size() for p in train.parameters())
    ptrs = {n: t.data_ptr() for n, t in dsts.items()}

    def sync_device():
        if gpu:
            torch.cuda.synchronize(device)

    def barrier():
        if distributed:
            import torch.distributed as dist

            dist.barrier()

    def timed(fn) -> tuple[float, int, dict]:
        """median seconds (max over ranks), peak extra bytes, last extra info"""
        times, peaks, info = [], [], {}
        for it in range(args.warmup + args.iters):
            barrier()
            sync_device()
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            counted, info = fn()
            sync_device()
            dt = time.perf_counter() - t0
            if gpu:
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                peak = counted
            if it >= args.warmup:
                times.append(dt)
                peaks.append(peak)
        sec = statistics.median(times)
        if distributed:
            import torch.distributed as dist

            tt = torch.tensor([sec, float(max(peaks))], dtype=torch.float64, device=device if gpu else "cpu")
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            sec, pk = float(tt[0]), int(tt[1])
        else:
            pk = max(peaks)
        return sec, pk, info

    results = []

    # ours
    plan = R.build_plan(maps, train, roll, bucket_bytes=bucket)

    def ours():
        st = plan.sync()
        return st.peak_extra_bytes, {"collectives": st.collectives, "buckets": st.buckets, "skipped": st.skipped}

    sec, pk, info = timed(ours)
    results.append(dict(method="ours", seconds=sec, peak_extra_bytes=pk, **info))
    ours_out = {n: t.clone() for n, t in dsts.items()} if not gpu or dst_bytes < (8 << 30) else None

    def full_params():
        out, extra = {}, 0
        for n, p in train.named_parameters():
            if distributed:
                out[n] = p.full_tensor()
                extra += out[n].numel() * out[n].element_size()
            else:
                out[n] = p.detach()
        return out, extra

    if "naive" not in skip:
        dst_dtype = {n: t.dtype for n, t in dsts.items()}

        def naive():
            sd = train.state_dict()
            fulls, extra = {}, 0
            for n, p in sd.items():
                if distributed:
                    fulls[n] = p.full_tensor()
                    extra += fulls[n].numel() * fulls[n].element_size()
                else:
                    fulls[n] = p
            new = {}
            held = {f.data_ptr() for f in fulls.values()}
            for m in maps:
                t = naive_tensor(m, fulls, dst_dtype[m.dst])
                if t.data_ptr() not in held:  # a new tensor, not a parameter passed through
                    extra += t.numel() * t.element_size()
                new[m.dst] = t
            roll.load_state_dict(new)
            return extra, {"collectives": len(sd) if distributed else 0}

        sec, pk, info = timed(naive)
        results.append(dict(method="naive", seconds=sec, peak_extra_bytes=pk, **info))

    if "copy_loop" not in skip:

        def copy_loop():
            peak = 0
            with torch.no_grad():
                if distributed:
                    # one parameter at a time: gather it, copy its uses, drop it
                    by_src: dict[str, list[R.Mapping]] = {}
                    for m in maps:
                        for s in m.srcs:
                            by_src.setdefault(s, []).append(m)
                    params = dict(train.named_parameters())
                    for n in by_src:
                        f = params[n].full_tensor()
                        peak = max(peak, f.numel() * f.element_size())
                        for d, s in plan.copy_pairs({n: f}):
                            d.copy_(s)
                else:
                    for d, s in local_pairs:
                        d.copy_(s)
            return peak, {"collectives": len(src_names) if distributed else 0}

        src_names = sorted({s for m in maps for s in m.srcs})
        local_pairs = [] if distributed else [(d, s) for d, s in plan.copy_pairs() if d.data_ptr() != s.data_ptr()]
        sec, pk, info = timed(copy_loop)
        results.append(dict(method="copy_loop", seconds=sec, peak_extra_bytes=pk, **info))

    # correctness: every method wrote the same bits
    if ours_out is not None:
        for n, t in dsts.items():
            assert torch.equal(t, ours_out[n]), f"methods disagree on {n}"
    assert {n: t.data_ptr() for n, t in dsts.items()} == ptrs, "a rollout tensor moved"

    # references, timed on at most REF_ELEMS elements per dtype pair and scaled to the same bytes:
    #   cast_copy: contiguous copies with the same (source, destination) dtypes as the sync
    #   d2d:       a plain contiguous copy of the destination bytes (device-to-device bandwidth)
    REF_ELEMS = 1 << 28
    per_pair: dict[tuple, int] = {}
    for d in dsts.values():
        per_pair[(train_dtype, d.dtype)] = per_pair.get((train_dtype, d.dtype), 0) + d.numel()
    for name, pairs in (
        ("cast_copy", per_pair),
        ("d2d", {(torch.uint8, torch.uint8): dst_bytes}),
    ):
        bufs = [
            (torch.empty(min(n, REF_ELEMS), dtype=sd, device=device), torch.empty(min(n, REF_ELEMS), dtype=dd, device=device))
            for (sd, dd), n in pairs.items()
        ]
        for src_buf, _ in bufs:
            src_buf.random_(0, 100) if src_buf.dtype == torch.uint8 else src_buf.normal_()
        frac = sum(d.numel() * d.element_size() for _, d in bufs) / dst_bytes  # share of the bytes timed

        def ref(bufs=bufs):
            for s_, d_ in bufs:
                d_.copy_(s_)
            return 0, {}

        sec, _, _ = timed(ref)
        results.append(dict(method=name, seconds=sec / frac, peak_extra_bytes=0, scaled_from_bytes=int(frac * dst_bytes)))
        del bufs

    naive_sec = next((r["seconds"] for r in results if r["method"] == "naive"), None)
    d2d_sec = next(r["seconds"] for r in results if r["method"] == "d2d")
    cast_sec = next(r["seconds"] for r in results if r["method"] == "cast_copy")
    for r in results:
        r["gbps"] = dst_bytes / r["seconds"] / 1e9
        r["vs_naive"] = naive_sec / r["seconds"] if naive_sec else None
        r["vs_d2d"] = d2d_sec / r["seconds"]
        r["vs_cast_copy"] = cast_sec / r["seconds"]

    dev_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    report = dict(
        device=dev_name,
        world=world,
        tp=bool(args.tp and distributed),
        layers=layers,
        scale=scale,
        train_dtype=args.train_dtype,
        rollout_dtype="bfloat16",
        source_bytes=src_bytes,
        rollout_bytes_per_rank=dst_bytes,
        bucket_bytes=bucket if distributed else None,
        peak_extra_measured=gpu,
        torch=torch.__version__,
        results=results,
    )
    if rank == 0:
        print(
            f"reshard: {dev_name}, world {world}{' (tp)' if report['tp'] else ''}, {layers} GPT-OSS-20b layers / {scale}, "
            f"train {args.train_dtype} -> rollout bf16, {dst_bytes / 1e6:.1f} MB written per rank"
        )
        peak_kind = "measured" if gpu else "counted"
        print(
            f"{'method':<10} {'seconds':>10} {'GB/s':>9} {'peak extra MB (' + peak_kind + ')':>28} {'vs naive':>9} "
            f"{'of d2d':>8} {'of cast':>8} {'collectives':>12}"
        )
        for r in results:
            vn = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
            print(
                f"{r['method']:<10} {r['seconds']:>10.5f} {r['gbps']:>9.2f} {r['peak_extra_bytes'] / 1e6:>28.2f} "
                f"{vn:>9} {r['vs_d2d'] * 100:>7.1f}% {r['vs_cast_copy'] * 100:>7.1f}% {str(r.get('collectives', '-')):>12}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.json}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
