"""The GPT-OSS architecture on ossrl's kernels, for packed sequences.

Tokens of several sequences are packed into one (T,) tensor with ``cu_seqlens`` (B+1,) int32
marking where each sequence starts; there is no padding and no batch dimension anywhere.

    x = embed(ids)
    for each layer:   x = x + attention(rmsnorm(x))     sliding-window (128) or full causal,
                                                         GQA, YaRN rotary, learned sinks
                      x = x + moe(rmsnorm(x))           top-k router, clamped-SwiGLU experts
    logits = lm_head(rmsnorm(x))

Parameter names are those of Hugging Face's ``GptOssForCausalLM`` (``model.layers.N.self_attn.
q_proj.weight``, ``model.layers.N.mlp.experts.gate_up_proj``, ...), so a checkpoint loads by name.
Attention is ``ossrl.ops.varlen_attention`` (or, when decoding, whatever the ``kv_cache`` object
does); the experts are ``ossrl.ops.moe_route`` + ``ossrl.ops.moe_experts``.
"""

from __future__ import annotations

import contextlib

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from .config import GptOssConfig, RopeConfig

__all__ = ["GptOss", "KVCache", "rope_inv_freq", "positions_from_cu_seqlens"]


# ---- rotary embedding ----


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) float32 and the cos/sin scale, computed as transformers
    computes them (same float32 operations, so the tables agree bit for bit)."""
    dim = head_dim
    cpu = torch.device("cpu")  # explicit: the model may be built under `with torch.device("meta")`
    if rope.type == "default":
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=cpu).float() / dim))
        return inv_freq, 1.0

    # YaRN: interpolate (divide by factor) the low frequencies, keep the high ones, ramp between.
    base, factor = rope.theta, rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (dim * math.log(rope.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=cpu) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where the original frequency is kept

    pos_freqs = base ** (torch.arange(0, dim, 2, device=cpu).to(dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables for given positions; applied to q and k as GPT-OSS does (halves, not pairs)."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(config.rope, config.head_dim)
        # Not a buffer: model.to(bfloat16) must not round the frequencies, and loading a model built on
        # the meta device must not lose them. A copy per device is kept on first use.
        self._inv_freq = {inv_freq.device: inv_freq}

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (T,) int -> cos, sin (T, head_dim/2) float32."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq[positions.device] = next(iter(self._inv_freq.values())).to(positions.device)
        freqs = positions[:, None].float() * inv_freq
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (T, H, D); cos, sin (T, D/2) float32. Rotates (x[:D/2], x[D/2:]) pairs, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every packed token within its own sequence: 0, 1, ... restarting at each start.
    No host synchronisation (repeat_interleave is given the output size)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


# ---- blocks ----


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class KVCache(Protocol):
    """What the attention layers need from a decoding cache (the rollout engine provides it).

    ``attend`` stores this step's keys and values for layer ``layer`` (post-rotary, (T, Hkv, D),
    packed like the queries) and returns attention of ``q`` (T, Hq, D) over each sequence's cached
    history plus the new tokens, with the layer's window and sinks: e.g. ``paged_kv_append`` then
    ``paged_attention``. The cache also decides the positions of the new tokens (see
    ``GptOss.forward(position_ids=...)``).
    """

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, window: int | None, sinks: Tensor,
               softmax_scale: float) -> Tensor: ...


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.window = config.window(layer)
        self.scale = self.head_dim ** -0.5
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))  # one learned logit per head
        self.context = None  # a ContextShard while GptOss.context_shard is active (context parallelism)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                kv_cache: KVCache | None = None) -> Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.n_kv_heads, self.head_dim)
        if kv_cache is None and self.context is not None:
            o = self.context.attend(q, k, v, window=self.window, sinks=self.sinks, softmax_scale=self.scale)
        elif kv_cache is None:
            o = ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     window=self.window, sinks=self.sinks, softmax_scale=self.scale)
        else:
            o = kv_cache.attend(self.layer, q, k, v, window=self.window, sinks=self.sinks, softmax_scale=self.scale)
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class Experts(nn.Module):
    """Hugging Face layouts: gate_up_proj (E, H, 2I) with gate/up interleaved, down_proj (E, I, H)."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))


class RoutingTape:
    """What the MoE layers of one forward pass chose, and what they are told to choose.

    ``given`` (T, L, k) int32: experts recorded earlier for each token and layer (the rollout's),
    -1 where none was recorded. With ``replay``, every token with a record is routed to exactly
    those experts (weights: the softmax of this forward's router logits there, so the router
    still learns; ``ops.moe_route_given``); tokens without one use this forward's top-k. Either
    way the layers count how often their own top-k set equals the record (``agreement``), and
    ``recorded`` keeps each layer's chosen experts (T, k) (what the engine stores). A layer run
    again by activation checkpointing in the backward pass counts once."""

    def __init__(self, given: Tensor | None = None, replay: bool = False):
        self.given, self.replay = given, replay and given is not None
        self.recorded: dict[int, Tensor] = {}
        self.agree: Tensor | None = None  # token-layer pairs whose top-k set equals the record
        self.compared: Tensor | None = None  # token-layer pairs with a record

    def route(self, layer: int, logits: Tensor, top_k: int):
        own = ops.moe_route(logits, top_k)
        first = layer not in self.recorded
        given = None if self.given is None else self.given[:, layer]
        if given is not None and first:
            has = given[:, 0] >= 0
            same = (torch.sort(own.experts, dim=-1).values == torch.sort(given, dim=-1).values).all(-1) & has
            a, c = same.sum(), has.sum()
            self.agree = a if self.agree is None else self.agree + a
            self.compared = c if self.compared is None else self.compared + c
        routing = own
        if self.replay:
            routing = ops.moe_route_given(logits, torch.where(given >= 0, given, own.experts))
        if first:
            self.recorded[layer] = routing.experts.detach()
        return routing


class MoE(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.tape: RoutingTape | None = None  # set for one forward by GptOss.routing_tape
        self.expert_shard = None  # an ExpertShard when the experts are split across ranks (expert parallelism)
        self.top_k = config.num_experts_per_tok
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = Experts(config)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.router(x)
        tape = self.tape
        routing = ops.moe_route(logits, self.top_k) if tape is None else tape.route(self.layer, logits, self.top_k)
        e = self.experts
        # Under expert parallelism the weights are DTensors holding this rank's experts.
        w = [p.to_local() if hasattr(p, "to_local") else p
             for p in (e.gate_up_proj, e.gate_up_proj_bias, e.down_proj, e.down_proj_bias)]
        run = ops.moe_experts if self.expert_shard is None else self.expert_shard.experts
        return run(x, routing, *w, swiglu_alpha=self.alpha, swiglu_limit=self.limit)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's ``model.`` prefix: embedding, layers, final norm."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---- the model ----


class GptOss(nn.Module):
    """GPT-OSS for causal LM over packed sequences. Built with random weights (``init_weights``);
    ``ossrl.model.load_pretrained`` fills it from a Hugging Face checkpoint instead."""

    def __init__(self, config: GptOssConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(config)
        # Recompute each layer in the backward pass instead of keeping its activations: memory
        # for long trajectories at the cost of one more forward. Set by the trainer.
        self.activation_checkpointing = False
        self._context = None  # see context_shard
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """transformers' initialisation: normal(0, std) for matrices, router bias and sinks; zeros for
        the other biases; ones for the norms. A no-op for parameters on the meta device."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("proj.bias", "proj_bias")):
                p.zero_()
            else:  # weights, embedding, router bias, sinks
                p.normal_(0.0, std)

    @contextlib.contextmanager
    def routing_tape(self, tape: RoutingTape | None):
        """Every MoE layer records into / replays from ``tape`` while the block runs (forward,
        and the backward pass with activation checkpointing: keep the block around both)."""
        layers = [m for m in self.modules() if isinstance(m, MoE)]
        for m in layers:
            m.tape = tape
        try:
            yield tape
        finally:
            for m in layers:
                m.tape = None

    @contextlib.contextmanager
    def context_shard(self, shard):
        """Every attention layer attends through ``shard`` (a :class:`~ossrl.model.distributed.ContextShard`:
        this rank's piece of a packed batch under context parallelism) while the block runs; the
        rotary positions default to the piece's. Keep the block around the backward too."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        self._context = shard
        for m in layers:
            m.context = shard
        try:
            yield shard
        finally:
            self._context = None
            for m in layers:
                m.context = None

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor,
        *,
        max_seqlen: int | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """input_ids (T,) int64 packed; cu_seqlens (B+1,) int32 -> logits (T, vocab) in the model dtype.

        max_seqlen: the longest sequence (computed from cu_seqlens when None: one host sync).
        position_ids (T,): rotary positions; default: each sequence counts from 0 (decoding passes the
        cached lengths' offsets). kv_cache: see :class:`KVCache`; None = plain varlen attention.
        return_hidden: return the final-norm hidden states (T, hidden) instead of logits.
        """
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen=max_seqlen, position_ids=position_ids,
                               kv_cache=kv_cache)
        return h if return_hidden else self.lm_head(h)

    def hidden_states(self, input_ids: Tensor, cu_seqlens: Tensor, *, max_seqlen: int | None = None,
                      position_ids: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """Everything but the lm_head: (T, hidden), after the final norm."""
        if input_ids.dim() != 1:
            raise ValueError(f"GptOss: input_ids must be 1-D (packed tokens), got shape {tuple(input_ids.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("GptOss: cu_seqlens must be a 1-D int32 tensor (B+1,)")
        t = input_ids.shape[0]
        if position_ids is None and self._context is not None:
            position_ids = self._context.positions
        elif position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, t)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        cos, sin = self.rotary(position_ids)
        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for layer in self.model.layers:
            if recompute:
                x = checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, kv_cache)
        return self.model.norm(x)

    def token_logprobs(self, input_ids: Tensor, cu_seqlens: Tensor, targets: Tensor, *,
                       max_seqlen: int | None = None, chunk_size: int = 1024) -> Tensor:
        """log p(targets[t] | tokens up to t) for every packed position t: (T,) float32.

        targets (T,) int64, usually each sequence's ids shifted left by one (the caller decides what
        the last position of a sequence predicts and masks it). The vocabulary projection and the
        float32 log-softmax run chunk_size rows at a time; under autograd each chunk is recomputed in
        the backward pass instead of keeping its (chunk, vocab) logits alive. Differentiable.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(f"GptOss.token_logprobs: targets {tuple(targets.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen=max_seqlen)
        out = []
        for s in range(0, h.shape[0], chunk_size):
            hc, tc = h[s:s + chunk_size], targets[s:s + chunk_size]
            if torch.is_grad_enabled() and hc.requires_grad:
                out.append(checkpoint(self._chunk_logprobs, hc, tc, use_reentrant=False))
            else:
                out.append(self._chunk_logprobs(hc, tc))
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def _chunk_logprobs(self, h: Tensor, targets: Tensor) -> Tensor:
        logits = F.linear(h, self.lm_head.weight).float()
        return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
