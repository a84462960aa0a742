"""OpenAI's request and response shapes for chat and text completions, over harmony.

Requests are untrusted input: :func:`chat_request` and :func:`completion_request` check every
field and raise :class:`APIError` (status, OpenAI error type, message, param) for anything
wrong. Responses are built from what the engine sampled: the harmony completion is parsed back
into ``content`` (the final channel), ``reasoning_content`` (the analysis channel) and
``tool_calls`` (commentary-channel calls to ``functions.NAME``, arguments as JSON text).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..model.chat import ChatFormatError, from_openai
from ..model.harmony import encode_conversation, encode_pieces, parse_completion

__all__ = ["APIError", "Generation", "chat_request", "completion_request", "chat_message", "logprobs_block",
           "LIMITS"]

LIMITS = {"max_tools": 128, "max_n": 16, "max_stop": 4, "max_messages": 4096, "max_top_logprobs": 20}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Generation:
    """One request, ready for the engine: the prompt tokens and how to sample."""

    prompt: list[int]
    prefix: list[int]  # tokens forced after the prompt (tool_choice), part of the completion's parse
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    model: str
    extra: dict = field(default_factory=dict)


def _num(body: dict, key: str, lo: float, hi: float, default: float | None, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}", key)
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{key}' must be true or false, got {v!r}", key)
    return v


def _common(body: dict, model_names: tuple[str, ...], any_model: bool) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (a string)", "model")
    if not any_model and model not in model_names:
        raise APIError(404, f"The model '{model[:200]}' does not exist (served: {', '.join(model_names)})", "model",
                       code="model_not_found")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > LIMITS["max_stop"] or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of up to {LIMITS['max_stop']} non-empty strings", "stop")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return {
        "model": model,
        "n": _num(body, "n", 1, LIMITS["max_n"], 1, integer=True),
        "temperature": float(_num(body, "temperature", 0, 2, 1.0)),
        "top_p": float(_num(body, "top_p", 1e-9, 1, 1.0)),
        "seed": _num(body, "seed", -(2 ** 63), 2 ** 63 - 1, None, integer=True),
        "stop": stop,
        "stream": _bool(body, "stream"),
        "include_usage": bool((opts or {}).get("include_usage", False)),
    }


def _max_tokens(body: dict, keys: tuple[str, ...], room: int, prompt_len: int, context: int) -> int:
    given = [k for k in keys if body.get(k) is not None]
    if room <= 0:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has {prompt_len}",
                       "messages", code="context_length_exceeded")
    if not given:
        return room
    v = _num(body, given[0], 1, 10 ** 9, None, integer=True)
    if v > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens: {prompt_len} in the prompt "
                       f"leave room for {room}, but '{given[0]}' asks for {v}", given[0], code="context_length_exceeded")
    return v


def _tools(body: dict) -> tuple[list[dict], list[str]]:
    tools = body.get("tools")
    if tools is None:
        return [], []
    if not isinstance(tools, list) or len(tools) > LIMITS["max_tools"]:
        raise APIError(400, f"'tools' must be a list of at most {LIMITS['max_tools']} tools", "tools")
    out, names = [], []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise APIError(400, f"tools[{i}]: a function tool needs a name of letters, digits, '_' or '-'", f"tools[{i}]")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
        desc = fn.get("description", "")
        out.append({"name": name, "description": desc if isinstance(desc, str) else "", "parameters": params})
        names.append(name)
    return out, names


def _forced(tool_choice: Any, names: list[str], tokenizer) -> tuple[list[int], bool]:
    """Tokens that start the completion for ``tool_choice``, and whether tools are offered."""
    if tool_choice is None or tool_choice == "auto":
        return [], True
    if tool_choice == "none":
        return [], False
    if not names:
        raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if tool_choice == "required":
        return encode_pieces(tokenizer, _channel(tokenizer) + ["commentary to=functions."]), True
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or a function in 'tools'", "tool_choice")
    return encode_pieces(tokenizer, _channel(tokenizer) + [f"commentary to=functions.{name} "]), True


def _channel(tokenizer):
    from ..model.harmony import Special

    return [Special("<|channel|>")]


def chat_request(body: Any, tokenizer, *, model_names: tuple[str, ...], context: int, preamble: bool,
                 any_model: bool = False) -> Generation:
    c = _common(body, model_names, any_model)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > LIMITS["max_messages"]:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages")
    tools, names = _tools(body)
    prefix, offer = _forced(body.get("tool_choice"), names, tokenizer)
    try:
        harmony = from_openai(msgs, tools if offer else (), preamble=preamble)
    except ChatFormatError as e:
        raise APIError(400, str(e), "messages") from None
    prompt = encode_conversation(tokenizer, harmony, add_generation_prompt=True) + prefix
    logprobs = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", 0, LIMITS["max_top_logprobs"], 0, integer=True)
    if top and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    room = context - len(prompt)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), room, len(prompt), context)
    return Generation(prompt, prefix, c["n"], max_tokens, c["temperature"], c["top_p"], c["seed"], c["stop"],
                      logprobs, top, c["stream"], c["include_usage"], c["model"], {"tools": names})


def completion_request(body: Any, tokenizer, *, model_names: tuple[str, ...], context: int,
                       any_model: bool = False) -> Generation:
    """``/v1/completions``: ``prompt`` is text (harmony special tokens written out are read as
    special tokens: this is the raw interface) or token ids; one prompt per request."""
    c = _common(body, model_names, any_model)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        prompt = tokenizer.encode(p, allow_special=True)
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if any(not 0 <= t < tokenizer.vocab_size for t in p):
            raise APIError(400, f"'prompt' token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        prompt = list(p)
    else:
        raise APIError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                       "prompt")
    if _bool(body, "echo"):
        raise APIError(400, "'echo' is not supported", "echo")
    lp = _num(body, "logprobs", 0, 5, None, integer=True)
    room = context - len(prompt)
    max_tokens = _max_tokens(body, ("max_tokens",), room, len(prompt), context)
    if body.get("max_tokens") is None:
        max_tokens = min(16, max_tokens)  # OpenAI's default for text completions
    return Generation(prompt, [], c["n"], max_tokens, c["temperature"], c["top_p"], c["seed"], c["stop"],
                      lp is not None, lp or 0, c["stream"], c["include_usage"], c["model"])


# ---- responses ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def chat_message(tokenizer, prefix: list[int], tokens: list[int], engine_finish: str, stopped: bool) -> tuple[dict, str]:
    """The assistant message for a chat completion and its OpenAI finish_reason."""
    try:
        msgs = parse_completion(list(prefix) + list(tokens), tokenizer)
    except ValueError:
        msgs = []
    content, reasoning, calls = [], [], []
    for m in msgs:
        if m.role != "assistant":
            continue
        if m.is_tool_call:
            if m.end == "<|call|>" or (m.end is None and engine_finish == "stop"):
                calls.append({"id": new_id("call"), "type": "function",
                              "function": {"name": m.tool_name, "arguments": m.content}})
        elif m.channel == "analysis":
            reasoning.append(m.content)
        else:
            content.append(m.content)
    if not msgs and tokens:  # not harmony at all: the text as it is
        content.append(tokenizer.decode([t for t in tokens if t not in tokenizer.special_ids]))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    if calls:
        finish = "tool_calls"
    elif stopped or engine_finish == "stop":
        finish = "stop"
    else:
        finish = "length"
    return message, finish


def _token_entry(tokenizer, tid: int, lp: float) -> dict:
    text = tokenizer.special_ids.get(tid) or tokenizer.decode([tid])
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def logprobs_block(tokenizer, tokens: list[int], logprobs: list[float], tops, k: int) -> dict:
    """Chat-completions ``logprobs``: one entry per sampled token (special tokens included, the
    engine's own log-probs, unchanged)."""
    out = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        e = _token_entry(tokenizer, t, lp)
        e["top_logprobs"] = [_token_entry(tokenizer, a, b) for a, b in (tops[i] if tops and k else [])][:k]
        out.append(e)
    return {"content": out, "refusal": None}


def text_logprobs(tokenizer, tokens: list[int], logprobs: list[float], tops, k: int) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [tokenizer.special_ids.get(t) or tokenizer.decode([t]) for t in tokens]
    offsets, pos = [], 0
    for s in texts:
        offsets.append(pos)
        pos += len(s)
    top = [{(tokenizer.special_ids.get(a) or tokenizer.decode([a])): b for a, b in (tops[i] if tops else [])[:k]}
           for i in range(len(tokens))] if k else None
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}
