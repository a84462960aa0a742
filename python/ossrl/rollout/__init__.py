"""Rollout: the generation engine (engine.py), tools (tools.py) and the agent loop (agent.py).

    from ossrl.rollout import Engine, SamplingParams
    outs = Engine(model).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=256))

``ossrl.rollout.agent`` (multi-turn episodes) is not imported here: it pulls in the model's chat
format, and the engine and tools need none of it.
"""

from .engine import Completion, Engine, Resume, SamplingParams
from .tools import SandboxConfig, ToolCall, ToolRegistry, ToolResult, probe_sandbox, run_sandboxed

__all__ = ["Engine", "SamplingParams", "Completion", "Resume",
           "SandboxConfig", "ToolCall", "ToolRegistry", "ToolResult", "probe_sandbox", "run_sandboxed"]
