"""`ossrl serve` through the official openai SDK (sync, async, streaming) against a real uvicorn
server on 127.0.0.1, with the tiny model: parameters, logprobs against the engine's own, bad
input, load, disconnects and KV reuse."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from ossrl.model import ByteTokenizer, GptOss, GptOssConfig  # noqa: E402
from ossrl.model.harmony import Message, encode_completion, encode_conversation  # noqa: E402
from ossrl.rollout.engine import Engine, SamplingParams  # noqa: E402
from ossrl.serve import create_app  # noqa: E402
from ossrl.serve.protocol import chat_message  # noqa: E402

from _tolerance import rounding_scale  # noqa: E402


def _model():
    torch.manual_seed(0)
    return GptOss(GptOssConfig.tiny()).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30, "server did not start"
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server():
    model = _model()
    app = create_app(model, ByteTokenizer(), model_name="tiny", preamble=False, max_cache_tokens=16384,
                     max_requests=256, max_body_bytes=1 << 20)
    srv, url = _start(app)
    yield {"url": url, "app": app, "model": model}
    srv.should_exit = True


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


def _chat(client, **kw):
    args = dict(model="tiny", messages=[{"role": "user", "content": "12+34"}], max_tokens=24, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**args)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_chat_is_repeatable_and_reports_usage(client):
    a, b = _chat(client), _chat(client)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason in ("stop", "length")
    prompt = encode_conversation(ByteTokenizer(), [Message("user", "12+34")], add_generation_prompt=True)
    assert a.usage.prompt_tokens == len(prompt) and 0 < a.usage.completion_tokens <= 24
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.object == "chat.completion" and a.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_answer_as_a_plain_request(client):
    plain = _chat(client, max_tokens=40).choices[0]
    chunks = list(_chat(client, max_tokens=40, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert text == (plain.message.content or "")
    assert reasoning == (getattr(plain.message, "reasoning_content", None) or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_logprobs_are_the_engines_own(server, client):
    r = _chat(client, logprobs=True, top_logprobs=3, max_tokens=12).choices[0]
    tok = ByteTokenizer()
    prompt = encode_conversation(tok, [Message("user", "12+34")], add_generation_prompt=True)
    ref = Engine(server["model"], max_cache_tokens=4096).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=tok.stop_token_ids))[0]
    got = [e.logprob for e in r.logprobs.content]
    assert len(got) == len(ref.tokens)
    tol = 64 * rounding_scale()  # the same forward, batched alone both times
    assert max(abs(a - b) for a, b in zip(got, ref.logprobs)) <= tol
    for e in r.logprobs.content:  # the sampled (greedy) token is the most likely one
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - tol


def test_n_and_seed(client):
    a = _chat(client, n=3, temperature=1.0, seed=7, max_tokens=16)
    b = _chat(client, n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own stream


def test_stop_strings_cut_the_answer(client):
    full = _chat(client, max_tokens=40).choices[0].message.content or ""
    text = full.strip()
    if len(text) < 4:
        pytest.skip("the untrained model's answer is too short to cut")
    stop = text[2:4]
    cut = _chat(client, max_tokens=40, stop=[stop]).choices[0]
    assert stop not in (cut.message.content or "") and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, max_tokens=40, stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut.message.content


def test_tool_messages_render_and_tool_choice_is_accepted(client):
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.",
                                               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    history = [{"role": "user", "content": "2+3"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    r = _chat(client, messages=history, tools=tools)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    forced = _chat(client, messages=history[:1], tools=tools, tool_choice={"type": "function", "function": {"name": "add"}},
                   max_tokens=8)
    assert forced.choices[0].finish_reason in ("length", "tool_calls", "stop")


def test_completions_parse_tool_calls_and_reasoning():
    tok = ByteTokenizer()
    turn = encode_completion(tok, Message("assistant", "Need it.", channel="analysis"))[:-1] + [tok.special_id("<|end|>")]
    turn += [tok.special_id("<|start|>")] + tok.encode("assistant") + encode_completion(
        tok, Message("assistant", '{"a": 2}', channel="commentary", recipient="functions.add", content_type="json"))
    msg, finish = chat_message(tok, [], turn, "stop", False)
    assert finish == "tool_calls" and msg["content"] is None and msg["reasoning_content"] == "Need it."
    (call,) = msg["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a": 2}'} and call["type"] == "function"
    final = encode_completion(tok, Message("assistant", "5", channel="final"))
    assert chat_message(tok, [], final, "stop", False) == ({"role": "assistant", "content": "5"}, "stop")
    assert chat_message(tok, [], final[:-1], "length", False)[1] == "length"


def test_text_completions_and_kv_reuse(server, client):
    runner = server["app"].state.runner
    r1 = client.completions.create(model="tiny", prompt="<|start|>user<|message|>hi<|end|><|start|>assistant",
                                   max_tokens=8, temperature=0, logprobs=2)
    c1 = r1.choices[0]
    assert r1.object == "text_completion" and len(c1.logprobs.tokens) == r1.usage.completion_tokens
    assert all(len(t) <= 2 for t in c1.logprobs.top_logprobs)
    ids = ByteTokenizer().encode("<|start|>user<|message|>hi<|end|><|start|>assistant", allow_special=True)
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == c1.text  # token ids or text: the same prompt
    # a request that goes on from what an earlier one generated resumes its kept cache
    # (token ids here: an untrained model's bytes need not decode to text that encodes back)
    params = SamplingParams(temperature=0, max_new_tokens=6)

    async def run(prompt):
        req = runner.submit(prompt, params)
        out = []
        while True:
            ev = await req.events.get()
            if ev[0] != "tokens":
                return out, req.reused
            out += ev[1]
    first, _ = asyncio.run(run(ids))
    before = runner.stats["reused_tokens"]
    longer = ids + first + ByteTokenizer().encode("more")
    second, reused = asyncio.run(run(longer))
    assert reused == len(ids) + len(first) and runner.stats["reused_tokens"] - before == reused
    # and samples exactly what a fresh engine does on the whole prompt
    ref = Engine(server["model"], max_cache_tokens=4096).generate([longer], params)[0]
    assert second == ref.tokens


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "unknown role"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 8}, 400, "context length"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(200)]}, 400, "tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 20000}]}, 400, "context length"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "'n'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "logprobs"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, 400, "token ids"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, body, status, fragment):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["url"] + path, content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment.lower() in err["message"].lower() and set(err) >= {"message", "type", "param", "code"}
    assert _chat(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")  # still serving


def test_a_body_too_large_is_413(server):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    r = httpx.post(server["url"] + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_sdk_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="nope")
    with pytest.raises(openai.BadRequestError):
        _chat(client, messages=[])


def test_two_hundred_concurrent_clients(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=120)
        rs = await asyncio.gather(*[c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"{i}+1"}], max_tokens=4, temperature=0)
            for i in range(200)])
        await c.close()
        return rs
    rs = asyncio.run(main())
    assert len(rs) == 200 and all(r.usage.completion_tokens >= 1 for r in rs)
    assert server["app"].state.runner.pending == 0


def test_over_capacity_is_429_not_unbounded():
    app = create_app(_model(), ByteTokenizer(), model_name="tiny", preamble=False, max_requests=2,
                     max_cache_tokens=4096)
    srv, url = _start(app)
    try:
        async def main():
            c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            rs = await asyncio.gather(*[c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=64, temperature=0)
                for _ in range(12)], return_exceptions=True)
            await c.close()
            return rs
        rs = asyncio.run(main())
        limited = [r for r in rs if isinstance(r, openai.RateLimitError)]
        ok = [r for r in rs if not isinstance(r, Exception)]
        assert limited and ok and len(limited) + len(ok) == 12, rs
    finally:
        srv.should_exit = True


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(server):
    runner = server["app"].state.runner
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000, "temperature": 1.0,
            "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    t0 = time.monotonic()
    while runner.pending and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    assert runner.pending == 0 and not runner.engine.has_unfinished()


def test_ossrl_serve_shuts_down_on_sigterm(tmp_path):
    """The command itself: serves, then exits cleanly on SIGTERM (what a process manager sends)."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ossrl", "serve", "--port", str(port), "--max-cache-tokens", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 60, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
