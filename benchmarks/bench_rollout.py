"""Rollout throughput: ossrl's engine against transformers' ``generate`` on the same model and prompts.

Both get the same weights (ours saved with ``save_pretrained``, loaded by transformers), the same
prompts of mixed lengths and greedy decoding for a fixed number of new tokens (no early stop), so
the work is identical. Reports generated tokens per second and time to first token per batch size.

    python benchmarks/bench_rollout.py                   # tiny config on the CPU
    python benchmarks/bench_rollout.py --device cuda --layers 4 --hidden 2880   # GPT-OSS-20b-shaped layers
    python benchmarks/bench_rollout.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time

import torch

import ossrl
from ossrl.model import GptOss, GptOssConfig, save_pretrained
from ossrl.rollout.engine import Engine, SamplingParams
from _peers import transformers_available  # noqa: E402  (benchmarks/, beside this script)


def fmt(x, spec):
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def ours(model, prompts, new_tokens, device):
    eng = Engine(model, max_cache_tokens=max(4096, sum(len(p) + new_tokens for p in prompts) + 1024))
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    eng.allocate_cache()
    sync(device)
    t0 = time.perf_counter()
    first = None
    for p in prompts:
        eng.add_request(p, params)
    while eng.has_unfinished():
        eng.step()
        if first is None and eng.stats["generated_tokens"] >= len(prompts):
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    return time.perf_counter() - t0, first


def theirs(hf, prompts, new_tokens, device):
    # Left padding: the batch is one tensor, as generate() needs.
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(device)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    return time.perf_counter() - t0, first


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default 1 4 16 64, and 256 on GPU)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="hidden = intermediate size (default: the tiny config)")
    p.add_argument("--json")
    a = p.parse_args()
    gpu = a.device == "cuda"
    overrides = {}
    if a.layers:
        overrides["num_hidden_layers"] = a.layers
    if a.hidden:
        overrides.update(hidden_size=a.hidden, intermediate_size=a.hidden, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4)
    cfg = GptOssConfig.tiny(**overrides)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    model = GptOss(cfg).to(device=a.device, dtype=dtype).eval()
    hf = None
    if transformers_available('transformers', 'GptOssForCausalLM', 'the transformers rows'):
        from transformers import GptOssForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d)
            hf = GptOssForCausalLM.from_pretrained(d, dtype=dtype).to(a.device).eval()
        if not gpu:
            hf.set_experts_implementation("eager")  # grouped_mm's CPU path rejects small odd shapes
    batches = a.batch or ([1, 4, 16, 64, 256] if gpu else [1, 4, 16, 64])
    rng = random.Random(0)
    header = (f"ossrl {ossrl.__version__} | torch {torch.__version__} | "
              f"{torch.cuda.get_device_name() if gpu else platform.machine()} | {dtype} | layers {cfg.num_hidden_layers}, "
              f"hidden {cfg.hidden_size}, {cfg.num_local_experts} experts | {a.new_tokens} new tokens, greedy")
    print(header)
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'speedup':>8} {'ours TTFT ms':>13} {'hf TTFT ms':>11}")
    rows = []
    with torch.no_grad():
        for b in batches:
            prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.randint(16, 128))] for _ in range(b)]
            ours(model, prompts[:1], 2, a.device)  # warm-up
            o_s, o_first = ours(model, prompts, a.new_tokens, a.device)
            row = dict(batch=b, ours_tok_s=b * a.new_tokens / o_s, ours_ttft_ms=o_first * 1e3)
            if hf is not None:
                h_s, h_first = theirs(hf, prompts, a.new_tokens, a.device)
                row.update(hf_tok_s=b * a.new_tokens / h_s, hf_ttft_ms=h_first * 1e3)
                row["speedup"] = row["ours_tok_s"] / row["hf_tok_s"]
            rows.append(row)
            print(f"{b:>5} {row['ours_tok_s']:>11.1f} {fmt(row.get('hf_tok_s'), '10.1f')}"
                  f" {fmt(row.get('speedup'), '8.2f')} {row['ours_ttft_ms']:>13.1f}"
                  f" {fmt(row.get('hf_ttft_ms'), '11.1f')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
