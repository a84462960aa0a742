"""GPT-OSS's chat format ("harmony"): rendering conversations to tokens, parsing completions back.

A message is ``<|start|>HEADER<|message|>CONTENT<|end|>``. The header names the author (system,
developer, user, assistant, or a tool such as ``functions.get_weather``), optionally the channel
(``<|channel|>analysis`` for reasoning, ``commentary`` for tool calls, ``final`` for the answer),
a recipient (``to=functions.get_weather`` for a call, ``to=assistant`` for a tool's result) and a
content type (``<|constrain|>json``). An assistant turn ends with ``<|return|>`` (final answer,
written ``<|end|>`` once it is history) or ``<|call|>`` (a tool call, for the caller to run)::

    <|start|>user<|message|>Weather in Paris?<|end|>
    <|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"X"}<|call|>
    <|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 21}<|end|>
    <|start|>assistant<|channel|>final<|message|>21 degrees.<|return|>

Why not the ``openai-harmony`` package: it fetches its o200k vocabulary file over the network
the first time it runs (no offline mode without pre-seeding a cache), and it only knows that one
vocabulary, not the built-in byte tokenizer of the tiny CPU model. This module renders the same
layout (following the format's public description) with any :class:`~ossrl.model.tokenizer.Tokenizer`:
special tokens are emitted by id and text is encoded with special-token matching off, so message
text can never inject a control token.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tokenizer import HARMONY_SPECIAL_TOKENS, Tokenizer

__all__ = ["Message", "system_message", "developer_message", "tool_call", "tool_result", "render_pieces",
           "render_text", "encode_conversation", "encode_completion", "encode_pieces", "parse_completion", "Special"]


@dataclass
class Message:
    """One harmony message. role: "system", "developer", "user", "assistant" or a tool's name
    ("functions.get_weather"). recipient: "functions.NAME" on a tool call, "assistant" on a tool result.
    content_type: e.g. "json" (rendered ``<|constrain|>json``). end: for parsed messages, the token that
    ended it ("<|end|>", "<|call|>", "<|return|>", or None when the completion stopped mid-message)."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    end: str | None = None

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and bool(self.recipient) and self.recipient.startswith("functions.")

    @property
    def tool_name(self) -> str | None:
        """NAME of a call to ``functions.NAME``."""
        return self.recipient.split(".", 1)[1] if self.is_tool_call else None


class Special(str):
    """A special token in a rendered conversation (a str subclass, so pieces join into text)."""


def _sp(name: str) -> Special:
    assert name in HARMONY_SPECIAL_TOKENS, name
    return Special(name)


# ---- building messages ----


def system_message(
    *,
    reasoning: str = "medium",
    identity: str = "You are ChatGPT, a large language model trained by OpenAI.",
    knowledge_cutoff: str = "2024-06",
    current_date: str | None = None,
    function_tools: bool = False,
) -> Message:
    """The system message GPT-OSS was trained with. function_tools: say that tool calls go to the
    commentary channel (set it when the developer message declares tools)."""
    if reasoning not in ("low", "medium", "high"):
        raise ValueError(f"system_message: reasoning must be 'low', 'medium' or 'high', got {reasoning!r}")
    date = current_date or datetime.date.today().isoformat()
    lines = [identity, f"Knowledge cutoff: {knowledge_cutoff}", f"Current date: {date}", "",
             f"Reasoning: {reasoning}", "",
             "# Valid channels: analysis, commentary, final. Channel must be included for every message."]
    if function_tools:
        lines.append("Calls to these tools must go to the commentary channel: 'functions'.")
    return Message("system", "\n".join(lines))


def developer_message(instructions: str | None = None, tools: Sequence[dict] = ()) -> Message:
    """Instructions and function tools. Each tool: {"name", "description", "parameters": JSON schema}
    (the OpenAI function-tool shape; {"type": "function", "function": {...}} is accepted too)."""
    parts = []
    if instructions:
        parts.append(f"# Instructions\n\n{instructions}")
    if tools:
        defs = "\n\n".join(_tool_typescript(t.get("function", t)) for t in tools)
        parts.append(f"# Tools\n\n## functions\n\nnamespace functions {{\n\n{defs}\n\n}} // namespace functions")
    return Message("developer", "\n\n".join(parts))


def tool_call(name: str, arguments: str | dict) -> Message:
    """An assistant message calling ``functions.NAME`` with JSON arguments."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return Message("assistant", args, channel="commentary", recipient=f"functions.{name}", content_type="json")


def tool_result(name: str, content: str | Any) -> Message:
    """The result of ``functions.NAME``, addressed back to the assistant."""
    text = content if isinstance(content, str) else json.dumps(content)
    return Message(f"functions.{name}", text, channel="commentary", recipient="assistant")


def _ts_type(schema: Any, indent: str = "") -> str:
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    t = schema.get("type")
    if isinstance(t, list):
        return " | ".join(_ts_type({**schema, "type": x}, indent) for x in t)
    if t == "string":
        return "string"
    if t in ("number", "integer"):
        return "number"
    if t in ("boolean", "null"):
        return t
    if t == "array":
        item = _ts_type(schema.get("items"), indent)
        return f"({item})[]" if " | " in item else f"{item}[]"
    if t == "object" and schema.get("properties"):
        return "{\n" + _ts_fields(schema, indent) + indent + "}"
    return "any"


def _ts_fields(schema: dict, indent: str = "") -> str:
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = prop if isinstance(prop, dict) else {}
        if prop.get("description"):
            out.extend(f"{indent}// {line}\n" for line in str(prop["description"]).splitlines())
        line = f"{indent}{name}{'' if name in required else '?'}: {_ts_type(prop, indent)},"
        if "default" in prop:
            d = prop["default"]
            line += f" // default: {d if isinstance(d, str) else json.dumps(d)}"
        out.append(line + "\n")
    return "".join(out)


def _tool_typescript(tool: dict) -> str:
    name = tool.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"developer_message: tool name must be an identifier, got {name!r}")
    head = "".join(f"// {line}\n" for line in str(tool.get("description", "")).splitlines())
    params = tool.get("parameters") or {}
    if params.get("properties"):
        return f"{head}type {name} = (_: {{\n{_ts_fields(params)}}}) => any;"
    return f"{head}type {name} = () => any;"


# ---- rendering ----


def render_pieces(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[str]:
    """The conversation as a list of text pieces and :class:`Special` tokens.

    add_generation_prompt: end with ``<|start|>assistant`` for the model to continue from.
    A tool call ends with ``<|call|>``; every other message with ``<|end|>`` (history form).
    """
    out: list[str] = []
    for m in messages:
        if not m.role or any(c in m.role for c in " <>\n"):
            raise ValueError(f"harmony: role must be a single word, got {m.role!r}")
        out += [_sp("<|start|>"), m.role]
        if m.recipient and m.role != "assistant":
            out.append(f" to={m.recipient}")
        if m.channel:
            out += [_sp("<|channel|>"), m.channel]
        if m.recipient and m.role == "assistant":
            out.append(f" to={m.recipient}")
        if m.content_type:
            out += [" ", _sp("<|constrain|>"), m.content_type]
        out += [_sp("<|message|>"), m.content, _sp("<|call|>" if m.is_tool_call else "<|end|>")]
    if add_generation_prompt:
        out += [_sp("<|start|>"), "assistant"]
    return out


def render_text(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text (for display and tests; tokenize with :func:`encode_conversation`)."""
    return "".join(render_pieces(messages, add_generation_prompt=add_generation_prompt))


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Message], *,
                        add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation. Special tokens by id; the text between two special
    tokens is encoded as one string with special-token matching off."""
    return encode_pieces(tokenizer, render_pieces(messages, add_generation_prompt=add_generation_prompt))


def encode_completion(tokenizer: Tokenizer, message: Message) -> list[int]:
    """What the model itself writes for an assistant ``message`` after ``<|start|>assistant``: the
    generation form, ending in ``<|call|>`` for a tool call and ``<|return|>`` for an answer (the
    history form ends answers with ``<|end|>``). Used to build demonstrations."""
    if message.role != "assistant":
        raise ValueError(f"encode_completion: only assistant messages are completions, got {message.role!r}")
    pieces = render_pieces([message])[2:]  # drop <|start|> and the role
    if not message.is_tool_call:
        pieces[-1] = _sp("<|return|>")
    return encode_pieces(tokenizer, pieces)


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[str]) -> list[int]:
    """Token ids of rendered pieces: :class:`Special` pieces by id, text runs encoded as text."""
    ids: list[int] = []
    text: list[str] = []
    for piece in list(pieces) + [None]:
        if isinstance(piece, Special) or piece is None:
            if text:
                ids += tokenizer.encode("".join(text), allow_special=False)
                text.clear()
            if piece is not None:
                ids.append(tokenizer.special_id(piece))
        else:
            text.append(piece)
    return ids


# ---- parsing ----

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(n) for n in HARMONY_SPECIAL_TOKENS) + ")")
_ENDS = ("<|end|>", "<|call|>", "<|return|>")


def parse_completion(completion: str | Sequence[int], tokenizer: Tokenizer | None = None, *,
                     role: str | None = "assistant") -> list[Message]:
    """Messages of a generated completion.

    completion: token ids (then ``tokenizer`` is needed; special tokens are recognised by id, so text
    that merely looks like ``<|end|>`` stays text) or text. role: the author the prompt already opened
    (a prompt ending in ``<|start|>assistant``); None when the completion starts with ``<|start|>``.
    A completion that stops inside a message yields that message with ``end=None``.
    """
    pieces = _pieces(completion, tokenizer)
    messages: list[Message] = []
    header: list[str] | None = [role] if role is not None else None
    content: list[str] | None = None
    for p in pieces:
        if content is not None:  # inside a message body
            if isinstance(p, Special) and p in _ENDS:
                messages.append(_message(header, "".join(content), str(p)))
                header, content = None, None
            else:
                content.append(p)
        elif p == "<|start|>" and isinstance(p, Special):
            header = []
        elif p == "<|message|>" and isinstance(p, Special):
            if header is None:
                raise ValueError("harmony: <|message|> outside a message header")
            content = []
        elif header is not None:
            header.append(p)
        elif isinstance(p, Special) and p == "<|endoftext|>":
            break
        elif p.strip():
            raise ValueError(f"harmony: unexpected {p!r} between messages")
    if content is not None:
        messages.append(_message(header, "".join(content), None))
    return messages


def _pieces(completion: str | Sequence[int], tokenizer: Tokenizer | None) -> list[str]:
    if isinstance(completion, str):
        return [Special(p) if p in HARMONY_SPECIAL_TOKENS else p for p in _SPECIAL_SPLIT.split(completion) if p]
    if tokenizer is None:
        raise ValueError("parse_completion: token ids need a tokenizer")
    specials = tokenizer.special_ids
    out: list[str] = []
    run: list[int] = []
    for i in list(completion) + [None]:
        if i is None or int(i) in specials:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            if i is not None:
                out.append(Special(specials[int(i)]))
        else:
            run.append(int(i))
    return out


def _message(header: list[str], content: str, end: str | None) -> Message:
    # header pieces: "assistant" / "functions.x to=assistant", then maybe <|channel|>, "commentary to=functions.y ",
    # <|constrain|>, "json". The role is the first word; recipient and content type may sit anywhere after it.
    words: list[tuple[str, str]] = []  # (the special token right before the word, or "", word)
    marker = ""
    for p in header:
        if isinstance(p, Special):
            marker = str(p)
            continue
        for w in p.split():
            words.append((marker, w))
            marker = ""
    if not words:
        raise ValueError("harmony: message header without an author")
    role = words[0][1]
    channel = recipient = content_type = None
    for marker, w in words[1:]:
        if marker == "<|channel|>":
            channel = w
        elif marker == "<|constrain|>":
            content_type = w
        elif w.startswith("to="):
            recipient = w[3:]
        elif channel is not None and content_type is None:
            content_type = w  # "<|channel|>commentary json" spelling
        else:
            raise ValueError(f"harmony: cannot read message header {''.join(header)!r}")
    return Message(role, content, channel=channel, recipient=recipient, content_type=content_type, end=end)
