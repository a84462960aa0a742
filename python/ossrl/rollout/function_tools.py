"""Tools from plain Python functions: the JSON schema comes from type hints and a Google-style
docstring, as TRL (and transformers' ``get_json_schema``) read them::

    def search(query: str, limit: int = 5) -> str:
        \"\"\"Search the notes.

        Args:
            query: What to look for.
            limit: How many hits to return.
        \"\"\"

    function_schema(search)
    # {"name": "search", "description": "Search the notes.",
    #  "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": ...},
    #                 "limit": {"type": "integer", "description": ..., "default": 5}}, "required": ["query"]}}

Supported hints: str, int, float, bool, None, list[X], tuple[X, ...], dict[str, X], Optional /
``X | None``, Union, Literal[...] and Any. A parameter without a hint, ``*args`` or ``**kwargs``
is an error naming the function: the model needs to know what to write.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any, Callable

__all__ = ["function_schema", "ToolSchemaError"]


class ToolSchemaError(TypeError):
    """A function that cannot be offered as a tool; the message names it and the parameter."""


_SIMPLE = {str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
           bool: {"type": "boolean"}, type(None): {"type": "null"}, dict: {"type": "object"},
           list: {"type": "array"}}


def _schema(hint: Any, where: str) -> dict:
    if hint is Any:
        return {}
    if hint in _SIMPLE:
        return dict(_SIMPLE[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        subs = [_schema(a, where) for a in args]
        if all(set(s) == {"type"} for s in subs):
            return {"type": [s["type"] for s in subs]}
        return {"anyOf": subs}
    if origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        out: dict = {"type": "array"}
        if len(items) == 1:
            out["items"] = _schema(items[0], where)
        return out
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _schema(args[1], where)
        return out
    raise ToolSchemaError(f"{where}: type hint {hint!r} cannot be written as JSON schema "
                          "(use str, int, float, bool, list[...], dict[str, ...], Literal, Optional)")


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?):\s*$")


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """The description (text before the first section) and the Args section's entries."""
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    desc: list[str] = []
    params: dict[str, str] = {}
    section, current, indent = None, None, None
    for line in lines:
        m = _SECTION.match(line)
        if m:
            section, current = m.group(1), None
            continue
        if section is None:
            desc.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            lead = len(line) - len(line.lstrip())
            entry = re.match(r"^\s*\*{0,2}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if entry and (indent is None or lead <= indent):
                indent, current = lead, entry.group(1)
                params[current] = entry.group(3).strip()
            elif current is not None:
                params[current] = (params[current] + " " + line.strip()).strip()
    return "\n".join(desc).strip(), params


def function_schema(fn: Callable, name: str | None = None) -> dict:
    """``{"name", "description", "parameters"}`` for ``fn`` (see the module docstring)."""
    label = name or getattr(fn, "__name__", None) or type(fn).__name__
    where = f"tool {label!r}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ToolSchemaError(f"{where}: cannot read its signature ({e})") from None
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception as e:  # a hint that does not resolve
        raise ToolSchemaError(f"{where}: its type hints do not resolve ({type(e).__name__}: {e})") from None
    desc, docs = _docstring(fn)
    props: dict[str, dict] = {}
    required: list[str] = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolSchemaError(f"{where}: *{p.name} / **{p.name} parameters cannot be described to the model")
        if p.name not in hints:
            raise ToolSchemaError(f"{where}: parameter {p.name!r} has no type hint")
        s = _schema(hints[p.name], f"{where}, parameter {p.name!r}")
        if p.name in docs:
            s["description"] = docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        elif isinstance(p.default, (str, int, float, bool, type(None))):
            s["default"] = p.default
        props[p.name] = s
    params: dict = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return {"name": label, "description": desc, "parameters": params}
