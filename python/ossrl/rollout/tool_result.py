"""What a tool call is and what it returns: shared by the registry and the sandbox."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Error kinds (ToolResult.error). None means success.
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"
EXCEPTION = "exception"
TIMEOUT = "timeout"
OUTPUT_TOO_LARGE = "output_too_large"
CRASH = "crash"
NONZERO_EXIT = "nonzero_exit"
MEMORY_LIMIT = "memory_limit"
CPU_LIMIT = "cpu_limit"
SANDBOX_VIOLATION = "sandbox_violation"
SANDBOX_ERROR = "sandbox_error"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call. ``content`` is what goes back into the conversation."""

    name: str
    ok: bool
    content: str
    error: str | None = None  # one of the error kinds above when ok is False
    seconds: float = 0.0


@dataclass(frozen=True)
class ToolCall:
    """One model-written call: a tool name and its arguments (a JSON string or a mapping)."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    timeout: float | None = None


def code_bytes(code, limit: int) -> tuple[bytes | None, str | None]:
    """The model's code as the bytes a sandbox runs, or why it cannot run (not a string, too long)."""
    if not isinstance(code, str):
        return None, f"Error: the code must be a string, got {type(code).__name__}."
    data = code.encode("utf-8", "surrogatepass")
    if len(data) > limit:
        return None, f"Error: the code is too long ({len(data)} bytes, limit {limit})."
    return data, None
