"""ossrl serve against the obvious alternative, through the official openai client.

    python benchmarks/bench_serve.py [--concurrency 1 16 64] [--max-tokens 32] [--json out.json]

The same prompts (``/v1/completions``, streamed, greedy, the same token ids) go to two servers
on 127.0.0.1 built on the same HTTP stack (Starlette + uvicorn), in this process:

* ``ossrl serve`` (``ossrl.serve.create_app``): every request is a sequence of the engine's
  continuous batch, one packed forward pass per step over all of them;
* the alternative a user would write: transformers' ``GptOssForCausalLM.generate`` (with a
  ``TextIteratorStreamer`` for streaming) behind the same framework, one request at a time.

For each concurrency: requests per second, generated tokens per second, and time to first
token (the first streamed text) p50 / p99. Same weights (the tiny model, or ``--model``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _peers import transformers_available  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app) -> tuple[object, str]:
    import uvicorn

    port = _port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    return srv, f"http://127.0.0.1:{port}/v1"


def transformers_app(hf, tokenizer, model_name: str):
    """transformers' generate behind Starlette: one request at a time, streamed with TextIteratorStreamer."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from transformers import TextIteratorStreamer

    lock = asyncio.Lock()

    class Tok:  # the minimal tokenizer interface TextIteratorStreamer needs
        def decode(self, ids, **kw):
            ids = [ids] if isinstance(ids, int) else ids
            return tokenizer.decode([int(i) for i in ids])

    async def completions(request):
        body = await request.json()
        ids = tokenizer.encode(body["prompt"], allow_special=True)
        n = int(body.get("max_tokens", 16))
        stops = list(tokenizer.stop_token_ids)

        def generate(streamer=None):
            x = torch.tensor([ids])
            with torch.no_grad():
                return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                   eos_token_id=stops, pad_token_id=0, streamer=streamer)[0, len(ids):].tolist()
        head = {"id": "cmpl-hf", "object": "text_completion", "created": int(time.time()), "model": model_name}
        if not body.get("stream"):
            async with lock:
                out = await asyncio.to_thread(generate)
            return JSONResponse({**head, "choices": [{"index": 0, "text": tokenizer.decode(out), "finish_reason": "length",
                                                      "logprobs": None}],
                                 "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                                           "total_tokens": len(ids) + len(out)}})

        async def stream():
            async with lock:  # one generate at a time: what a plain generate() server does
                streamer = TextIteratorStreamer(Tok(), skip_prompt=True)
                box = {}
                th = threading.Thread(target=lambda: box.setdefault("out", generate(streamer)))
                th.start()
                it = iter(streamer)
                while True:
                    piece = await asyncio.to_thread(next, it, None)
                    if piece is None:
                        break
                    if piece:
                        yield "data: " + json.dumps({**head, "choices": [{"index": 0, "text": piece, "finish_reason": None,
                                                                          "logprobs": None}]}) + "\n\n"
                await asyncio.to_thread(th.join)
                out = box.get("out", [])
            yield "data: " + json.dumps({**head, "choices": [], "usage": {
                "prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")
    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    ttft, tokens = [], []

    async def one(p: str):
        async with sem:
            t0 = time.perf_counter()
            first = None
            n = 0
            stream = await client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            ttft.append(first if first is not None else time.perf_counter() - t0)
            tokens.append(n)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    q = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else [ttft[0]] * 99
    return {"requests": len(prompts), "wall_s": wall, "requests_per_s": len(prompts) / wall,
            "generated_tokens_per_s": sum(tokens) / wall, "generated_tokens": sum(tokens),
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * q[98]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests", type=int, default=0, help="per concurrency (default: max(16, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from ossrl.model import save_pretrained
    from ossrl.serve import create_app, load_for_serving

    model, tok, name, preamble = load_for_serving(a.model)
    ours_srv, ours_url = start(create_app(model, tok, model_name=name, preamble=preamble, max_cache_tokens=1 << 17,
                                          max_requests=4096))
    peer_url = None
    if transformers_available("transformers", "GptOssForCausalLM", "the transformers column"):
        from transformers import GptOssForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d)
            hf = GptOssForCausalLM.from_pretrained(d, dtype=next(model.parameters()).dtype).to(
                next(model.parameters()).device).eval()
        if next(model.parameters()).device.type == "cpu":
            hf.set_experts_implementation("eager")
        _, peer_url = start(transformers_app(hf, tok, name))
    base = "<|start|>user<|message|>Question {i}: what is {i} + {j}?<|end|><|start|>assistant"
    rows = []
    for c in a.concurrency:
        n = a.requests or max(16, 2 * c)
        prompts = [base.format(i=i, j=i * 7 % 13) for i in range(n)]
        ours = asyncio.run(load(ours_url, prompts, c, a.max_tokens, name))
        peer = asyncio.run(load(peer_url, prompts, c, a.max_tokens, name)) if peer_url else None
        rows.append({"concurrency": c, "ossrl": ours, "transformers": peer})
    dev = next(model.parameters()).device
    print(f"torch {torch.__version__} | {dev} | model {name} | {a.max_tokens} new tokens per request, greedy, streamed")
    print(f"{'conc':>5} {'server':<13} {'req/s':>8} {'gen tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for r in rows:
        for key in ("ossrl", "transformers"):
            m = r[key]
            if m:
                print(f"{r['concurrency']:>5} {key:<13} {m['requests_per_s']:>8.2f} {m['generated_tokens_per_s']:>10.0f} "
                      f"{m['ttft_p50_ms']:>12.1f} {m['ttft_p99_ms']:>12.1f}")
        if r["transformers"]:
            print(f"{'':>5} {'ossrl / hf':<13} {r['ossrl']['requests_per_s'] / r['transformers']['requests_per_s']:>8.2f} "
                  f"{r['ossrl']['generated_tokens_per_s'] / max(r['transformers']['generated_tokens_per_s'], 1e-9):>10.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(dev), "torch": torch.__version__, "max_tokens": a.max_tokens, "rows": rows}, f, indent=1)
    ours_srv.should_exit = True


if __name__ == "__main__":
    main()
