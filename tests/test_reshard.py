"""ossrl.ops.multi_tensor_copy_ and ossrl.reshard on the CPU (multi-process cases use gloo)."""

from __future__ import annotations


import pytest
import torch

import ossrl
from ossrl import reshard as R
from ossrl.ops import multi_tensor_copy_

from _ranks import run_ranks

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _values(shape, dtype, seed=0):
    """Random values with specials: large (overflow fp16), tiny (subnormal), +-inf, +-0."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
        flat = x.view(-1)
        specials = torch.tensor([1e6, -7e4, 1e-8, -3e-41, float("inf"), float("-inf"), 0.0, -0.0, 65519.0])
        k = min(flat.numel(), specials.numel())
        flat[:k] = specials[:k].double()
        return x.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def _sentinel(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.dtype.is_floating_point:
            t.fill_(-123.25)
        else:
            t.fill_(7)
    return t.clone()


# ---------------------------------------------------------------------------------------------
# multi_tensor_copy_
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("dst_dtype", FLOATS, ids=str)
def test_copy_casts_match_copy_strided(dst_dtype, src_dtype):
    src_base = _values((40, 70), src_dtype, seed=1)
    srcs = [src_base, src_base.t(), src_base[:, ::2], src_base[3:23, 5:60]]
    dsts, refs = [], []
    for s in srcs:
        d = torch.empty(s.shape[::-1], dtype=dst_dtype).t()  # a transposed destination
        dsts.append(d)
        refs.append(torch.empty(s.shape, dtype=dst_dtype).copy_(s))
    multi_tensor_copy_(dsts, srcs)
    for i, (d, r) in enumerate(zip(dsts, refs)):
        assert torch.equal(d, r), f"pair {i}: {src_dtype} -> {dst_dtype}"


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128], ids=str
)
def test_copy_same_dtype_any_type(dtype):
    s = _values((9, 10, 11), dtype, seed=2)
    dst_base = torch.zeros(11, 20, 9, dtype=dtype)
    d = dst_base[:, ::2, :].permute(2, 1, 0)  # strided and permuted
    multi_tensor_copy_([d], [s])
    assert torch.equal(d, s)
    assert torch.equal(dst_base[:, 1::2], torch.zeros_like(dst_base[:, 1::2]))


def test_copy_nan_stays_nan():
    s = torch.tensor([float("nan"), 1.0, float("nan")] * 40)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        d = torch.zeros(120, dtype=dt)
        multi_tensor_copy_([d], [s])
        assert torch.equal(torch.isnan(d), torch.isnan(s))


def test_copy_many_mixed_pairs_one_call():
    g = torch.Generator().manual_seed(3)
    dsts, srcs, refs = [], [], []
    # big enough that the parallel chunks split tensors, plus many small ones, empty and 0-dim
    shapes = [(300, 700), (3, 5, 7, 2, 3), (0, 4), (), (1,), (17,), (64, 1, 33)]
    for k, shape in enumerate(shapes * 3):
        st = FLOATS[k % 4]
        dt = FLOATS[(k // 4) % 4]
        s_full = torch.randn(shape, generator=g, dtype=torch.float64).to(st)
        s = s_full if len(shape) < 2 else s_full.transpose(0, -1).contiguous().transpose(0, -1)
        d = torch.empty(shape, dtype=dt)
        if len(shape) >= 2:
            d = torch.empty(tuple(reversed(shape)), dtype=dt).permute(*reversed(range(len(shape))))
        dsts.append(d)
        srcs.append(s)
        refs.append(torch.empty(shape, dtype=dt).copy_(s))
    multi_tensor_copy_(dsts, srcs)
    for i, (d, r) in enumerate(zip(dsts, refs)):
        assert torch.equal(d, r), i


def test_copy_transposes_in_tiles():
    # transposing pairs are copied in 32x32 tiles: sizes off the tile grid, outer dims, casts
    g = torch.Generator().manual_seed(4)
    cases = [((3, 45, 77), (0, 2, 1)), ((70, 33), (1, 0)), ((2, 3, 40, 9, 50), (4, 1, 3, 0, 2)), ((8, 1000), (1, 0))]
    dsts, srcs, refs = [], [], []
    for k, (shape, perm) in enumerate(cases):
        s = torch.randn(shape, generator=g).to(FLOATS[k % 4]).permute(perm)
        d = torch.empty(s.shape, dtype=FLOATS[(k + 1) % 4])
        dsts.append(d)
        srcs.append(s)
        refs.append(torch.empty_like(d).copy_(s))
    multi_tensor_copy_(dsts, srcs)
    for i, (d, r) in enumerate(zip(dsts, refs)):
        assert torch.equal(d, r), i


def test_copy_interleaved_and_sliced_destinations():
    w = torch.zeros(4, 6, 10, dtype=torch.bfloat16)
    gate, up = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    multi_tensor_copy_([w[..., ::2], w[..., 1::2]], [gate, up])
    assert torch.equal(w, torch.stack([gate, up], -1).reshape(4, 6, 10).bfloat16())
    qkv = torch.zeros(5, 12)
    parts = [torch.randn(5, 4) for _ in range(3)]
    multi_tensor_copy_([qkv[:, 0:4], qkv[:, 4:8], qkv[:, 8:12]], parts)
    assert torch.equal(qkv, torch.cat(parts, 1))


def test_copy_empty():
    multi_tensor_copy_([], [])
    multi_tensor_copy_([torch.empty(0, 3)], [torch.empty(0, 3, dtype=torch.float16)])
    torch.ops.ossrl.multi_tensor_copy_([torch.empty(0)], [torch.empty(0)])


def test_copy_identical_pair_is_noop():
    x, y = torch.randn(5, 6), torch.randn(6, 5)
    refs = x.clone(), y.clone()
    multi_tensor_copy_([x, y.t()], [x, y.t()])
    assert torch.equal(x, refs[0]) and torch.equal(y, refs[1])
    with pytest.raises(RuntimeError, match=r"dsts\[0\] overlaps dsts\[1\]"):
        multi_tensor_copy_([x, x.t()], [x, x.t()])


@pytest.mark.parametrize(
    "case",
    ["length", "shape", "broadcast", "dtype", "dst_overlap", "dst_src_overlap", "expanded", "late_bad"],
)
def test_copy_rejects_bad_input_before_writing(case):
    a, b, c = torch.empty(4, 6), torch.empty(4, 6), torch.empty(8, 6)
    good = [torch.randn(4, 6), torch.randn(4, 6)]
    dsts, srcs, match = [a, b], list(good), None
    if case == "length":
        srcs, match = good[:1], "2 destinations but 1 sources"
    elif case == "shape":
        srcs, match = [good[0], torch.randn(6, 4)], r"dsts\[1\] has shape"
    elif case == "broadcast":
        srcs, match = [good[0], torch.randn(1, 6)], "no broadcasting"
    elif case == "dtype":
        srcs, match = [good[0], torch.ones(4, 6, dtype=torch.int32)], r"cannot cast srcs\[1\]"
    elif case == "dst_overlap":
        dsts, srcs, match = [c[0:4], c[3:7]], good, r"dsts\[0\] overlaps dsts\[1\]"
    elif case == "dst_src_overlap":
        dsts, srcs, match = [c[0:4], b], [c[2:6], good[1]], r"dsts\[0\] overlaps srcs\[0\]"
    elif case == "expanded":
        dsts, srcs, match = [a, torch.empty(6).expand(4, 6)], good, r"dsts\[1\] has elements that share memory"
    elif case == "late_bad":
        dsts = [a, b, c]
        srcs, match = good + [torch.randn(8, 5)], r"dsts\[2\]"
    before = [_sentinel(d) for d in dsts]
    with pytest.raises(RuntimeError, match=match):
        multi_tensor_copy_(dsts, srcs)
    for d, r in zip(dsts, before):
        assert torch.equal(d, r), "a destination was written before the error"


def test_copy_opcheck():
    dsts = [torch.empty(6, 4).t(), torch.empty(3, 5, dtype=torch.bfloat16)]
    srcs = [torch.randn(4, 6), torch.randn(3, 5)]
    torch.library.opcheck(torch.ops.ossrl.multi_tensor_copy_.default, (dsts, srcs))


# ---------------------------------------------------------------------------------------------
# reshard: every mapping kind against plain PyTorch (one process)
# ---------------------------------------------------------------------------------------------


def _train_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)

    return {
        "q": r(16, 12),
        "k": r(4, 12),
        "v": r(4, 12),
        "o": r(12, 16),
        "gate": r(3, 12, 8),
        "up": r(3, 12, 8),
        "down": r(3, 8, 12),
        "norm": r(12),
        "router": r(3, 12),
    }


def _reference(kind_case: str, p: dict, tp=None):
    """Plain-PyTorch reference (full or rank-sliced) for one case; returns (mapping, expected)."""
    if kind_case == "identity":
        return R.identity("norm", "norm"), p["norm"].clone()
    if kind_case == "cast":
        return R.cast("router", "router"), p["router"].to(torch.bfloat16)
    if kind_case == "concat":
        return R.concat("qkv", ["q", "k", "v"], 0), torch.cat([p["q"], p["k"], p["v"]], 0).to(torch.bfloat16)
    if kind_case == "interleave":
        gu = torch.empty(3, 12, 16)
        gu[..., ::2] = p["gate"]
        gu[..., 1::2] = p["up"]
        return R.interleave("gate_up", ["gate", "up"], -1), gu.to(torch.bfloat16)
    if kind_case == "transpose":
        return R.transpose("down_t", "down", 1, 2), p["down"].transpose(1, 2).to(torch.float16)
    if kind_case == "slice_col":
        return R.tp_slice("o_shard", "o", 0, 1, 4), p["o"].chunk(4, 0)[1].to(torch.bfloat16)
    if kind_case == "slice_row":
        return R.tp_slice("o_shard", "o", 1, 3, 4), p["o"].chunk(4, 1)[3].to(torch.bfloat16)
    if kind_case == "concat_tp":
        tp = R.TensorParallel(0, 1, 2)
        exp = torch.cat([p[n].chunk(2, 0)[1] for n in ("q", "k", "v")], 0).to(torch.bfloat16)
        return R.concat("qkv", ["q", "k", "v"], 0, tp=tp), exp
    if kind_case == "interleave_tp":
        tp = R.TensorParallel(-1, 0, 2)
        g, u = p["gate"].chunk(2, -1)[0], p["up"].chunk(2, -1)[0]
        exp = torch.stack([g, u], -1).reshape(3, 12, 8).to(torch.bfloat16)
        return R.interleave("gate_up", ["gate", "up"], -1, tp=tp), exp
    if kind_case == "transpose_tp":
        tp = R.TensorParallel(1, 1, 2)
        return R.transpose("down_t", "down", 1, 2, tp=tp), p["down"].chunk(2, 1)[1].transpose(1, 2).clone()
    raise AssertionError(kind_case)


CASES = [
    "identity",
    "cast",
    "concat",
    "interleave",
    "transpose",
    "slice_col",
    "slice_row",
    "concat_tp",
    "interleave_tp",
    "transpose_tp",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strided_dst", [False, True], ids=["own", "flatbuf"])
def test_mapping_kind_bit_exact(case, strided_dst):
    p = _train_params(seed=5)
    m, expected = _reference(case, p)
    if strided_dst:
        # the rollout engine keeps its weights as views into one flat buffer
        flat = torch.full((expected.numel() + 64,), 9.0, dtype=expected.dtype)
        dst = flat[32 : 32 + expected.numel()].view(expected.shape)
    else:
        dst = torch.full(expected.shape, 9.0, dtype=expected.dtype)
    ptr = dst.data_ptr()
    plan = R.build_plan([m], p, {m.dst: dst}, strict=False)
    stats = plan.sync()
    assert torch.equal(dst, expected)
    assert dst.data_ptr() == ptr
    assert stats.bytes_moved == dst.numel() * dst.element_size()
    assert stats.peak_extra_bytes == 0 and stats.collectives == 0
    if strided_dst:
        assert torch.all(flat[:32] == 9) and torch.all(flat[32 + expected.numel() :] == 9)
    # the next step reads the new values
    with torch.no_grad():
        for t in p.values():
            t.mul_(-0.5).add_(1.0)
    _, expected2 = _reference(case, p)
    plan.sync()
    assert torch.equal(dst, expected2)


def _rollout_dsts(dtype=torch.bfloat16):
    return {
        "qkv": torch.empty(24, 12, dtype=dtype),
        "o": torch.empty(12, 16, dtype=dtype),
        "gate_up": torch.empty(3, 12, 16, dtype=dtype),
        "down_t": torch.empty(3, 12, 8, dtype=dtype),
        "norm": torch.empty(12),
        "router": torch.empty(3, 12, dtype=dtype),
    }


def _all_maps():
    return [
        R.concat("qkv", ["q", "k", "v"], 0),
        R.cast("o", "o"),
        R.interleave("gate_up", ["gate", "up"], -1),
        R.transpose("down_t", "down"),
        R.identity("norm", "norm"),
        R.cast("router", "router"),
    ]


def test_whole_model_one_fused_copy_and_sharing():
    p = _train_params(seed=7)
    dsts = _rollout_dsts()
    # identity mappings may share storage: shared_destinations gives the views to build on
    shared = R.shared_destinations(_all_maps(), p)
    assert set(shared) == {"norm"} and shared["norm"].data_ptr() == p["norm"].data_ptr()
    dsts.update(shared)
    ptrs = {n: t.data_ptr() for n, t in dsts.items()}
    plan = R.build_plan(_all_maps(), p, dsts)
    stats = plan.sync()
    assert stats.skipped == 1 and stats.copies == 8 and stats.collectives == 0
    assert stats.bytes_moved == sum(t.numel() * t.element_size() for n, t in dsts.items() if n != "norm")
    assert torch.equal(dsts["qkv"], torch.cat([p["q"], p["k"], p["v"]]).bfloat16())
    assert torch.equal(dsts["down_t"], p["down"].transpose(1, 2).bfloat16())
    assert torch.equal(dsts["norm"], p["norm"])
    assert {n: t.data_ptr() for n, t in dsts.items()} == ptrs
    # new source objects: the plan rebinds to them
    p2 = _train_params(seed=8)
    plan.sync(p2)
    assert torch.equal(dsts["gate_up"][..., 1::2], p2["up"].bfloat16())
    assert {n: t.data_ptr() for n, t in dsts.items()} == ptrs
    # Mapping round-trips as data
    assert [R.Mapping.from_dict(m.to_dict()) for m in _all_maps()] == _all_maps()


BAD = [
    ("shape", RuntimeError, "does not fit"),
    ("dtype_identity", RuntimeError, "identity needs equal dtypes"),
    ("dtype_int", RuntimeError, "cannot cast"),
    ("missing_source", ValueError, "not among the sources"),
    ("missing_dst", ValueError, "not among the destinations"),
    ("extra_source", ValueError, "not used by any mapping"),
    ("extra_dst", ValueError, "not written by any mapping"),
    ("duplicate_dst", ValueError, "written by mappings"),
    ("overlap_dsts", RuntimeError, "overlaps destination"),
    ("overlap_src", RuntimeError, "overlaps source"),
    ("bad_kind", ValueError, "kind must be one of"),
    ("tp_indivisible", ValueError, "not divisible"),
    ("tp_rank", ValueError, "out of range"),
]


@pytest.mark.parametrize("case,exc,match", BAD, ids=[b[0] for b in BAD])
def test_plan_rejects_bad_input_before_writing(case, exc, match):
    p = _train_params(seed=9)
    dsts = _rollout_dsts()
    maps = _all_maps()
    if case == "shape":
        dsts["o"] = torch.empty(12, 15, dtype=torch.bfloat16)
    elif case == "dtype_identity":
        dsts["norm"] = torch.empty(12, dtype=torch.bfloat16)
    elif case == "dtype_int":
        dsts["router"] = torch.empty(3, 12, dtype=torch.int32)
    elif case == "missing_source":
        del p["up"]
    elif case == "missing_dst":
        del dsts["router"]
    elif case == "extra_source":
        p["lm_head"] = torch.randn(3, 3)
    elif case == "extra_dst":
        dsts["rotary"] = torch.empty(3)
    elif case == "duplicate_dst":
        maps.append(R.cast("o", "q"))
    elif case == "overlap_dsts":
        flat = torch.empty(24 * 12 + 12 * 16, dtype=torch.bfloat16)
        dsts["qkv"] = flat[: 24 * 12].view(24, 12)
        dsts["o"] = flat[24 * 12 - 16 :][: 12 * 16].view(12, 16)
    elif case == "overlap_src":
        dsts["norm"] = p["router"][0]
    elif case == "bad_kind":
        maps[1] = R.Mapping("fuse", "o", ("o",))
    elif case == "tp_indivisible":
        maps[1] = R.tp_slice("o", "o", 0, 0, 5)
    elif case == "tp_rank":
        maps[1] = R.tp_slice("o", "o", 0, 4, 4)
    before = {n: _sentinel(t) for n, t in dsts.items() if t.data_ptr() not in {x.data_ptr() for x in p.values()}}
    with pytest.raises(exc, match=match):
        R.build_plan(maps, p, dsts)
    for n, ref in before.items():
        assert torch.equal(dsts[n], ref), f"{n} was written"


def test_plan_strict_false_allows_unused():
    p = _train_params()
    p["unused"] = torch.randn(2)
    dsts = _rollout_dsts()
    dsts["rotary"] = torch.empty(3)
    R.build_plan(_all_maps(), p, dsts, strict=False).sync()
    assert torch.equal(dsts["o"], p["o"].bfloat16())


# ---------------------------------------------------------------------------------------------
# several processes: gloo, DTensor / FSDP2 shards
# ---------------------------------------------------------------------------------------------

BUCKET = 4096  # bytes: small, so parameters split across buckets and many buckets are in flight


def _full_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # uneven row counts: Shard(0) leaves ranks with different (or no) rows
    return {
        "q": torch.randn(23, 16, generator=g),
        "k": torch.randn(8, 16, generator=g),
        "v": torch.randn(8, 16, generator=g),
        "o": torch.randn(16, 24, generator=g),
        "gate": torch.randn(3, 16, 8, generator=g),
        "up": torch.randn(3, 16, 8, generator=g),
        "down": torch.randn(3, 8, 16, generator=g),
        "norm": torch.randn(16, generator=g),
        "emb": torch.randn(97, 40, generator=g).bfloat16(),  # bigger than one bucket
        "bias": torch.randn(5, generator=g),  # a plain (replicated) tensor, not a DTensor
    }


def _check_replicated(full, dsts, tag):
    exp = {
        "qkv": torch.cat([full["q"], full["k"], full["v"]]).bfloat16(),
        "gate_up": torch.stack([full["gate"], full["up"]], -1).reshape(3, 16, 16).bfloat16(),
        "down_t": full["down"].transpose(1, 2).bfloat16(),
        "norm": full["norm"],
        "emb": full["emb"],
        "bias": full["bias"].bfloat16(),
    }
    for n, e in exp.items():
        assert torch.equal(dsts[n], e), f"{tag}: {n}"


def _worker(rank: int, world: int) -> None:  # in a gloo group of run_ranks
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_params(seed=11)
    src = {n: (t if n == "bias" else distribute_tensor(t.clone(), mesh, [Shard(0)])) for n, t in full.items()}
    srcfull = {n: (t.full_tensor() if n != "bias" else t) for n, t in src.items()}
    for n in full:
        assert torch.equal(srcfull[n], full[n])

    # 1. replicated destinations, every layout kind
    dsts = {
        "qkv": torch.empty(39, 16, dtype=torch.bfloat16),
        "gate_up": torch.empty(3, 16, 16, dtype=torch.bfloat16),
        "down_t": torch.empty(3, 16, 8, dtype=torch.bfloat16),
        "norm": torch.empty(16),
        "emb": torch.empty(97, 40, dtype=torch.bfloat16),
        "bias": torch.empty(5, dtype=torch.bfloat16),
    }
    maps = [
        R.concat("qkv", ["q", "k", "v"], 0),
        R.interleave("gate_up", ["gate", "up"], -1),
        R.transpose("down_t", "down"),
        R.identity("norm", "norm"),
        R.identity("emb", "emb"),
        R.cast("bias", "bias"),
    ]
    ptrs = {n: t.data_ptr() for n, t in dsts.items()}
    plan = R.build_plan(maps, src, dsts, bucket_bytes=BUCKET, strict=False)
    assert plan.distributed and plan.num_buckets > 2
    for step in range(2):
        stats = plan.sync()
        _check_replicated({n: src[n].full_tensor() if n != "bias" else src[n] for n in full}, dsts, f"step {step}")
        assert {n: t.data_ptr() for n, t in dsts.items()} == ptrs
        assert 0 < stats.peak_extra_bytes <= 2 * BUCKET, stats
        assert stats.peak_extra_bytes == plan.peak_extra_bytes
        assert stats.collectives == stats.buckets == plan.num_buckets
        assert stats.bytes_moved == sum(t.numel() * t.element_size() for t in dsts.values())
        with torch.no_grad():  # an optimizer step on the shards
            for t in src.values():
                (t.to_local() if hasattr(t, "to_local") else t).mul_(0.5).add_(0.25)

    # 2. tensor-parallel destinations (rank r of world): column and row slices, fused per rank
    tp = R.TensorParallel(0, rank, world)
    tdsts = {
        "o_col": torch.empty(16 // world, 24, dtype=torch.bfloat16),
        "o_row": torch.empty(16, 24 // world, dtype=torch.bfloat16),
        "kv": torch.empty(16 // world, 16, dtype=torch.bfloat16),
        "gate_up": torch.empty(3, 16, 16 // world, dtype=torch.bfloat16),
        "down_t": torch.empty(3, 16, 8, dtype=torch.bfloat16),
    }
    tmaps = [
        R.tp_slice("o_col", "o", 0, rank, world),
        R.tp_slice("o_row", "o", 1, rank, world),
        R.concat("kv", ["k", "v"], 0, tp=tp),
        R.interleave("gate_up", ["gate", "up"], -1, tp=R.TensorParallel(-1, rank, world)),
        R.transpose("down_t", "down"),
    ]
    tptrs = {n: t.data_ptr() for n, t in tdsts.items()}
    tplan = R.build_plan(tmaps, src, tdsts, bucket_bytes=BUCKET, strict=False)
    stats = tplan.sync()
    assert stats.peak_extra_bytes <= 2 * BUCKET
    o = src["o"]
    assert torch.equal(tdsts["o_col"], o.redistribute(mesh, [Shard(0)]).to_local().bfloat16())
    assert torch.equal(tdsts["o_row"], o.redistribute(mesh, [Shard(1)]).to_local().bfloat16())
    kv = torch.cat([src[n].full_tensor().chunk(world, 0)[rank] for n in ("k", "v")]).bfloat16()
    assert torch.equal(tdsts["kv"], kv)
    g = src["gate"].redistribute(mesh, [Shard(2)]).to_local()
    u = src["up"].redistribute(mesh, [Shard(2)]).to_local()
    assert torch.equal(tdsts["gate_up"], torch.stack([g, u], -1).reshape(3, 16, -1).bfloat16())
    assert torch.equal(tdsts["down_t"], src["down"].full_tensor().transpose(1, 2).bfloat16())
    assert {n: t.data_ptr() for n, t in tdsts.items()} == tptrs

    # 3. bad input on one rank only: every rank raises, nothing written
    bad = dict(dsts)
    if rank == world - 1:
        bad["qkv"] = torch.empty(38, 16, dtype=torch.bfloat16)
    before = {n: _sentinel(t) for n, t in bad.items()}
    try:
        R.build_plan(maps, src, bad, bucket_bytes=BUCKET, strict=False)
    except RuntimeError as e:
        assert ("does not fit" in str(e)) if rank == world - 1 else (f"rank {world - 1} failed" in str(e)), e
    else:
        raise AssertionError("no error")
    for n, ref in before.items():
        assert torch.equal(bad[n], ref), n
    # bucket sizes that differ across ranks: every rank raises instead of hanging
    try:
        R.build_plan(maps, src, dsts, bucket_bytes=BUCKET + 1024 * rank, strict=False)
    except RuntimeError as e:
        assert "different plans" in str(e), e
    else:
        raise AssertionError("no error")
    # a bucket too small for one row of a parameter
    try:
        R.build_plan(maps, src, dsts, bucket_bytes=64, strict=False)
    except ValueError as e:
        assert "too small" in str(e), e
    else:
        raise AssertionError("no error")

    # 4. FSDP2 (fully_shard) training module -> rollout module, after an optimizer step
    if world == 2:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 6))
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 12)).square().sum().backward()
        opt.step()
        roll = {
            "w0t": torch.empty(12, 10, dtype=torch.bfloat16),
            "b0": torch.empty(10, dtype=torch.bfloat16),
            "w1": torch.empty(6 // world, 10, dtype=torch.bfloat16),
            "b1": torch.empty(6),
        }
        fmaps = [
            R.transpose("w0t", "0.weight", 0, 1),
            R.cast("b0", "0.bias"),
            R.tp_slice("w1", "1.weight", 0, rank, world),
            R.identity("b1", "1.bias"),
        ]
        fplan = R.build_plan(fmaps, model, roll, bucket_bytes=256)
        fplan.sync()
        sd = {n: p.full_tensor() for n, p in model.named_parameters()}
        assert torch.equal(roll["w0t"], sd["0.weight"].t().bfloat16())
        assert torch.equal(roll["b0"], sd["0.bias"].bfloat16())
        assert torch.equal(roll["w1"], sd["1.weight"].chunk(world, 0)[rank].bfloat16())
        assert torch.equal(roll["b1"], sd["1.bias"])
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_gloo(world):
    run_ranks(_worker, world, timeout=150)  # a hang fails the test instead of blocking it


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): every kernel mode against Tensor.copy_
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(ossrl._C, "with_cuda", False)), reason="needs a CUDA GPU and a CUDA build"
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("many", [False, True], ids=["inline", "table"])
def test_cuda_copy_all_modes(many):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []  # (dst, src)
    for dt in FLOATS:
        for st in FLOATS:
            s = torch.randn(1003, generator=g, device=dev).to(st)
            cases.append((torch.empty(1003, dtype=dt, device=dev), s))  # vec16 (same) / contig cast (aligned)
            cases.append((torch.empty(1004, dtype=dt, device=dev)[1:], s))  # misaligned
            m = torch.randn(70, 45, generator=g, device=dev).to(st)
            cases.append((torch.empty(45, 70, dtype=dt, device=dev).t(), m))  # tile
            cases.append((torch.empty(3, 45, 70, dtype=dt, device=dev), torch.randn(3, 70, 45, generator=g, device=dev).to(st).transpose(1, 2)))
            w = torch.zeros(5, 6, 20, dtype=dt, device=dev)
            cases.append((w[..., ::2], torch.randn(5, 6, 10, generator=g, device=dev).to(st)))  # generic
    big = torch.randn(2, 3, 4, 5, 6, 7, generator=g, device=dev)
    cases.append((torch.empty(7, 6, 5, 4, 3, 2, device=dev).permute(5, 4, 3, 2, 1, 0), big))  # > 4 dims after coalescing
    cases.append((torch.empty(0, 3, device=dev), torch.empty(0, 3, device=dev)))
    c = torch.randn(33, 17, dtype=torch.complex128, device=dev)
    cases.append((torch.empty(17, 33, dtype=torch.complex128, device=dev).t(), c))
    i = torch.randint(0, 100, (257, 9), device=dev, dtype=torch.int8)
    cases.append((torch.empty(9, 257, dtype=torch.int8, device=dev).t(), i))
    if not many:
        cases = cases[:8]
    refs = [torch.empty(s.shape, dtype=d.dtype, device=dev).copy_(s) for d, s in cases]
    multi_tensor_copy_([d for d, _ in cases], [s for _, s in cases])
    torch.cuda.synchronize()
    for k, ((d, s), r) in enumerate(zip(cases, refs)):
        assert torch.equal(d, r), (k, s.dtype, d.dtype, tuple(s.shape))


@pytest.mark.cuda
@needs_cuda
def test_cuda_copy_of_many_pairs_replays_in_a_cuda_graph():
    """More pairs than fit in one launch's parameters: under capture they go by value in several
    launches, so a replay, after the host buffers of other copies were reused, copies the new values."""
    dev = "cuda"
    srcs = [torch.randn(100 + i, device=dev) for i in range(29)]
    dsts = [torch.empty(100 + i, dtype=torch.bfloat16, device=dev) for i in range(29)]
    multi_tensor_copy_(dsts, srcs)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_tensor_copy_(dsts, srcs)
    for _ in range(3):  # other many-pair copies take (and give back) pinned host buffers meanwhile
        multi_tensor_copy_([torch.empty(50, device=dev) for _ in range(20)], [torch.randn(50, device=dev) for _ in range(20)])
    for s in srcs:
        s.normal_()
    graph.replay()
    torch.cuda.synchronize()
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s.bfloat16())


@pytest.mark.cuda
@needs_cuda
def test_cuda_plan_and_errors():
    p = {n: t.cuda() for n, t in _train_params(seed=3).items()}
    dsts = {n: t.cuda() for n, t in _rollout_dsts().items()}
    ptrs = {n: t.data_ptr() for n, t in dsts.items()}
    R.build_plan(_all_maps(), p, dsts).sync()
    assert torch.equal(dsts["gate_up"][..., ::2], p["gate"].bfloat16())
    assert torch.equal(dsts["down_t"], p["down"].transpose(1, 2).bfloat16())
    assert {n: t.data_ptr() for n, t in dsts.items()} == ptrs
    with pytest.raises(RuntimeError, match="is on"):
        multi_tensor_copy_([torch.empty(3, device="cuda")], [torch.ones(3)])
