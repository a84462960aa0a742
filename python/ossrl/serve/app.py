"""``ossrl serve``: an OpenAI-compatible HTTP server over the rollout engine (Starlette + uvicorn).

    GET  /health               {"status": "ok"}
    GET  /v1/models            the served model
    POST /v1/chat/completions  messages -> harmony -> engine -> content / reasoning_content / tool_calls
    POST /v1/completions       raw text or token ids in, text out

Every request is one or more engine sequences (``n``) batched with all others by the engine
thread (:mod:`ossrl.serve.runner`). Bad requests get OpenAI-style error bodies (400, 404 for an
unknown model, 413 for a body over ``max_body_bytes``, 429 over ``max_requests`` in flight) and
the server keeps serving; a streaming client that disconnects has its sequences cancelled and
their cache freed; on shutdown (SIGTERM) what runs is cancelled and the engine thread stops.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import asynccontextmanager
from typing import Any

from ..rollout.engine import Engine, SamplingParams
from .protocol import (APIError, Generation, chat_message, chat_request, completion_request, logprobs_block, new_id,
                       now, text_logprobs)
from .runner import EngineRunner, Overloaded

__all__ = ["create_app", "serve"]


def _starlette():
    try:
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise SystemExit("ossrl serve needs starlette and uvicorn: pip install 'ossrl[serve]'") from None
    return Starlette, ClientDisconnect, JSONResponse, StreamingResponse, Route


def _visible(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in tokenizer.special_ids])


class _Choice:
    """What one sequence sampled so far, and whether a stop string ended it."""

    def __init__(self, stops: list[str]):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list = []
        self.finish: str | None = None
        self.stopped = False
        self.stops = stops

    def add(self, ids, lps, tops) -> None:
        self.tokens += ids
        self.logprobs += lps
        self.tops += tops or [[] for _ in ids]


def _settled(text: str) -> str:
    """Text without its trailing U+FFFD: while a stream goes on, those may be the first bytes
    of a character that the next tokens complete."""
    return text.rstrip("\ufffd")


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def create_app(model, tokenizer, *, model_name: str = "ossrl", preamble: bool = True, max_cache_tokens: int = 65536,
               max_requests: int = 512, max_body_bytes: int = 8 << 20, any_model: bool = False, seed: int = 0,
               runner: EngineRunner | None = None, book=None):
    """The ASGI app for ``model`` (a GptOss) and its tokenizer. ``preamble``: render chats with
    the harmony system message and tool declarations (off for a model trained without them).
    ``any_model``: accept any ``model`` name (the colocated trainer's clients). ``book``: the
    trainer's episode recorder (``/episodes/{eid}/v1/...`` routes; see ossrl.train.agents)."""
    Starlette, ClientDisconnect, JSONResponse, StreamingResponse, Route = _starlette()
    model.eval()
    if runner is None:
        runner = EngineRunner(Engine(model, max_cache_tokens=max_cache_tokens, seed=seed), max_requests=max_requests)
    engine = runner.engine
    context = min(engine.capacity_tokens, getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    names = (model_name,)

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"the request body is larger than {max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise APIError(413, f"the request body is larger than {max_body_bytes} bytes")
        try:
            return json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    def submit(gen: Generation):
        params = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_tokens,
                                stop_token_ids=tokenizer.stop_token_ids, top_logprobs=gen.top_logprobs)
        reqs = []
        try:
            for i in range(gen.n):
                reqs.append(runner.submit(gen.prompt, params, seed=None if gen.seed is None else gen.seed + i))
        except Overloaded as e:
            for r in reqs:
                runner.cancel(r)
            raise APIError(429, str(e), kind="rate_limit_error", code="rate_limit_exceeded") from None
        return reqs

    def stop_hit(ch: _Choice, chat: bool) -> bool:
        if not ch.stops:
            return False
        return _cut(_visible(tokenizer, ch.tokens), ch.stops)[1]

    async def events(reqs, gen: Generation, chat: bool):
        """(index, choice, finished) each time a choice has new tokens or ends."""
        merged: asyncio.Queue = asyncio.Queue()
        choices = [_Choice(gen.stop) for _ in reqs]

        async def forward(i, req):
            while True:
                ev = await req.events.get()
                await merged.put((i, ev))
                if ev[0] != "tokens":
                    return
        tasks = [asyncio.ensure_future(forward(i, r)) for i, r in enumerate(reqs)]
        try:
            left = len(reqs)
            while left:
                i, ev = await merged.get()
                ch = choices[i]
                if ev[0] == "tokens":
                    ch.add(*ev[1:])
                    if ch.finish is None and stop_hit(ch, chat):
                        ch.stopped, ch.finish = True, "stop"
                        runner.cancel(reqs[i])
                        yield i, ch, True
                        continue
                    if ch.finish is None:
                        yield i, ch, False
                elif ev[0] == "error":
                    raise APIError(500, ev[1], kind="server_error")
                else:
                    left -= 1
                    if ch.finish is None:
                        ch.finish = ev[1]
                        yield i, ch, True
        finally:
            for t in tasks:
                t.cancel()
            for r in reqs:
                runner.cancel(r)

    def chat_choice(ch: _Choice, gen: Generation, index: int) -> dict:
        msg, finish = chat_message(tokenizer, gen.prefix, ch.tokens, ch.finish or "length", ch.stopped)
        if ch.stopped and isinstance(msg.get("content"), str):
            msg["content"] = _cut(msg["content"], gen.stop)[0]
        out = {"index": index, "message": msg, "finish_reason": finish,
               "logprobs": logprobs_block(tokenizer, ch.tokens, ch.logprobs, ch.tops, gen.top_logprobs)
               if gen.logprobs else None}
        return out

    def usage(gen: Generation, choices) -> dict:
        done = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": len(gen.prompt), "completion_tokens": done, "total_tokens": len(gen.prompt) + done}

    def episode(request):
        eid = request.path_params.get("eid")
        if eid is None:
            return None
        if book is None or not book.known(eid):
            raise APIError(404, f"unknown episode {eid[:64]!r}", kind="not_found_error")
        return eid

    async def chat(request):
        try:
            eid = episode(request)
            body = await body_of(request)
            gen = chat_request(body, tokenizer, model_names=names, context=context,
                               preamble=preamble, any_model=any_model)
            if eid is not None:  # the episode's exact tokens so far, when the messages extend them
                gen.prompt = book.prompt(eid, body, gen)
                if len(gen.prompt) + gen.max_tokens > context:
                    raise APIError(400, f"This model's maximum context length is {context} tokens",
                                   "messages", code="context_length_exceeded")
            reqs = submit(gen)
        except APIError as e:
            return error(e)
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        rid, created = new_id("chatcmpl"), now()
        head = {"id": rid, "object": "chat.completion", "created": created, "model": gen.model}
        if not gen.stream:
            try:
                final = {}
                async for i, ch, finished in events(reqs, gen, True):
                    if finished:
                        final[i] = ch
            except APIError as e:
                return error(e)
            chs = [final[i] for i in range(gen.n)]
            out = [chat_choice(c, gen, i) for i, c in enumerate(chs)]
            if eid is not None:
                book.record(eid, body, gen, [(c.tokens, c.logprobs, o["message"]) for c, o in zip(chs, out)], reqs)
            return JSONResponse({**head, "choices": out, "usage": usage(gen, chs)})
        return StreamingResponse(stream_chat(reqs, gen, {**head, "object": "chat.completion.chunk"}, eid, body),
                                 media_type="text/event-stream")

    def sse(obj) -> str:
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    async def stream_chat(reqs, gen: Generation, head: dict, eid=None, body=None):
        sent = [{"content": 0, "reasoning": 0} for _ in reqs]
        holdback = max((len(s) for s in gen.stop), default=1) - 1
        all_choices, by_index = [], {}
        for i in range(gen.n):
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        try:
            lp_sent = [0] * gen.n
            async for i, ch, finished in events(reqs, gen, True):
                if ch not in all_choices:
                    all_choices.append(ch)
                    by_index[i] = ch
                msg, finish = chat_message(tokenizer, gen.prefix, ch.tokens, ch.finish or "length", ch.stopped)
                text = msg.get("content") or ""
                reasoning = msg.get("reasoning_content") or ""
                if not finished:  # a character whose bytes are still coming decodes as U+FFFD for now
                    text, reasoning = _settled(text), _settled(reasoning)
                if gen.stop:
                    text, _ = _cut(text, gen.stop)
                    if not finished:  # what could be the start of a stop string waits
                        text = text[: max(len(text) - holdback, sent[i]["content"])]
                delta: dict[str, Any] = {}
                if len(text) > sent[i]["content"]:
                    delta["content"] = text[sent[i]["content"]:]
                    sent[i]["content"] = len(text)
                if len(reasoning) > sent[i]["reasoning"]:
                    delta["reasoning_content"] = reasoning[sent[i]["reasoning"]:]
                    sent[i]["reasoning"] = len(reasoning)
                if finished and msg.get("tool_calls"):
                    delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
                lp = None
                if gen.logprobs and len(ch.tokens) > lp_sent[i]:
                    a = lp_sent[i]
                    lp = logprobs_block(tokenizer, ch.tokens[a:], ch.logprobs[a:], ch.tops[a:], gen.top_logprobs)
                    lp_sent[i] = len(ch.tokens)
                if delta or lp:
                    yield sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}]})
                if finished:
                    yield sse({**head, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}]})
        except APIError as e:
            yield sse(e.body())
        if eid is not None and len(all_choices) == gen.n:
            chs = [by_index[i] for i in range(gen.n)]
            book.record(eid, body, gen, [(c.tokens, c.logprobs, chat_choice(c, gen, 0)["message"]) for c in chs], reqs)
        if gen.include_usage:
            yield sse({**head, "choices": [], "usage": usage(gen, all_choices)})
        yield "data: [DONE]\n\n"

    async def completions(request):
        try:
            gen = completion_request(await body_of(request), tokenizer, model_names=names, context=context,
                                     any_model=any_model)
            reqs = submit(gen)
        except APIError as e:
            return error(e)
        except ClientDisconnect:
            return JSONResponse({}, status_code=499)
        rid, created = new_id("cmpl"), now()
        head = {"id": rid, "object": "text_completion", "created": created, "model": gen.model}

        def choice(ch: _Choice, i: int, tokens=None) -> dict:
            toks = ch.tokens if tokens is None else tokens
            text = tokenizer.decode(toks)
            if gen.stop:
                text = _cut(text, gen.stop)[0]
            finish = "stop" if ch.stopped or ch.finish == "stop" else "length"
            return {"index": i, "text": text, "finish_reason": finish if ch.finish else None,
                    "logprobs": text_logprobs(tokenizer, toks, ch.logprobs[-len(toks):] if toks else [],
                                              ch.tops[-len(toks):] if toks else [], gen.top_logprobs)
                    if gen.logprobs else None}
        if not gen.stream:
            try:
                final = {}
                async for i, ch, finished in events(reqs, gen, False):
                    if finished:
                        final[i] = ch
            except APIError as e:
                return error(e)
            chs = [final[i] for i in range(gen.n)]
            return JSONResponse({**head, "choices": [choice(c, i) for i, c in enumerate(chs)],
                                 "usage": usage(gen, chs)})

        async def stream():
            sent = [0] * gen.n
            chs = []
            try:
                async for i, ch, finished in events(reqs, gen, False):
                    if ch not in chs:
                        chs.append(ch)
                    full = choice(ch, i)
                    text = full["text"] if finished else _settled(full["text"])
                    piece = text[sent[i]:]
                    sent[i] = max(sent[i], len(text))
                    yield sse({**head, "choices": [{**full, "text": piece,
                                                    "finish_reason": full["finish_reason"] if finished else None}]})
            except APIError as e:
                yield sse(e.body())
            if gen.include_usage:
                yield sse({**head, "choices": [], "usage": usage(gen, chs)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                                          "owned_by": "ossrl"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "requests_in_flight": runner.pending})

    async def not_found(request, exc):
        return error(APIError(404, f"no route {request.method} {request.url.path}", kind="not_found_error"))

    async def server_error(request, exc):
        return error(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.close()

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    if book is not None:
        routes += [Route("/episodes/{eid}/v1/models", models),
                   Route("/episodes/{eid}/v1/chat/completions", chat, methods=["POST"])]
    app = Starlette(routes=routes,
                    exception_handlers={404: not_found, 405: not_found, 500: server_error}, lifespan=lifespan)
    app.state.runner = runner
    return app


def load_for_serving(spec: str, *, device: str = "auto"):
    """(model, tokenizer, name, preamble) for ``--model``: "tiny", a Hugging Face folder, a run
    folder of ``ossrl train`` (its latest checkpoint) or one of its ``checkpoints/step_N``."""
    import torch
    from pathlib import Path

    from ..model import ByteTokenizer, GptOss, GptOssConfig, load_pretrained, load_tokenizer

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if spec == "tiny":
        torch.manual_seed(0)
        return GptOss(GptOssConfig.tiny()).to(dev), ByteTokenizer(), "tiny", False
    p = Path(spec)
    if not p.is_dir():
        raise SystemExit(f"ossrl serve --model: {spec!r} is neither 'tiny' nor a folder")
    step = None
    if (p / "state.json").is_file() and (p / "model.safetensors").is_file():
        step, p = p, p.parents[1]
    if (p / "checkpoints").is_dir():  # a run folder of ossrl train
        from ..train import checkpoint
        from ..train.config import TrainConfig, _apply
        from ..train.loop import build

        step = step or checkpoint.latest(p / "checkpoints")
        if step is None:
            raise SystemExit(f"ossrl serve --model: {p} has no complete checkpoint")
        cfg = TrainConfig()
        _apply(cfg, {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "loss"})
        cfg.device = dev.type
        model, tok = build(cfg)
        model.load_state_dict(checkpoint.read_weights(step / "model.safetensors"))
        builtin = not (cfg.dataset or cfg.environment_factory)
        return model, tok, f"{p.name}/{step.name}", cfg.chat_preamble and not builtin
    return load_pretrained(p, device=dev), load_tokenizer(p), p.name, True


def serve(model: str = "tiny", host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Runs ``ossrl serve`` until SIGTERM / Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("ossrl serve needs starlette and uvicorn: pip install 'ossrl[serve]'") from None
    import signal

    m, tok, name, preamble = load_for_serving(model)
    app = create_app(m, tok, model_name=name, preamble=preamble, **kwargs)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler that
    # was there before: make that a clean exit, not death by signal
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
