"""The rollout engine: continuous batching over a paged KV cache.

Every step runs ONE packed forward pass over all running sequences: each contributes the tokens
it has not fed yet — a chunk of its prompt (chunked prefill), the tool result appended on a
resumed turn, or its last sampled token (decoding) — so prefills and decodes share the batch and
nobody waits for the longest prompt. Keys and values go into a paged cache (fixed-size blocks, a
block table per sequence, ``ossrl.ops.paged_kv_append`` / ``paged_attention``); a sequence
reserves the blocks it can need when admitted, so running sequences never run out of cache and
prompts that can never fit are rejected instead of overrunning it. When resumed sequences hold
the cache and none of them can grow into it, some are preempted: their cache is dropped and
their tokens are fed again later (recomputation), so nothing deadlocks.

Multi-turn: ``generate(..., keep=True)`` keeps a finished sequence's cache; pass
``Resume(handle, appended_tokens)`` as a prompt to continue it after a tool result without
recomputing the prefix. ``release(handle)`` frees it.

The cache is allocated and released explicitly (``allocate_cache`` / ``release_cache``) so a
colocated trainer can take the memory back between rollouts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # also record the k most likely tokens (and log-probs) at each step

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1 \
                or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"SamplingParams: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             f"max_new_tokens >= 1, 0 <= top_logprobs <= 20; got {self}")


@dataclass
class Completion:
    tokens: list[int]  # generated ids (the stop token included when one ended it)
    logprobs: list[float]  # the model's log-softmax (temperature 1, unfiltered) at each generated id
    finish_reason: str  # "stop" | "length" | "rejected" (can never fit the cache) | "aborted"
    handle: int | None = None  # with keep=True: pass Resume(handle, tokens) to continue
    top_logprobs: list[list[tuple[int, float]]] | None = None  # with SamplingParams.top_logprobs
    # with Engine.record_routing: the experts (uint8, layers x top_k per token) every token this
    # sequence fed chose, from its first token: what routing replay gives the trainer
    routing: bytearray | None = None


@dataclass(frozen=True)
class Resume:
    """Continue a kept sequence: ``tokens`` (e.g. a tool result) are appended after its last
    generated token, then generation goes on; the cached prefix is reused."""

    handle: int
    tokens: list[int]


@dataclass
class _Seq:
    id: int
    params: SamplingParams
    pending: list[int]  # tokens to feed before the next sample
    fed: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache (for a recompute)
    cached: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0  # blocks promised to this sequence (allocated or not)
    limit: int = 0  # total tokens this turn may reach
    keep: bool = False  # keep the cache when finished, for a Resume
    generator: torch.Generator | None = None  # its own sampling stream (None: the engine's)
    out: Completion | None = None
    routing: bytearray = field(default_factory=bytearray)  # experts of every fed token (record_routing)


class PagedKVCache:
    """Per layer, keys and values in (num_blocks, block_size, Hkv, D) blocks, and a free list.

    The engine sets the step's batch layout (``set_step``); the model's attention layers call
    ``attend`` (see ``ossrl.model.gpt_oss.KVCache``).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.free = list(range(num_blocks - 1, -1, -1))

    def set_step(self, block_table: Tensor, cu_seqlens_q: Tensor, cache_seqlens: Tensor, seq_lens: Tensor,
                 max_seqlen_q: int, max_seqlen_k: int) -> None:
        self.block_table, self.cu_q, self.cache_seqlens, self.seq_lens = block_table, cu_seqlens_q, cache_seqlens, seq_lens
        self.max_q, self.max_k = max_seqlen_q, max_seqlen_k

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, window: int | None, sinks: Tensor,
               softmax_scale: float) -> Tensor:
        kc, vc = self.k[layer], self.v[layer]
        ops.paged_kv_append(kc, vc, k.to(kc.dtype), v.to(vc.dtype), self.block_table, self.cu_q, self.cache_seqlens)
        return ops.paged_attention(q, kc, vc, self.block_table, self.cu_q, self.seq_lens, self.max_q, self.max_k,
                                   causal=True, window=window, sinks=sinks, softmax_scale=softmax_scale)


class Engine:
    """Generates from ``model`` (an ``ossrl.model.GptOss``) with continuous batching.

    max_cache_tokens: KV cache capacity in tokens (all sequences together); block_size: tokens per
    cache block; max_batch: sequences per step; step_tokens: tokens per forward pass (prefill
    chunking); seed: the sampling generator's seed (``generate(seed=...)`` reseeds).
    """

    def __init__(self, model, *, max_cache_tokens: int = 65536, block_size: int = 16, max_batch: int = 256,
                 step_tokens: int = 8192, seed: int = 0, dtype: torch.dtype | None = None):
        if block_size < 1 or max_cache_tokens < block_size or max_batch < 1 or step_tokens < 1:
            raise ValueError("Engine: need block_size >= 1, max_cache_tokens >= block_size, max_batch >= 1, step_tokens >= 1")
        self.model = model
        cfg = model.config
        self.num_layers, self.kv_heads, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        p = next(model.parameters())
        self.device, self.dtype = p.device, dtype or p.dtype
        self.block_size, self.num_blocks = block_size, max_cache_tokens // block_size
        self.max_batch, self.step_tokens = max_batch, step_tokens
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache: PagedKVCache | None = None
        self._ids = itertools.count()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._kept: dict[int, _Seq] = {}
        self._reserved = 0
        self._rejected: list[_Seq] = []  # finished by _admit, reported by the next step
        self.stats = {"steps": 0, "forward_tokens": 0, "generated_tokens": 0, "preemptions": 0}
        # Record each fed token's experts in every MoE layer (Completion.routing): routing replay
        # and the routing-agreement metric. One small copy to the host per step.
        self.record_routing = False

    # ---- memory ----

    def allocate_cache(self) -> None:
        if self.cache is None:
            self.cache = PagedKVCache(self.num_layers, self.num_blocks, self.block_size, self.kv_heads, self.head_dim,
                                      self.device, self.dtype)

    def reset(self) -> None:
        """Drops every request and the cache: the way back to a clean engine after a failure
        (an exception or out-of-memory inside a step). Handles become invalid."""
        self._waiting, self._running, self._rejected = [], [], []
        self._kept.clear()
        self._reserved = 0
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_cache(self) -> None:
        """Frees the KV cache (kept sequences are dropped: their handles become invalid)."""
        if self._running or self._waiting:
            raise RuntimeError("Engine.release_cache: requests are still running")
        self._kept.clear()
        self._reserved = 0
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    # ---- requests ----

    def add_request(self, prompt: list[int] | Resume, params: SamplingParams, *, keep: bool = False,
                    seed: int | None = None) -> _Seq:
        """Queues a prompt (or a Resume). seed: give this sequence its own sampling stream, so what
        it samples does not depend on what else is in the batch (a resumed sequence keeps its
        stream)."""
        if isinstance(prompt, Resume):
            seq = self._kept.pop(prompt.handle, None)
            if seq is None:
                raise ValueError(f"Engine: unknown or released handle {prompt.handle}")
            last = seq.out.tokens[-1:] if seq.out and seq.out.tokens else []
            seq.pending = seq.pending + last + list(prompt.tokens)
        else:
            if len(prompt) == 0:
                raise ValueError("Engine: a prompt needs at least one token")
            seq = _Seq(next(self._ids), params, list(prompt))
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in seq.pending):
            raise ValueError(f"Engine: token ids must be in [0, {vocab})")
        seq.params, seq.keep = params, keep
        if seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        seq.out = Completion([], [], "length")
        if self.record_routing:
            seq.out.routing = seq.routing
        seq.limit = min(seq.cached + len(seq.pending) + params.max_new_tokens, self.capacity_tokens)
        self._waiting.append(seq)
        return seq

    def release(self, handle: int) -> None:
        seq = self._kept.pop(handle, None)
        if seq is not None:
            self._free(seq)

    def abort(self, seq: _Seq) -> Completion:
        """Stops a queued or running request now and frees its cache; returns what it generated
        so far (finish_reason "aborted"). The rollout pauses stragglers this way: their tokens
        and log-probs are kept, their KV is dropped and recomputed when they resume."""
        if seq in self._running:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        else:
            raise ValueError(f"Engine.abort: request {seq.id} is not queued or running")
        self._free(seq)
        seq.pending = []
        seq.out.finish_reason = "aborted"
        return seq.out

    def _finish(self, seq: _Seq) -> None:
        if seq.keep and seq.out.finish_reason != "rejected":
            self._kept[seq.id] = seq
            seq.out.handle = seq.id
            self._reserved -= seq.reserved - len(seq.blocks)  # keep the blocks, not the promise
            seq.reserved = len(seq.blocks)
        else:
            self._free(seq)

    def _free(self, seq: _Seq) -> None:
        if self.cache is not None:
            self.cache.free.extend(reversed(seq.blocks))
        self._reserved -= seq.reserved
        seq.blocks, seq.reserved = [], 0

    def _admit(self) -> None:
        self._admit_fitting()
        # Nothing can run, yet requests wait: resumed sequences hold cache blocks that none of them
        # can grow into, or kept sequences (waiting on their tool calls) hold the cache. Preempt by
        # recomputation: drop one sequence's cache (its tokens are fed again when it runs next),
        # waiting ones first, then kept ones, most recently kept first (whose tool call started
        # last), until something fits. Decoding goes on instead of waiting for slow tools.
        while not self._running and self._waiting:
            holders = [s for s in self._waiting if s.blocks] or [s for s in self._kept.values() if s.blocks]
            if not holders:
                break
            self._preempt(holders[-1])
            self._admit_fitting()

    def _preempt(self, seq: _Seq) -> None:
        self._free(seq)
        seq.pending = seq.fed + seq.pending
        seq.fed, seq.cached = [], 0
        self.stats["preemptions"] += 1

    def _admit_fitting(self) -> None:
        still = []
        for seq in self._waiting:
            total = seq.cached + len(seq.pending)
            if total + 1 > self.capacity_tokens:  # the prompt itself cannot fit: never will
                seq.out.finish_reason = "rejected"
                seq.pending = []
                self._finish(seq)
                self._rejected.append(seq)
                continue
            need = self._blocks_for(seq.limit) - seq.reserved
            if len(self._running) < self.max_batch and self._reserved + need <= self.num_blocks:
                seq.reserved += need
                self._reserved += need
                self._running.append(seq)
            else:
                still.append(seq)
        self._waiting = still

    # ---- stepping ----

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    def can_step(self) -> bool:
        """Whether ``step`` would run a forward pass now (admitting what fits first, preempting
        what holds the cache if nothing fits)."""
        self.allocate_cache()
        self._admit()
        return bool(self._running or self._rejected)

    @torch.no_grad()
    def step(self) -> list[_Seq]:
        """One packed forward pass; returns the sequences that finished in it (rejected ones too)."""
        self.allocate_cache()
        self._admit()
        rejected, self._rejected = self._rejected, []
        if not self._running:
            if self._waiting and not rejected:  # _admit preempts until something fits: an engine bug
                raise RuntimeError(
                    f"Engine: internal error: {len(self._waiting)} request(s) not admitted with "
                    f"{len(self.cache.free)} of {self.num_blocks} cache blocks free")
            return rejected
        batch, chunks, budget = [], [], self.step_tokens
        for seq in self._running:
            if budget <= 0:
                break
            n = min(len(seq.pending), budget)
            budget -= n
            while len(seq.blocks) * self.block_size < seq.cached + n:
                seq.blocks.append(self.cache.free.pop())
            batch.append(seq)
            chunks.append(seq.pending[:n])

        dev = self.device
        lens = [len(c) for c in chunks]
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
        cached = torch.tensor([s.cached for s in batch], dtype=torch.int32, device=dev)
        seq_lens = cached + torch.tensor(lens, dtype=torch.int32, device=dev)
        width = max(len(s.blocks) for s in batch)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in batch], dtype=torch.int32, device=dev)
        ids = torch.tensor(list(itertools.chain.from_iterable(chunks)), dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(s.cached, s.cached + n, device=dev) for s, n in zip(batch, lens)])
        self.cache.set_step(table, cu, cached, seq_lens, max(lens), max(s.cached + n for s, n in zip(batch, lens)))
        tape = None
        if self.record_routing and self.model.config.num_local_experts <= 256:  # ids fit a byte
            from ..model.gpt_oss import RoutingTape

            tape = RoutingTape()
        with self.model.routing_tape(tape):
            hidden = self.model(ids, cu, max_seqlen=max(lens), position_ids=positions, kv_cache=self.cache,
                                return_hidden=True)
        if tape is not None and tape.recorded:  # (T, layers, k) experts, split by sequence
            rec = torch.stack([tape.recorded[i] for i in sorted(tape.recorded)], dim=1).to(torch.uint8).cpu()
            flat = rec.numpy().tobytes()
            width = rec.shape[1] * rec.shape[2]
            start = 0
            for seq, n in zip(batch, lens):
                seq.routing += flat[start * width:(start + n) * width]
                start += n

        sample_rows, sample_seqs = [], []
        for seq, n, end in zip(batch, lens, itertools.accumulate(lens)):
            seq.cached += n
            seq.fed += seq.pending[:n]
            seq.pending = seq.pending[n:]
            if not seq.pending:  # prompt fully fed: the last row predicts the next token
                sample_rows.append(end - 1)
                sample_seqs.append(seq)
        self.stats["steps"] += 1
        self.stats["forward_tokens"] += sum(lens)

        finished = []
        if sample_seqs:
            logits = self.model.lm_head(hidden[sample_rows]).float()
            tokens, logprobs, tops = self._sample(logits, sample_seqs)
            for seq, tok, lp, top in zip(sample_seqs, tokens, logprobs, tops):
                seq.out.tokens.append(tok)
                seq.out.logprobs.append(lp)
                if top is not None:
                    seq.out.top_logprobs = (seq.out.top_logprobs or []) + [top]
                self.stats["generated_tokens"] += 1
                if tok in seq.params.stop_token_ids:
                    seq.out.finish_reason = "stop"
                elif seq.cached + 1 >= seq.limit:
                    seq.out.finish_reason = "length"
                else:
                    seq.pending = [tok]
                    continue
                finished.append(seq)
        for seq in finished:
            self._running.remove(seq)
            self._finish(seq)
        return rejected + finished

    def _sample(self, logits: Tensor, seqs: list[_Seq]) -> tuple[list[int], list[float], list]:
        logp = torch.log_softmax(logits, dim=-1)
        k = max(s.params.top_logprobs for s in seqs)
        tops: list = [None] * len(seqs)
        if k:
            values, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            values, ids = values.tolist(), ids.tolist()
            tops = [list(zip(ids[i], values[i]))[: s.params.top_logprobs] if s.params.top_logprobs else None
                    for i, s in enumerate(seqs)]
        chosen = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        shared = {}
        for i, s in enumerate(seqs):
            if s.generator is not None:  # its own stream: one draw per row
                chosen[i:i + 1] = sample_tokens(logits[i:i + 1], s.params, s.generator)
            else:
                shared.setdefault(s.params, []).append(i)
        for p, idx in shared.items():  # one vectorised draw per distinct parameter set
            rows = torch.tensor(idx, device=logits.device)
            chosen[rows] = sample_tokens(logits[rows], p, self.generator)
        return chosen.tolist(), logp.gather(1, chosen[:, None]).squeeze(1).tolist(), tops

    # ---- the simple entry point ----

    def generate(self, prompts: list[list[int] | Resume], params: SamplingParams, *, keep: bool = False,
                 seed: int | None = None, seeds: list[int | None] | None = None, progress=None) -> list[Completion]:
        """Generates a completion for every prompt (token-id lists, or Resume for kept sequences).

        keep=True keeps each finished sequence's cache for a later Resume (Completion.handle).
        seed reseeds the engine's shared sampling stream; seeds gives each prompt its own.
        """
        if seed is not None:
            self.generator.manual_seed(seed)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"Engine.generate: {len(seeds)} seeds for {len(prompts)} prompts")
        seqs = [self.add_request(p, params, keep=keep, seed=seeds[i] if seeds else None)
                for i, p in enumerate(prompts)]
        while self.has_unfinished():
            done = self.step()
            if progress is not None:
                progress(len(done))
        return [seq.out for seq in seqs]


def sample_tokens(logits: Tensor, p: SamplingParams, generator: torch.Generator) -> Tensor:
    """Draws one token per row of logits (rows, vocab) float32 under temperature, top-k, top-p."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / p.temperature
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (keep at least one)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
