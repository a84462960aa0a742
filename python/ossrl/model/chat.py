"""OpenAI-style chat messages <-> harmony messages, one mapping for datasets, demonstrations,
reward functions and (later) the HTTP server.

OpenAI -> harmony (:func:`from_openai`):

* ``system`` and ``developer`` messages become the harmony developer message's instructions;
  the tools become its ``functions`` namespace. With ``preamble`` the harmony system message
  GPT-OSS was trained with comes first.
* ``user`` -> user. ``assistant``: ``reasoning_content`` (or ``reasoning`` / ``thinking``) -> an
  analysis message; ``content`` -> the final answer, or a commentary message when the assistant
  also calls tools; each of ``tool_calls`` -> a call to ``functions.NAME`` (``<|constrain|>json``
  when its arguments are a JSON object). ``tool`` -> the result of the call its ``tool_call_id``
  names (or of ``name``).

harmony -> OpenAI (:func:`to_openai`) is the inverse for what a model writes: an episode's turns
become assistant messages with ``tool_calls`` (ids ``call_0``, ``call_1``, ... in order) and a
final assistant message; analysis text becomes ``reasoning_content``. A message the model did not
finish (cut off by the token limit) is left out: it is neither an answer nor a call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .harmony import Message, developer_message, system_message, tool_call, tool_result

__all__ = ["from_openai", "to_openai", "prompt_messages", "ChatFormatError"]

_ROLES = ("system", "developer", "user", "assistant", "tool")
TRAINING_DATE = "2025-06-01"  # a fixed date in the preamble: prompts must not change from day to day


class ChatFormatError(ValueError):
    """A message list that is not OpenAI chat format; the message says which message and why."""


def prompt_messages(prompt: Any, where: str = "prompt") -> list[dict]:
    """A dataset's ``prompt``: a string (one user message) or a list of OpenAI-style messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)) and prompt:
        out = []
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
                raise ChatFormatError(f"{where}[{i}]: expected a message with a role in {_ROLES}, got {m!r:.200}")
            out.append(dict(m))
        return out
    raise ChatFormatError(f"{where}: expected a string or a non-empty list of messages, got {type(prompt).__name__}")


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in content:
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise ChatFormatError(f"{where}: only text content parts are supported, got {p!r:.200}")
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _arguments(call: Any, where: str) -> tuple[str, str]:
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}: a tool call needs function.name, got {call!r:.200}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args)
    return name, args


def from_openai(messages: Sequence[Mapping], tools: Sequence[dict] = (), *, preamble: bool = True,
                current_date: str | None = TRAINING_DATE, reasoning: str = "medium") -> list[Message]:
    """Harmony messages for an OpenAI-style conversation (see the module docstring).
    tools: OpenAI function tools ({"type": "function", "function": {...}} or the inner dict)."""
    out: list[Message] = []
    instructions: list[str] = []
    names: dict[str, str] = {}  # tool_call_id -> tool name
    last_call: str | None = None
    body: list[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"{where}: expected a mapping, got {type(m).__name__}")
        role = m.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(m.get("content"), where))
        elif role == "user":
            body.append(Message("user", _text(m.get("content"), where)))
        elif role == "assistant":
            thinking = next((m[k] for k in ("reasoning_content", "reasoning", "thinking") if m.get(k)), None)
            if thinking:
                body.append(Message("assistant", _text(thinking, where), channel="analysis"))
            calls = m.get("tool_calls") or []
            if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
                raise ChatFormatError(f"{where}: tool_calls must be a list")
            text = _text(m.get("content"), where)
            if text or not calls:
                body.append(Message("assistant", text, channel="commentary" if calls else "final"))
            for k, call in enumerate(calls):
                name, args = _arguments(call, f"{where}.tool_calls[{k}]")
                msg = tool_call(name, args)
                try:
                    is_object = isinstance(json.loads(args), dict)
                except ValueError:
                    is_object = False
                if not is_object:  # plain-text arguments: no JSON constraint in the header
                    msg.content_type = None
                body.append(msg)
                cid = call.get("id") if isinstance(call, Mapping) else None
                if isinstance(cid, str):
                    names[cid] = name
                last_call = name
        elif role == "tool":
            name = names.get(m.get("tool_call_id")) or m.get("name") or last_call
            if not isinstance(name, str) or not name:
                raise ChatFormatError(f"{where}: a tool message needs a tool_call_id of an earlier call or a name")
            body.append(tool_result(name, _text(m.get("content"), where)))
        else:
            raise ChatFormatError(f"{where}: unknown role {role!r} (expected one of {_ROLES})")
    if preamble:
        out.append(system_message(current_date=current_date, reasoning=reasoning, function_tools=bool(tools)))
    if instructions or (preamble and tools):
        out.append(developer_message("\n\n".join(instructions) or None, tools if preamble else ()))
    return out + body


def to_openai(messages: Sequence[Message], first_call: int = 0) -> list[dict]:
    """OpenAI-style assistant messages for what the model wrote (one turn or several): calls get
    ids ``call_{first_call}``, ``call_{first_call + 1}``, ...; unfinished messages are left out."""
    out: list[dict] = []
    thinking: list[str] = []
    n = first_call
    for m in messages:
        if m.role != "assistant" or m.end is None:
            continue
        if m.channel == "analysis" and not m.is_tool_call:
            thinking.append(m.content)
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": None if m.is_tool_call else m.content}
        if thinking:
            msg["reasoning_content"] = "\n".join(thinking)
            thinking = []
        if m.is_tool_call:
            msg["tool_calls"] = [{"id": f"call_{n}", "type": "function",
                                  "function": {"name": m.tool_name, "arguments": m.content}}]
            n += 1
        out.append(msg)
    if thinking:
        out.append({"role": "assistant", "content": None, "reasoning_content": "\n".join(thinking)})
    return out
