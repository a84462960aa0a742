"""Moving weights from the training layout into the rollout engine's layout, in place.

After every optimizer step the rollout engine must see the new weights. The trainer holds them
as per-parameter tensors (fp32 or bf16, possibly FSDP2/DTensor shards); the rollout engine
wants its own layout (bf16, fused projections, tensor-parallel slices, kernel-friendly expert
layouts). This module describes that correspondence as data, checks it once, and then runs it
every step without moving the rollout tensors: they keep their storage (same ``data_ptr``), so
KV caches, CUDA graphs and views taken on them stay valid, and no second full copy of the model
is ever allocated.

Describing the layout: one :class:`Mapping` per rollout tensor, built with the helpers below.
Each training parameter is first cut to this rank's tensor-parallel slice when the mapping has
``tp=TensorParallel(dim, rank, world)`` (the ``rank``-th of ``world`` equal chunks along ``dim``
of the parameter), then placed:

=============  ==============================================================================
identity       ``dst = src`` (same shape and dtype; shares storage when the layouts agree, see
               :func:`shared_destinations`: then nothing moves)
cast           ``dst = src.to(dst.dtype)``
concat         ``dst = cat(srcs, dim)`` (q, k, v -> qkv)
interleave     ``dst[k::n along dim] = srcs[k]`` (gate, up -> gate_up with gate at ``::2``)
transpose      ``dst = src.transpose(dim0, dim1)``
slice          ``dst = src.chunk(world, dim)[rank]`` (tensor parallelism, with any cast)
=============  ==============================================================================

Every mapping casts to the destination's dtype (float32, bfloat16, float16 and float64 convert
into each other with the rounding of ``Tensor.copy_``; other dtypes must match), except
``identity``, which requires equal dtypes.

Running it::

    plan = ossrl.reshard.build_plan(mappings, trainer_model, rollout_tensors)
    stats = plan.sync()   # after each optimizer step; returns a SyncStats

In one process every copy goes into one fused :func:`ossrl.ops.multi_tensor_copy_`; pairs whose
source already is the destination are skipped. When sources are DTensors sharded with
``Shard(d)`` over a 1-D device mesh of several processes (what FSDP2's ``fully_shard`` makes),
they are gathered through fixed-size flat buckets, two in flight: while bucket ``i`` is copied
out into the destinations, bucket ``i + 1`` is being gathered. Extra memory is the two bucket
buffers whatever the model size. Shards are cast to the destination dtype before the gather when
every use of a parameter agrees on it, so bf16 rollouts of fp32 trainers move half the bytes.

Everything (names, shapes, dtypes, devices, tensor-parallel slices, overlapping destinations,
bucket size, identical plans on every rank) is checked when the plan is built, before anything
is written: shape, dtype, device and overlap problems raise ``RuntimeError``; bad names and
values raise ``ValueError``. In several processes every rank raises, so none is left waiting in a
collective.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterable, Mapping as MappingABC, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .ops import multi_tensor_copy_

__all__ = [
    "KINDS",
    "PlanSet",
    "build_plans",
    "TensorParallel",
    "Mapping",
    "identity",
    "cast",
    "concat",
    "interleave",
    "transpose",
    "tp_slice",
    "SyncStats",
    "ReshardPlan",
    "build_plan",
    "shared_destinations",
]

KINDS = ("identity", "cast", "concat", "interleave", "transpose", "slice")
_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ALIGN = 16  # bytes: every slot in a bucket starts on this boundary
DEFAULT_BUCKET_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------
# The description, as data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorParallel:
    """This rank's slice of a tensor-parallel layout: the ``rank``-th of ``world`` equal chunks of
    each training parameter along its dimension ``dim`` (``world`` must divide that size)."""

    dim: int
    rank: int
    world: int


@dataclass(frozen=True)
class Mapping:
    """How one rollout tensor ``dst`` is made from training parameters ``srcs``.

    kind: one of :data:`KINDS`. dim: the concatenation or interleaving dimension (of ``dst``).
    dims: the two dimensions swapped by ``transpose``. tp: this rank's tensor-parallel slice of
    every source, taken before the layout change (None: the whole parameter).
    """

    kind: str
    dst: str
    srcs: tuple[str, ...]
    dim: int = 0
    dims: tuple[int, int] = (0, 1)
    tp: TensorParallel | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Mapping:
        tp = d.get("tp")
        return cls(
            kind=d["kind"],
            dst=d["dst"],
            srcs=tuple(d["srcs"]),
            dim=int(d.get("dim", 0)),
            dims=tuple(d.get("dims", (0, 1))),
            tp=TensorParallel(**tp) if tp is not None else None,
        )


def identity(dst: str, src: str, *, tp: TensorParallel | None = None) -> Mapping:
    """``dst = src``: same shape and dtype."""
    return Mapping("identity", dst, (src,), tp=tp)


def cast(dst: str, src: str, *, tp: TensorParallel | None = None) -> Mapping:
    """``dst = src.to(dst.dtype)``: same shape."""
    return Mapping("cast", dst, (src,), tp=tp)


def concat(dst: str, srcs: Sequence[str], dim: int = 0, *, tp: TensorParallel | None = None) -> Mapping:
    """``dst = torch.cat(srcs, dim)`` (each source cut to its tensor-parallel slice first)."""
    return Mapping("concat", dst, tuple(srcs), dim=dim, tp=tp)


def interleave(dst: str, srcs: Sequence[str], dim: int = -1, *, tp: TensorParallel | None = None) -> Mapping:
    """``dst[k::n along dim] = srcs[k]`` for the n sources (gate/up -> gate_up: gate at ::2)."""
    return Mapping("interleave", dst, tuple(srcs), dim=dim, tp=tp)


def transpose(dst: str, src: str, dim0: int = -2, dim1: int = -1, *, tp: TensorParallel | None = None) -> Mapping:
    """``dst = src.transpose(dim0, dim1)``."""
    return Mapping("transpose", dst, (src,), dims=(dim0, dim1), tp=tp)


def tp_slice(dst: str, src: str, dim: int, rank: int, world: int) -> Mapping:
    """``dst = src.chunk(world, dim)[rank]``: a tensor-parallel shard of the full parameter."""
    return Mapping("slice", dst, (src,), tp=TensorParallel(dim, rank, world))


@dataclass
class SyncStats:
    """What one :meth:`ReshardPlan.sync` did.

    bytes_moved: bytes written into destination tensors. seconds: wall time, device work
    included. peak_extra_bytes: the most memory the sync held allocated at once beyond the
    model (its bucket buffers). collectives: collective calls issued. copies: (destination,
    source) pairs copied; skipped: pairs skipped because the source is the destination;
    buckets: buckets gathered.
    """

    bytes_moved: int = 0
    seconds: float = 0.0
    peak_extra_bytes: int = 0
    collectives: int = 0
    copies: int = 0
    skipped: int = 0
    buckets: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Helpers: sources, boxes, overlap
# ---------------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _as_dict(obj, what: str) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):
        d = dict(obj.named_parameters())
        for n, b in obj.named_buffers():
            d.setdefault(n, b)
        return d
    if isinstance(obj, MappingABC):
        return dict(obj)
    raise ValueError(f"reshard: {what} must be a dict of tensors or an nn.Module, got {type(obj).__name__}")


def _norm_dim(dim: int, ndim: int, what: str) -> int:
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"reshard: {what} = {dim} is out of range for a {ndim}-D tensor")
    return dim % max(ndim, 1)


@dataclass
class _Source:
    """A training parameter: its global shape, and how this process holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: object  # the object given (Tensor or DTensor)
    local: Tensor  # what this process holds
    shard_dim: int | None = None  # None: local is the whole parameter
    world: int = 1
    rank: int = 0
    chunk: int = 0  # rows (along shard_dim) per rank, torch.chunk semantics
    mesh: object = None

    def rows(self, q: int) -> int:
        return max(0, min(self.chunk, self.shape[self.shard_dim] - q * self.chunk))


def _make_source(name: str, t) -> _Source:
    if _is_dtensor(t):
        from torch.distributed.tensor import Replicate, Shard

        mesh = t.device_mesh
        placements = tuple(t.placements)
        local = t.to_local().detach()
        if mesh.ndim != 1:
            raise ValueError(
                f"reshard: source {name!r} is a DTensor on a {mesh.ndim}-D device mesh; only 1-D meshes "
                "(FSDP2 data parallelism) are supported"
            )
        p = placements[0]
        shape = tuple(t.shape)
        if isinstance(p, Replicate) or mesh.size() == 1:
            return _Source(name, shape, t.dtype, t, local)
        if type(p) is not Shard:
            raise ValueError(
                f"reshard: source {name!r} has placement {p}; supported are Shard(d) and Replicate()"
            )
        d = p.dim % len(shape)
        w = mesh.size()
        r = mesh.get_local_rank()
        chunk = -(-shape[d] // w)
        src = _Source(name, shape, t.dtype, t, local, shard_dim=d, world=w, rank=r, chunk=chunk, mesh=mesh)
        expect = list(shape)
        expect[d] = src.rows(r)
        if tuple(local.shape) != tuple(expect):
            raise RuntimeError(
                f"reshard: source {name!r}: local shard has shape {tuple(local.shape)} but Shard({d}) of "
                f"{shape} over {w} ranks gives {tuple(expect)} on rank {r}"
            )
        return src
    if not isinstance(t, Tensor):
        raise ValueError(f"reshard: source {name!r} must be a tensor, got {type(t).__name__}")
    return _Source(name, tuple(t.shape), t.dtype, t, t.detach())


def _local_of(t) -> Tensor:
    return t.to_local().detach() if _is_dtensor(t) else t.detach()


Box = tuple[tuple[int, int], ...]  # per dim: (start, length) in a parameter's global indices


def _full_box(shape: Sequence[int]) -> Box:
    return tuple((0, n) for n in shape)


def _intersect(a: Box, b: Box) -> Box | None:
    out = []
    for (s0, n0), (s1, n1) in zip(a, b):
        lo, hi = max(s0, s1), min(s0 + n0, s1 + n1)
        if hi <= lo:
            return None
        out.append((lo, hi - lo))
    return tuple(out)


def _narrow_box(t: Tensor, box: Box, origin: Box) -> Tensor:
    """The part of ``t`` (which covers ``origin``) that covers ``box``."""
    for d, ((s, n), (o, on)) in enumerate(zip(box, origin)):
        if s != o or n != on:
            t = t.narrow(d, s - o, n)
    return t


def _extent(t: Tensor) -> tuple[int, int]:
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + (span + 1) * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> int:
    """Whether two non-empty strided tensors share a byte: 0 no, 1 yes, 2 undecided (the same
    exact search as the C++ op: one variable per byte stride, depth-first, gcd pruning)."""
    alo, ahi = _extent(a)
    blo, bhi = _extent(b)
    if ahi <= blo or bhi <= alo:
        return 0
    isa, isb = a.element_size(), b.element_size()
    var: dict[int, list[int]] = {}
    for n, s in zip(a.shape, a.stride()):
        if n > 1 and s != 0:
            v = var.setdefault(s * isa, [0, 0])
            v[1] += n - 1
    for n, s in zip(b.shape, b.stride()):
        if n > 1 and s != 0:
            v = var.setdefault(s * isb, [0, 0])
            v[0] -= n - 1
    vs = sorted(((s, lo, hi) for s, (lo, hi) in var.items()), reverse=True)
    k = len(vs)
    min_rest = [0] * (k + 1)
    max_rest = [0] * (k + 1)
    gcd_rest = [1] * (k + 1)
    g = 0
    for i in range(k - 1, -1, -1):
        s, lo, hi = vs[i]
        min_rest[i] = min_rest[i + 1] + lo * s
        max_rest[i] = max_rest[i + 1] + hi * s
        g = math.gcd(g, s)
        gcd_rest[i] = g
    budget = [1 << 14]

    def dfs(i: int, tlo: int, thi: int) -> int:
        if i == k:
            return 1 if tlo <= 0 <= thi else 0
        if thi < min_rest[i] or tlo > max_rest[i]:
            return 0
        gg = gcd_rest[i]
        if (thi // gg) * gg < tlo:
            return 0
        budget[0] -= 1
        if budget[0] < 0:
            return 2
        s, lo, hi = vs[i]
        vlo = max(lo, -((max_rest[i + 1] - tlo) // s))
        vhi = min(hi, (thi - min_rest[i + 1]) // s)
        for x in range(vlo, vhi + 1):
            r = dfs(i + 1, tlo - x * s, thi - x * s)
            if r:
                return r
        return 0

    delta = blo - alo
    return dfs(0, delta - isa + 1, delta + isb - 1)


def _identical(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.device == b.device
    )


def _check_disjoint(dsts: list[tuple[str, Tensor, bool]], srcs: list[tuple[str, Tensor]]) -> None:
    """Destinations (label, tensor, written) must be disjoint, and no written destination may
    share memory with a source (label, tensor) it is not identical to. A destination identical
    to its own source is not written (its pair is skipped). RuntimeError naming both otherwise."""
    items = []
    for label, t, written in dsts:
        if t.numel():
            items.append((*_extent(t), True, label, t, written))
    for label, t in srcs:
        if t.numel():
            items.append((*_extent(t), False, label, t, True))
    items.sort(key=lambda x: x[0])
    active: list[tuple] = []
    for cur in items:
        active = [a for a in active if a[1] > cur[0]]
        for prev in active:
            if not (prev[2] or cur[2]):
                continue  # sources may overlap each other
            d, o = (cur, prev) if cur[2] else (prev, cur)
            if not o[2] and not d[5]:
                continue  # an untouched destination may be read
            r = _overlap(d[4], o[4])
            if r:
                how = "overlaps" if r == 1 else "may overlap (layout too irregular to prove otherwise)"
                if o[2]:
                    raise RuntimeError(f"reshard: destination {d[3]} {how} destination {o[3]}: destinations must be disjoint")
                raise RuntimeError(
                    f"reshard: destination {d[3]} {how} source {o[3]}: a destination may share memory with a "
                    "source only when it is that source (same memory, shape, strides and dtype)"
                )
        active.append(cur)


def _check_plan_disjoint(uses: list, sources: dict) -> None:
    dl: list[tuple[str, Tensor, bool]] = []
    sl: list[tuple[str, Tensor]] = []
    for u in uses:
        s = sources[u.src]
        label = f"{u.dst_name!r} (from {u.src!r})"
        if s.shard_dim is None:
            v = _narrow_box(s.local, u.box, _full_box(s.shape))
            written = not _identical(u.region, v)
            dl.append((label, u.region, written))
            if written:
                sl.append((f"{u.src!r}", v))
        else:
            dl.append((label, u.region, True))
    for n, s in sources.items():
        if s.shard_dim is not None:
            sl.append((f"{n!r} (local shard)", s.local))
    _check_disjoint(dl, sl)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class _Use:
    """One source feeding one region of one destination: region (a view of the destination with
    the shape of ``box``) <- the part ``box`` of the source's global tensor."""

    mapping: int
    dst_name: str
    src: str
    region: Tensor
    box: Box


@dataclass
class _Piece:
    """Rows [row0, row0 + rows) (along the shard dim, local to each rank) of a sharded source,
    gathered in one bucket: each rank contributes ``rows`` rows (padded) at ``offset`` bytes into
    its part of the bucket."""

    src: str
    row0: int
    rows: int
    wire_dtype: torch.dtype
    nbytes: int  # per rank, padded to _ALIGN
    offset: int = 0


@dataclass
class _Bucket:
    pieces: list[_Piece] = field(default_factory=list)
    region: int = 0  # bytes per rank


class ReshardPlan:
    """A checked, reusable description of one weight sync. Build it with :func:`build_plan`."""

    def __init__(self) -> None:  # use build_plan
        self.mappings: list[Mapping] = []
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        self._sources: dict[str, _Source] = {}
        self._dsts: dict[str, Tensor] = {}
        self._uses: list[_Use] = []
        self._local_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._skipped = 0
        self._buckets: list[_Bucket] = []
        self._group = None
        self._world = 1
        self._rank = 0
        self._device = torch.device("cpu")
        self._fingerprint: tuple = ()
        # per bucket: (pack specs, copy-out specs); a spec is (dtype, offset, size, stride)
        self._pack: list[list[tuple[tuple, Tensor]]] = []
        self._unpack: list[list[tuple[Tensor, tuple]]] = []
        self._buf_bytes = 0

    # ---- public ----

    @property
    def distributed(self) -> bool:
        """Whether syncs gather shards across processes."""
        return bool(self._buckets)

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    @property
    def peak_extra_bytes(self) -> int:
        """Bytes of bucket buffers a sync allocates (0 without sharded sources)."""
        return self._buf_bytes * min(2, len(self._buckets))

    def summary(self) -> str:
        lines = [f"ReshardPlan: {len(self.mappings)} mappings, {len(self._sources)} sources"]
        n_local = len(self._local_pairs[0])
        lines.append(f"  local copies: {n_local} pairs in one fused copy, {self._skipped} shared (skipped)")
        if self._buckets:
            lines.append(
                f"  sharded: {len(self._buckets)} buckets over {self._world} ranks, "
                f"{self._buf_bytes} bytes each, 2 in flight"
            )
        return "\n".join(lines)

    def copy_pairs(self, full: MappingABC[str, Tensor] | None = None) -> list[tuple[Tensor, Tensor]]:
        """The (destination view, source view) pairs this plan writes, one per source use, for
        inspection or a per-tensor ``dst.copy_(src)`` reference. Source views are taken from
        ``full`` (whole parameters by name, e.g. DTensor ``full_tensor()``s; only the uses of
        the parameters it holds are returned) or, by default, from the sources themselves when
        this process holds them whole. Shared pairs are included."""
        pairs = []
        for u in self._uses:
            s = self._sources[u.src]
            if full is not None:
                if u.src not in full:
                    continue
                t = full[u.src]
                if tuple(t.shape) != s.shape:
                    raise RuntimeError(f"reshard: full[{u.src!r}] has shape {tuple(t.shape)}, expected {s.shape}")
            elif s.shard_dim is None:
                t = s.local
            else:
                raise ValueError(f"reshard: source {u.src!r} is sharded: pass its full tensor in `full`")
            pairs.append((u.region, _narrow_box(t, u.box, _full_box(s.shape))))
        return pairs

    def sync(self, sources: MappingABC[str, Tensor] | torch.nn.Module | None = None) -> SyncStats:
        """Copy the current training weights into the rollout tensors, in place.

        ``sources``: the training parameters again, when they are new objects since the plan was
        built (same names, shapes, dtypes and sharding); by default the ones given to
        :func:`build_plan`, whose current values are read. Returns a :class:`SyncStats`.
        """
        if sources is not None:
            self._rebind(_as_dict(sources, "sources"))
        elif self._current_fingerprint() != self._fingerprint:
            self._rebind({n: s.tensor for n, s in self._sources.items()})
        stats = SyncStats(skipped=self._skipped)
        cuda = self._device.type == "cuda"
        if cuda:
            torch.cuda.current_stream(self._device).synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            if self._buckets:
                self._sync_buckets(stats)
            else:
                self._copy_local(stats)
        if cuda:
            torch.cuda.current_stream(self._device).synchronize()
        stats.seconds = time.perf_counter() - t0
        return stats

    # ---- sync internals ----

    def _copy_local(self, stats: SyncStats) -> None:
        dsts, srcs = self._local_pairs
        if dsts:
            multi_tensor_copy_(dsts, srcs)
            stats.copies += len(dsts)
            stats.bytes_moved += sum(d.numel() * d.element_size() for d in dsts)

    def _sync_buckets(self, stats: SyncStats) -> None:
        import torch.distributed as dist

        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        nb = len(self._buckets)
        bufs = [torch.empty(self._buf_bytes, dtype=torch.uint8, device=self._device) for _ in range(min(2, nb))]
        stats.peak_extra_bytes = sum(b.numel() for b in bufs)
        views: list[dict[torch.dtype, Tensor]] = [{} for _ in bufs]

        def spec_view(j: int, spec: tuple) -> Tensor:
            dtype, offset, size, stride = spec
            v = views[j].get(dtype)
            if v is None:
                v = views[j][dtype] = bufs[j].view(dtype)
            return v.as_strided(size, stride, offset)

        def launch(i: int):
            j = i % 2
            pack = self._pack[i]
            if pack:
                multi_tensor_copy_([spec_view(j, s) for s, _ in pack], [t for _, t in pack])
            region = self._buckets[i].region
            out = bufs[j][: region * self._world]
            inp = bufs[j][self._rank * region : (self._rank + 1) * region]
            stats.collectives += 1
            return gather(out, inp, group=self._group, async_op=True)

        handles = {0: launch(0)}
        self._copy_local(stats)  # overlaps with the first gather
        for i in range(nb):
            if i + 1 < nb:
                handles[i + 1] = launch(i + 1)
            handles.pop(i).wait()
            unpack = self._unpack[i]
            if unpack:
                dsts = [d for d, _ in unpack]
                multi_tensor_copy_(dsts, [spec_view(i % 2, s) for _, s in unpack])
                stats.copies += len(dsts)
                stats.bytes_moved += sum(d.numel() * d.element_size() for d in dsts)
        stats.buckets = nb
        del views, bufs

    # ---- building ----

    def _current_fingerprint(self) -> tuple:
        out = []
        for s in self._sources.values():
            t = _local_of(s.tensor)
            out.append((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype))
        return tuple(out)

    def _rebind(self, sources: dict[str, Tensor]) -> None:
        """New source objects (same names, shapes, sharding): rebuild the views on them."""
        missing = sorted(set(self._sources) - set(sources))
        if missing:
            raise ValueError(f"reshard: sources lack parameters the plan reads: {missing}")
        new = {}
        for n in self._sources:
            s = _make_source(n, sources[n])
            old = self._sources[n]
            if (s.shape, s.dtype, s.shard_dim, s.world, tuple(s.local.shape)) != (
                old.shape,
                old.dtype,
                old.shard_dim,
                old.world,
                tuple(old.local.shape),
            ):
                raise RuntimeError(
                    f"reshard: source {n!r} changed since the plan was built: shape {s.shape} dtype {s.dtype} "
                    f"sharding {s.shard_dim}/{s.world}, was {old.shape} {old.dtype} {old.shard_dim}/{old.world}"
                )
            new[n] = s
        _check_plan_disjoint(self._uses, new)
        self._sources = new
        self._assemble()

    def _assemble(self) -> None:
        """Builds the copy lists from the uses and the current local tensors."""
        ldst: list[Tensor] = []
        lsrc: list[Tensor] = []
        skipped = 0
        by_src: dict[str, list[_Use]] = {}
        for u in self._uses:
            s = self._sources[u.src]
            if s.shard_dim is None:
                src_view = _narrow_box(s.local, u.box, _full_box(s.shape))
                if _identical(u.region, src_view):
                    skipped += 1
                    continue
                ldst.append(u.region)
                lsrc.append(src_view)
            else:
                by_src.setdefault(u.src, []).append(u)
        self._local_pairs = (ldst, lsrc)
        self._skipped = skipped
        self._pack, self._unpack = [], []
        for b in self._buckets:
            pack: list[tuple[tuple, Tensor]] = []
            unpack: list[tuple[Tensor, tuple]] = []
            for p in b.pieces:
                s = self._sources[p.src]
                d = s.shard_dim
                slot_shape = list(s.shape)
                slot_shape[d] = p.rows
                slot_stride = _contiguous_stride(slot_shape)
                isz = _itemsize(p.wire_dtype)
                # my contribution: local rows [row0, row0 + mine)
                mine = max(0, min(p.rows, s.rows(self._rank) - p.row0))
                if mine:
                    shape = list(slot_shape)
                    shape[d] = mine
                    off = (self._rank * b.region + p.offset) // isz
                    pack.append(((p.wire_dtype, off, tuple(shape), slot_stride), s.local.narrow(d, p.row0, mine)))
                for q in range(self._world):
                    got = max(0, min(p.rows, s.rows(q) - p.row0))
                    if not got:
                        continue
                    box = list(_full_box(s.shape))
                    box[d] = (q * s.chunk + p.row0, got)
                    box = tuple(box)
                    base = (q * b.region + p.offset) // isz
                    for u in by_src.get(p.src, ()):
                        inter = _intersect(box, u.box)
                        if inter is None:
                            continue
                        region = _narrow_box(u.region, inter, u.box)
                        # the slot for rank q, narrowed to `inter` (origin `box`)
                        offset = base + sum((a - o) * st for (a, _), (o, _), st in zip(inter, box, slot_stride))
                        size = tuple(n for _, n in inter)
                        unpack.append((region, (p.wire_dtype, offset, size, slot_stride)))
            self._pack.append(pack)
            self._unpack.append(unpack)
        self._fingerprint = self._current_fingerprint()


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _uses_of(m: Mapping, mi: int, dst: Tensor, sources: dict[str, _Source]) -> list[_Use]:
    """Checks one mapping against the tensors and returns its uses. Raises before any write."""
    what = f"reshard: mapping {mi} ({m.kind} -> {m.dst!r})"
    srcs = [sources[n] for n in m.srcs]
    # tensor-parallel boxes and the sliced shapes
    boxes: list[Box] = []
    shapes: list[tuple[int, ...]] = []
    for s in srcs:
        box = list(_full_box(s.shape))
        if m.tp is not None:
            tp = m.tp
            if not isinstance(tp, TensorParallel):
                raise ValueError(f"{what}: tp must be a TensorParallel, got {type(tp).__name__}")
            if tp.world < 1 or not 0 <= tp.rank < tp.world:
                raise ValueError(f"{what}: tp rank {tp.rank} is out of range for world {tp.world}")
            d = _norm_dim(tp.dim, len(s.shape), f"{what}: tp.dim")
            if s.shape[d] % tp.world:
                raise ValueError(
                    f"{what}: source {s.name!r} has size {s.shape[d]} along tp.dim {d}, not divisible by "
                    f"world {tp.world}"
                )
            c = s.shape[d] // tp.world
            box[d] = (tp.rank * c, c)
        boxes.append(tuple(box))
        shapes.append(tuple(n for _, n in box))
    # dtypes
    for s in srcs:
        if m.kind == "identity":
            if s.dtype != dst.dtype:
                raise RuntimeError(
                    f"{what}: identity needs equal dtypes, but source {s.name!r} is {s.dtype} and the destination "
                    f"is {dst.dtype} (use cast)"
                )
        elif s.dtype != dst.dtype and not (s.dtype in _CAST_DTYPES and dst.dtype in _CAST_DTYPES):
            raise RuntimeError(
                f"{what}: cannot cast source {s.name!r} ({s.dtype}) to the destination ({dst.dtype}): casts are "
                "supported between float32, float16, bfloat16 and float64"
            )
    dshape = tuple(dst.shape)

    def mismatch(detail: str) -> RuntimeError:
        src_desc = ", ".join(f"{s.name!r} {sh}" for s, sh in zip(srcs, shapes))
        return RuntimeError(f"{what}: destination shape {dshape} does not fit the sources ({src_desc}): {detail}")

    regions: list[Tensor] = []
    if m.kind in ("identity", "cast", "slice", "transpose"):
        if len(srcs) != 1:
            raise ValueError(f"{what}: takes exactly one source, got {len(srcs)}")
        if m.kind == "slice" and m.tp is None:
            raise ValueError(f"{what}: slice needs tp=TensorParallel(dim, rank, world)")
        region = dst
        if m.kind == "transpose":
            if len(m.dims) != 2:
                raise ValueError(f"{what}: dims must be two dimensions, got {m.dims}")
            d0 = _norm_dim(m.dims[0], dst.dim(), f"{what}: dims[0]")
            d1 = _norm_dim(m.dims[1], dst.dim(), f"{what}: dims[1]")
            region = dst.transpose(d0, d1)
        if tuple(region.shape) != shapes[0]:
            raise mismatch(
                "the transposed destination has shape " + str(tuple(region.shape))
                if m.kind == "transpose"
                else "shapes must be equal"
            )
        regions.append(region)
    elif m.kind in ("concat", "interleave"):
        if not srcs:
            raise ValueError(f"{what}: needs at least one source")
        dim = _norm_dim(m.dim, dst.dim(), f"{what}: dim")
        for sh in shapes:
            if len(sh) != dst.dim() or any(a != b for k, (a, b) in enumerate(zip(sh, dshape)) if k != dim):
                raise mismatch(f"every source must match the destination in all dimensions but {dim}")
        if m.kind == "concat":
            total = sum(sh[dim] for sh in shapes)
            if total != dshape[dim]:
                raise mismatch(f"sizes along dim {dim} add up to {total}")
            off = 0
            for sh in shapes:
                regions.append(dst.narrow(dim, off, sh[dim]))
                off += sh[dim]
        else:
            n = len(srcs)
            if any(sh != shapes[0] for sh in shapes):
                raise mismatch("interleaved sources must have equal shapes")
            if shapes[0][dim] * n != dshape[dim]:
                raise mismatch(f"{n} sources of size {shapes[0][dim]} interleaved along dim {dim}")
            for k in range(n):
                idx = (slice(None),) * dim + (slice(k, None, n),)
                regions.append(dst[idx])
    else:
        raise ValueError(f"{what}: kind must be one of {KINDS}, got {m.kind!r}")
    return [_Use(mi, m.dst, s.name, r, b) for s, r, b in zip(srcs, regions, boxes)]


def build_plan(
    mappings: Iterable[Mapping],
    sources: MappingABC[str, Tensor] | torch.nn.Module,
    destinations: MappingABC[str, Tensor] | torch.nn.Module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    strict: bool = True,
) -> ReshardPlan:
    """Checks ``mappings`` against the training parameters and the rollout tensors and returns a
    :class:`ReshardPlan` whose :meth:`~ReshardPlan.sync` runs it. Nothing is written.

    sources: the training parameters by name (a dict, or an nn.Module: its parameters and
    buffers), plain tensors or DTensors (``Shard(d)`` or ``Replicate()`` on a 1-D mesh, as FSDP2
    makes them). destinations: the rollout tensors by name (plain tensors on one device; this
    process's tensor-parallel slice where a mapping says so). bucket_bytes: size of one gather
    bucket (all ranks' parts together); a sync holds at most two. strict: every source and every
    destination must appear in some mapping (ValueError naming the unused ones otherwise).

    In several processes this is collective over the sources' mesh: call it on every rank with
    the same mappings. A problem on any rank raises on every rank.
    """
    mappings = list(mappings)
    srcs = _as_dict(sources, "sources")
    dsts = _as_dict(destinations, "destinations")
    plan = ReshardPlan()
    plan.mappings = mappings
    plan.bucket_bytes = int(bucket_bytes)
    error: BaseException | None = None
    group = None
    try:
        made = {n: _make_source(n, t) for n, t in srcs.items()}
        meshes = {id(s.mesh): s.mesh for s in made.values() if s.shard_dim is not None}
        if len(meshes) > 1:
            raise ValueError("reshard: sharded sources must all live on one device mesh")
        if meshes:
            mesh = next(iter(meshes.values()))
            group = mesh.get_group()
            plan._world = mesh.size()
            plan._rank = mesh.get_local_rank()
        plan._group = group
        _fill_plan(plan, mappings, made, dsts, strict=strict)
    except Exception as e:  # noqa: BLE001 (re-raised, on every rank)
        error = e
    if group is not None:
        _agree(plan, group, error)
    elif error is not None:
        raise error
    return plan


def _fill_plan(plan: ReshardPlan, mappings: list[Mapping], sources: dict[str, _Source], dsts: dict[str, Tensor], *, strict: bool) -> None:
    if not isinstance(plan.bucket_bytes, int) or plan.bucket_bytes <= 0:
        raise ValueError(f"reshard: bucket_bytes must be a positive integer, got {plan.bucket_bytes}")
    # names
    seen_dst: dict[str, int] = {}
    used_src: set[str] = set()
    for mi, m in enumerate(mappings):
        if not isinstance(m, Mapping):
            raise ValueError(f"reshard: mappings[{mi}] must be a Mapping, got {type(m).__name__}")
        if m.kind not in KINDS:
            raise ValueError(f"reshard: mappings[{mi}] kind must be one of {KINDS}, got {m.kind!r}")
        if not isinstance(m.srcs, (tuple, list)) or not all(isinstance(n, str) for n in m.srcs):
            raise ValueError(f"reshard: mappings[{mi}] srcs must be a tuple of parameter names, got {m.srcs!r}")
        if m.dst in seen_dst:
            raise ValueError(f"reshard: destination {m.dst!r} is written by mappings {seen_dst[m.dst]} and {mi}")
        seen_dst[m.dst] = mi
        if m.dst not in dsts:
            raise ValueError(f"reshard: mappings[{mi}] writes destination {m.dst!r}, which is not among the destinations")
        for n in m.srcs:
            if n not in sources:
                raise ValueError(f"reshard: mappings[{mi}] ({m.dst!r}) reads parameter {n!r}, which is not among the sources")
            used_src.add(n)
    if strict:
        extra_src = sorted(set(sources) - used_src)
        if extra_src:
            raise ValueError(f"reshard: training parameters not used by any mapping: {extra_src} (pass strict=False to allow)")
        extra_dst = sorted(set(dsts) - set(seen_dst))
        if extra_dst:
            raise ValueError(f"reshard: destinations not written by any mapping: {extra_dst} (pass strict=False to allow)")
    # destination tensors
    device = None
    for name in seen_dst:
        t = dsts[name]
        if _is_dtensor(t) or not isinstance(t, Tensor):
            raise ValueError(
                f"reshard: destination {name!r} must be a plain tensor (describe tensor-parallel slices with tp=), "
                f"got {type(t).__name__}"
            )
        if t.layout != torch.strided:
            raise RuntimeError(f"reshard: destination {name!r} must be a strided tensor, got {t.layout}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise RuntimeError(f"reshard: destination {name!r} is on {t.device} but others are on {device}")
    if device is None:
        device = next((s.local.device for s in sources.values()), torch.device("cpu"))
    for n in used_src:
        s = sources[n]
        if s.local.device != device:
            raise RuntimeError(f"reshard: source {n!r} is on {s.local.device} but the destinations are on {device}")
    plan._device = device
    plan._sources = {n: sources[n] for n in sources if n in used_src}
    plan._dsts = {n: dsts[n].detach() for n in seen_dst}
    # shapes, dtypes, regions
    uses: list[_Use] = []
    for mi, m in enumerate(mappings):
        uses.extend(_uses_of(m, mi, plan._dsts[m.dst], plan._sources))
    plan._uses = uses
    # overlap: destinations disjoint, none sharing memory with a source unless identical
    _check_plan_disjoint(uses, plan._sources)
    # buckets for the sharded sources
    plan._buckets, plan._buf_bytes = _make_buckets(plan, uses)
    plan._assemble()


def _make_buckets(plan: ReshardPlan, uses: list[_Use]) -> tuple[list[_Bucket], int]:
    sharded = [s for s in plan._sources.values() if s.shard_dim is not None]
    if not sharded:
        return [], 0
    w = plan._world
    cap = (plan.bucket_bytes // w) // _ALIGN * _ALIGN  # bytes per rank per bucket
    # gather in the destination dtype when every use of a source agrees on it and it is narrower
    wire: dict[str, torch.dtype] = {}
    for s in sharded:
        dts = {plan._dsts[u.dst_name].dtype for u in uses if u.src == s.name}
        wire[s.name] = s.dtype
        if len(dts) == 1:
            dt = next(iter(dts))
            if _itemsize(dt) <= _itemsize(s.dtype):
                wire[s.name] = dt
    buckets: list[_Bucket] = []
    cur = _Bucket()
    for s in sharded:
        d = s.shard_dim
        isz = _itemsize(wire[s.name])
        row_bytes = isz * math.prod(n for k, n in enumerate(s.shape) if k != d)
        if s.chunk == 0 or row_bytes == 0:
            continue  # nothing to gather
        if _round_up(row_bytes, _ALIGN) > cap:
            raise ValueError(
                f"reshard: bucket_bytes = {plan.bucket_bytes} is too small for parameter {s.name!r}: one of its rows "
                f"along the shard dim takes {row_bytes} bytes on each of {w} ranks; use at least "
                f"{_round_up(row_bytes, _ALIGN) * w}"
            )
        row0 = 0
        while row0 < s.chunk:
            room = cap - cur.region
            fit = room // row_bytes
            while fit > 0 and _round_up(fit * row_bytes, _ALIGN) > room:
                fit -= 1
            rows = min(s.chunk - row0, fit)
            if rows <= 0:
                buckets.append(cur)
                cur = _Bucket()
                continue
            nbytes = _round_up(rows * row_bytes, _ALIGN)
            cur.pieces.append(_Piece(s.name, row0, rows, wire[s.name], nbytes, cur.region))
            cur.region += nbytes
            row0 += rows
    if cur.pieces:
        buckets.append(cur)
    buf = max((b.region for b in buckets), default=0) * w
    return buckets, buf


def _signature(plan: ReshardPlan) -> str:
    h = hashlib.sha256()
    for m in plan.mappings:
        h.update(repr((m.kind, m.dst, m.srcs, m.dim, m.dims)).encode())
    for n, s in plan._sources.items():
        h.update(repr((n, s.shape, str(s.dtype), s.shard_dim, s.world)).encode())
    for b in plan._buckets:
        h.update(repr([(p.src, p.row0, p.rows, str(p.wire_dtype), p.nbytes, p.offset) for p in b.pieces]).encode())
        h.update(repr(b.region).encode())
    return h.hexdigest()


def _agree(plan: ReshardPlan, group, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, and that all built the same buckets."""
    import torch.distributed as dist

    mine = (type(error).__name__, str(error)) if error is not None else None
    sig = _signature(plan) if error is None else ""
    got: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, (dist.get_rank(), mine, sig), group=group)
    if error is not None:
        raise error
    for rank, err, _ in got:
        if err is not None:
            kind = ValueError if err[0] == "ValueError" else RuntimeError
            raise kind(f"reshard: rank {rank} failed to build the plan: {err[1]}")
    if len({s for _, _, s in got}) != 1:
        raise RuntimeError(
            "reshard: ranks built different plans (mappings, parameter shapes, dtypes or bucket_bytes differ); "
            "build the plan with the same arguments on every rank"
        )


def shared_destinations(
    mappings: Iterable[Mapping], sources: MappingABC[str, Tensor] | torch.nn.Module
) -> dict[str, Tensor]:
    """Rollout tensors that can simply *be* the training parameters: for every ``identity``
    mapping whose (unsharded) source slice is a view, that view, by destination name.

    Build the rollout engine on these (once, before it captures anything) and a plan built on
    them moves nothing for those tensors: their pairs are recognised as identical and skipped.
    """
    srcs = _as_dict(sources, "sources")
    out: dict[str, Tensor] = {}
    for m in mappings:
        if m.kind != "identity" or len(m.srcs) != 1 or m.srcs[0] not in srcs:
            continue
        s = _make_source(m.srcs[0], srcs[m.srcs[0]])
        if s.shard_dim is not None:
            continue
        view = s.local
        if m.tp is not None:
            d = _norm_dim(m.tp.dim, len(s.shape), "tp.dim")
            if s.shape[d] % m.tp.world:
                continue
            c = s.shape[d] // m.tp.world
            view = view.narrow(d, m.tp.rank * c, c)
        out[m.dst] = view
    return out


class PlanSet:
    """Plans run one after the other, as one: what :func:`build_plans` returns."""

    def __init__(self, plans: list[ReshardPlan]):
        self.plans = plans

    def sync(self, sources: MappingABC[str, Tensor] | torch.nn.Module | None = None) -> SyncStats:
        total = SyncStats()
        for p in self.plans:
            s = p.sync(sources)
            for f in ("bytes_moved", "seconds", "collectives", "copies", "skipped", "buckets"):
                setattr(total, f, getattr(total, f) + getattr(s, f))
            total.peak_extra_bytes = max(total.peak_extra_bytes, s.peak_extra_bytes)
        return total


def build_plans(mappings: Iterable[Mapping], sources: MappingABC[str, Tensor] | torch.nn.Module,
                destinations: MappingABC[str, Tensor] | torch.nn.Module, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                strict: bool = True) -> ReshardPlan | PlanSet:
    """:func:`build_plan` for sources sharded over several device meshes (FSDP2's over every rank
    and expert parallelism's over a block of ranks): one plan per mesh, the plain sources with the
    first, in the order the mappings first read each mesh (the same on every rank, since building
    a plan is collective over its mesh). One mesh or none: just :func:`build_plan`."""
    mappings = list(mappings)
    srcs = _as_dict(sources, "sources")
    mesh_of = lambda n: id(srcs[n].device_mesh) if _is_dtensor(srcs.get(n)) and srcs[n].device_mesh.size() > 1 else None
    keys: list = []
    for m in mappings:
        for n in m.srcs:
            k = mesh_of(n) if n in srcs else None
            if k is not None and k not in keys:
                keys.append(k)
    if len(keys) <= 1:
        return build_plan(mappings, srcs, destinations, bucket_bytes=bucket_bytes, strict=strict)
    if strict:  # checked once over everything (each part is partial); the parts check the rest
        used = {n for m in mappings for n in m.srcs}
        unused, unwritten = sorted(set(srcs) - used), sorted(set(_as_dict(destinations, "destinations")) -
                                                              {m.dst for m in mappings})
        if unused or unwritten:
            raise ValueError(f"reshard: training parameters not used by any mapping: {unused}; destinations not "
                             f"written by any mapping: {unwritten} (pass strict=False to allow)")
    parts: dict = {k: [] for k in keys}
    for m in mappings:
        ks = {mesh_of(n) for n in m.srcs if n in srcs} - {None}
        if len(ks) > 1:
            raise ValueError(f"reshard: mapping to {m.dst!r} reads sources on different device meshes")
        parts[next(iter(ks)) if ks else keys[0]].append(m)
    return PlanSet([build_plan(ms, {n: srcs[n] for m in ms for n in m.srcs if n in srcs}, destinations,
                               bucket_bytes=bucket_bytes, strict=False) for ms in parts.values()])
