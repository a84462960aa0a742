"""Rollout: generation with tool calls (see tools.py for the tool layer)."""

from .tools import SandboxConfig, ToolCall, ToolRegistry, ToolResult, probe_sandbox, run_sandboxed

__all__ = ["SandboxConfig", "ToolCall", "ToolRegistry", "ToolResult", "probe_sandbox", "run_sandboxed"]
