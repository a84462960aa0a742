"""Tool arguments checked against their JSON Schema: the subset that tool definitions use
(types, enum, bounds, lengths, items, required, additionalProperties)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _json_type_name(v: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](v):
            return name
    return type(v).__name__


def _validate(schema: Mapping[str, Any], value: Any, where: str) -> str | None:
    """Returns a message for the first problem found, or None."""
    t = schema.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else list(t)
        if not any(_JSON_TYPES.get(x, lambda v: True)(value) for x in types):
            return f"{where}: expected {' or '.join(types)}, got {_json_type_name(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: must be one of {json.dumps(schema['enum'])}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{where}: must be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{where}: must be <= {schema['maximum']}"
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{where}: must have at least {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{where}: must have at most {schema['maxLength']} characters"
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            return f"{where}: must have at least {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{where}: must have at most {schema['maxItems']} items"
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, v in enumerate(value):
                msg = _validate(items, v, f"{where}[{i}]")
                if msg:
                    return msg
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                return f"{where}: missing required argument '{key}'" if where == "arguments" else f"{where}: missing '{key}'"
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            sub = props.get(key)
            path = f"argument '{key}'" if where == "arguments" else f"{where}.{key}"
            if sub is None:
                if extra is False:
                    allowed = ", ".join(props) or "none"
                    return f"unexpected argument '{key}' (allowed: {allowed})" if where == "arguments" \
                        else f"{where}: unexpected key '{key}'"
                if isinstance(extra, Mapping):
                    msg = _validate(extra, v, path)
                    if msg:
                        return msg
                continue
            msg = _validate(sub, v, path)
            if msg:
                return msg
    return None
