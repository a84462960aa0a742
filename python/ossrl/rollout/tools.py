"""Tools for agentic rollouts: a registry, a sandboxed ``python`` tool and a ``calculator``.

During a rollout the model writes tool calls (a name and JSON arguments). Those calls are
untrusted text. :class:`ToolRegistry` runs them concurrently on the asyncio event loop, outside
the GPU loop, and turns every outcome into a :class:`ToolResult` whose ``content`` goes back into
the conversation. It never raises and never hangs. Unknown tools, malformed JSON, arguments of
the wrong type, exceptions, timeouts, crashes and outputs over the limit all become results with
``ok=False``, an ``error`` kind and a message the model can read::

    registry = ToolRegistry()                      # built-ins: "python", "calculator"
    registry.register("lookup", lookup, description="Look a word up.",
                      parameters_schema={"type": "object",
                                         "properties": {"word": {"type": "string"}},
                                         "required": ["word"]})
    result = await registry.call("calculator", '{"expression": "2**10 - 1"}')
    results = await registry.run_calls([("python", '{"code": "print(6*7)"}'), ...],
                                       max_concurrency=64)

How calls run
-------------
* Async callables run as tasks on the caller's event loop. At the timeout they are cancelled;
  one that ignores the cancellation is abandoned (never awaited again), so the loop still moves on.
* Sync callables run in their own daemon thread, so the event loop is never blocked. **A thread
  cannot be killed**: a sync callable that hangs keeps its thread after its call has returned a
  timeout result. Such threads are counted, and once ``max_hung_threads`` are alive, further
  sync calls are refused with an ``unavailable`` result until some finish. Only trusted code
  belongs in a registered callable. Model-written code runs through the sandbox.
* Sandboxed code runs in a fresh sandboxed process per call (a child forked from a warm zygote,
  see :mod:`ossrl.rollout.sandbox_pool`), at most ``max_sandboxes`` processes at once. Waiting for
  a process slot does not count towards a call's timeout, and nothing waits forever: every
  process is killed at its own timeout.
* ``python_session`` (when named in ``builtins``) keeps one sandboxed interpreter across the
  calls of the registry's episode, like a notebook (:mod:`ossrl.rollout.sandbox_session`);
  :meth:`ToolRegistry.close_sessions` ends it (the agent loop does when an episode ends or is
  paused). ``backend=`` runs the ``python`` calls elsewhere, e.g. on Ray workers
  (:mod:`ossrl.rollout.tool_backend`).
* :meth:`ToolRegistry.run_calls` runs many calls with at most ``max_concurrency`` in flight and
  returns the results in input order.

Model-written code runs through the ``python`` tool in a sandbox: see :mod:`ossrl.rollout.sandbox`
for its layers and its threat model.

``calculator`` evaluates arithmetic by walking the ``ast``: numbers, ``+ - * / // % **``
(``^`` is read as ``**``), parentheses and a few math functions. It never calls ``eval``, and
it bounds the size of integers and exponents, so ``9**9**9`` is refused rather than computed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping

from . import tool_metrics
from .calculator import CalculatorError, calculator, evaluate_expression, format_number  # noqa: F401
from .sandbox import (_DEFAULT_SANDBOX_SLOTS, SandboxConfig, _LoopLocalSemaphore, probe_sandbox,  # noqa: F401
                      run_sandboxed)
from .sandbox_session import SandboxSession
from .tool_schema import _json_type_name, _validate
from .tool_result import (BAD_ARGUMENTS, CRASH, CPU_LIMIT, EXCEPTION, MEMORY_LIMIT, NONZERO_EXIT,  # noqa: F401
                          OUTPUT_TOO_LARGE, SANDBOX_ERROR, SANDBOX_VIOLATION, TIMEOUT, UNAVAILABLE,
                          UNKNOWN_TOOL, ToolCall, ToolResult)

__all__ = [
    "ToolRegistry",
    "ToolResult",
    "ToolCall",
    "SandboxConfig",
    "run_sandboxed",
    "probe_sandbox",
    "evaluate_expression",
    "calculator",
    "format_number",
    "CalculatorError",
]

_CALCULATOR_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "An arithmetic expression, e.g. '(3 + 4) * 12'."}},
    "required": ["expression"],
    "additionalProperties": False,
}
_PYTHON_SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python source code; what it prints is the result."}},
    "required": ["code"],
    "additionalProperties": False,
}


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass
class _Tool:
    name: str
    fn: Callable[..., Any] | None
    description: str
    parameters_schema: dict
    is_async: bool
    timeout: float | None
    raw_argument: str | None
    signature: inspect.Signature | None = None
    sandbox: bool = False


@dataclass
class _HungThreads:
    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (dict, list, tuple, int, float, bool)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            pass
    return str(value)


def _is_async_callable(fn: Callable) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)
    return call is not None and inspect.iscoroutinefunction(call)


class ToolRegistry:
    """Tools the model may call, run concurrently and safely. See the module docstring.

    ``builtins``: True (``python`` and ``calculator``), False, or an iterable of their names.
    ``default_timeout``: seconds per call unless the tool or the call says otherwise.
    ``max_output_chars``: longer results are truncated and reported as ``output_too_large``.
    ``max_sandboxes``: sandbox processes alive at once (per event loop): the warm pool's size;
    further calls wait for a slot (the wait does not count towards their timeout).
    ``max_hung_threads``: timed-out sync callables whose threads still run, before further sync
    calls are refused.
    ``slots``: the sandbox slots of several registries at once (one registry per episode, one
    bound for all), instead of ``max_sandboxes``.
    ``backend``: where ``python`` calls run instead of this process's sandbox pool, e.g. a
    :class:`~ossrl.rollout.tool_backend.RayToolBackend` (its ``call(name, arguments, timeout)``).
    """

    def __init__(
        self,
        *,
        builtins: bool | Iterable[str] = True,
        sandbox: SandboxConfig | None = None,
        default_timeout: float = 30.0,
        max_output_chars: int = 16_000,
        max_sandboxes: int | None = None,
        max_hung_threads: int = 64,
        backend: Any = None,
        slots: _LoopLocalSemaphore | None = None,
    ):
        self.sandbox = sandbox or SandboxConfig()
        self.default_timeout = float(default_timeout)
        self.max_output_chars = int(max_output_chars)
        self.max_hung_threads = int(max_hung_threads)
        self.backend = backend  # e.g. tool_backend.RayToolBackend: where the python tool's calls run
        self._slots = slots or (_LoopLocalSemaphore(max_sandboxes) if max_sandboxes else _DEFAULT_SANDBOX_SLOTS)
        self._tools: dict[str, _Tool] = {}
        self._hung = _HungThreads()
        self._abandoned: set[asyncio.Future] = set()
        names = {"python", "calculator"} if builtins is True else set(builtins or ())
        unknown = names - {"python", "calculator", "python_session"}
        if unknown:
            raise ValueError(f"unknown built-in tools: {sorted(unknown)}")
        self._session = SandboxSession(self.sandbox) if "python_session" in names else None
        if self._session is not None:
            self._tools["python_session"] = _Tool(
                "python_session", None,
                "Run Python code in a sandboxed interpreter kept for this whole episode, like a notebook: "
                "variables, imports and files stay from one call to the next (no network, standard "
                "library only). Returns what the code prints.",
                _PYTHON_SCHEMA, True, None, "code", None, sandbox=True)
        if "python" in names:
            self._tools["python"] = _Tool(
                "python", None,
                "Run Python code in a sandbox (no network, no files outside a temporary directory, "
                "standard library only) and return what it prints. Each call starts fresh.",
                _PYTHON_SCHEMA, True, None, "code", None, sandbox=True)
        if "calculator" in names:
            self.register("calculator", calculator, description="Evaluate an arithmetic expression "
                          "(+ - * / // % **, parentheses, sqrt, log, ...) and return the result.",
                          parameters_schema=_CALCULATOR_SCHEMA, raw_argument="expression", timeout=5.0)

    # -- registration ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str,
        parameters_schema: Mapping[str, Any],
        timeout: float | None = None,
        raw_argument: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register a Python callable (sync or async) called with keyword arguments.

        ``parameters_schema`` is a JSON Schema object (``{"type": "object", "properties": ...}``);
        arguments are checked against it (types, required, enum, bounds, additionalProperties)
        before the call. ``raw_argument`` names a string parameter that receives the whole
        argument text when it is not a JSON object (GPT-OSS sometimes writes code or an expression
        directly instead of JSON). Sync callables run in a daemon thread that cannot be killed on
        timeout: register only trusted code; model-written code belongs in the sandbox."""
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-." for c in name):
            raise ValueError(f"invalid tool name {name!r}: use letters, digits, '_', '-' or '.'")
        if name in self._tools and not replace:
            raise ValueError(f"tool {name!r} is already registered (pass replace=True)")
        if not callable(fn):
            raise TypeError(f"tool {name!r}: fn must be callable")
        if not isinstance(parameters_schema, Mapping) or parameters_schema.get("type", "object") != "object":
            raise ValueError(f"tool {name!r}: parameters_schema must be a JSON Schema with type 'object'")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if raw_argument is not None and raw_argument not in (parameters_schema.get("properties") or {}):
            raise ValueError(f"tool {name!r}: raw_argument {raw_argument!r} is not a declared parameter")
        self._tools[name] = _Tool(name, fn, str(description), json.loads(json.dumps(dict(parameters_schema))),
                                  _is_async_callable(fn), timeout, raw_argument, sig)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict]:
        """Tool definitions for the prompt: ``[{"name", "description", "parameters"}, ...]``."""
        return [{"name": t.name, "description": t.description, "parameters": t.parameters_schema}
                for t in self._tools.values()]

    @property
    def hung_threads(self) -> int:
        """Sync tool threads that timed out and are still running."""
        return self._hung.count

    # -- calling -----------------------------------------------------------------------------

    async def call(self, name: str, arguments_json: str | Mapping[str, Any] | None = "{}", *,
                   timeout: float | None = None) -> ToolResult:
        """Run one tool call. Never raises (except asyncio.CancelledError when the caller is
        cancelled) and never waits much past the timeout."""
        t0 = time.monotonic()
        sname = name if isinstance(name, str) else repr(name)
        try:
            return await self._call(sname, arguments_json, timeout, t0)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug here must not take the rollout down
            if isinstance(e, KeyboardInterrupt):
                raise
            return ToolResult(sname, False, f"Error: internal error while calling tool '{sname}': "
                              f"{type(e).__name__}: {e}", EXCEPTION, time.monotonic() - t0)
        finally:
            tool_metrics.record_call(time.monotonic() - t0)  # what the episode waited, queue included

    async def run_calls(self, calls: Iterable[ToolCall | tuple | Mapping[str, Any]], *,
                        max_concurrency: int = 64, timeout: float | None = None) -> list[ToolResult]:
        """Run many calls with at most ``max_concurrency`` in flight; results in input order.

        A call is a ToolCall, a ``(name, arguments)`` tuple, or a mapping with ``name`` and
        ``arguments`` (and optionally ``timeout``). Never raises for a bad call."""
        items = list(calls)
        results: list[ToolResult | None] = [None] * len(items)
        if not items:
            return []
        it = iter(range(len(items)))

        async def worker():
            for i in it:
                results[i] = await self._call_item(items[i], timeout)

        n = max(1, min(int(max_concurrency), len(items)))
        await asyncio.gather(*(worker() for _ in range(n)))
        return results  # type: ignore[return-value]

    async def _call_item(self, item: Any, timeout: float | None) -> ToolResult:
        try:
            if isinstance(item, ToolCall):
                name, args, t = item.name, item.arguments, item.timeout
            elif isinstance(item, Mapping):
                name, args, t = item.get("name"), item.get("arguments", "{}"), item.get("timeout")
            else:
                name, args = item[0], (item[1] if len(item) > 1 else "{}")
                t = item[2] if len(item) > 2 else None
        except Exception:
            return ToolResult(str(item)[:100], False, "Error: malformed tool call.", BAD_ARGUMENTS, 0.0)
        return await self.call(name, args, timeout=t if t is not None else timeout)

    async def _call(self, name: str, arguments: Any, timeout: float | None, t0: float) -> ToolResult:
        def fail(kind: str, msg: str) -> ToolResult:
            return ToolResult(name, False, msg, kind, time.monotonic() - t0)

        tool = self._tools.get(name)
        if tool is None:
            avail = ", ".join(sorted(self._tools)) or "none"
            return fail(UNKNOWN_TOOL, f"Error: unknown tool '{name[:100]}'. Available tools: {avail}.")
        # arguments
        if arguments is None:
            arguments = {}
        if isinstance(arguments, (bytes, bytearray)):
            arguments = bytes(arguments).decode("utf-8", "replace")
        if isinstance(arguments, str):
            text = arguments
            try:
                args = json.loads(text) if text.strip() else {}
            except (ValueError, RecursionError) as e:
                if tool.raw_argument is not None:
                    args = {tool.raw_argument: text}
                else:
                    return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' are not valid JSON ({e}).")
            if not isinstance(args, dict):
                if tool.raw_argument is not None:
                    args = {tool.raw_argument: text}
                else:
                    return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' must be a JSON object, "
                                               f"got {_json_type_name(args)}.")
        elif isinstance(arguments, Mapping):
            args = dict(arguments)
        else:
            return fail(BAD_ARGUMENTS, f"Error: the arguments of tool '{name}' must be a JSON object.")
        msg = _validate(tool.parameters_schema, args, "arguments")
        if msg:
            return fail(BAD_ARGUMENTS, f"Error: invalid arguments for tool '{name}': {msg}.")
        if tool.signature is not None:
            try:
                tool.signature.bind(**args)
            except TypeError as e:
                return fail(BAD_ARGUMENTS, f"Error: invalid arguments for tool '{name}': {e}.")
        limit = timeout if timeout is not None else (tool.timeout if tool.timeout is not None else self.default_timeout)
        limit = max(0.001, float(limit))

        if tool.sandbox:
            return await self._call_sandbox(tool, args, limit, t0)
        if tool.is_async:
            status, value = await self._run_async(tool, args, limit)
        else:
            status, value = await self._run_thread(tool, args, limit)
        if status == "ok" and inspect.isawaitable(value):  # a sync callable returned an awaitable
            remaining = max(0.001, limit - (time.monotonic() - t0))
            status, value = await self._await_bounded(value, remaining)
        if status == "timeout":
            return fail(TIMEOUT, f"Error: tool '{name}' did not finish within its {limit:g} s time limit and was stopped.")
        if status == "unavailable":
            return fail(UNAVAILABLE, f"Error: tool '{name}' is unavailable right now ({value}).")
        if status == "error":
            e = value
            text = str(e)
            if len(text) > 2000:
                text = text[:2000] + "..."
            return fail(EXCEPTION, f"Error: tool '{name}' raised {type(e).__name__}: {text}")
        try:
            text = _to_text(value)
        except Exception as e:
            return fail(EXCEPTION, f"Error: the result of tool '{name}' could not be converted to text "
                                   f"({type(e).__name__}: {e}).")
        if len(text) > self.max_output_chars:
            return fail(OUTPUT_TOO_LARGE, text[: self.max_output_chars]
                        + f"\n[output truncated: {len(text)} characters, limit {self.max_output_chars}]")
        return ToolResult(name, True, text, None, time.monotonic() - t0)

    @property
    def holds_session(self) -> bool:
        """Whether this registry keeps a ``python_session`` interpreter (one registry per episode)."""
        return self._session is not None

    def close_sessions(self) -> None:
        """Ends the ``python_session`` interpreter, if any (the episode ended or was paused); the
        next call starts a fresh one. From any thread."""
        if self._session is not None:
            self._session.close()

    async def _call_sandbox(self, tool: _Tool, args: dict, limit: float, t0: float) -> ToolResult:
        if tool.name == "python_session":  # one process, kept: no slot to wait for
            return await self._session.run(args["code"], limit, self.max_output_chars)
        if self.backend is not None:
            return await self.backend.call(tool.name, args, limit)
        # run_sandboxed bounds its own run (timeout, then a kill). Waiting for a process slot is not
        # bounded on purpose: every process ahead in the queue is.
        return await run_sandboxed(args["code"], self.sandbox, timeout=limit,
                                   max_output_chars=self.max_output_chars, name=tool.name,
                                   slots=self._slots.get())

    async def _await_bounded(self, aw: Awaitable, limit: float) -> tuple[str, Any]:
        async def guarded():
            try:
                return ("ok", await aw)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # SystemExit inside a tool must not stop the loop
                if isinstance(e, KeyboardInterrupt):
                    raise
                return ("error", e)

        task = asyncio.ensure_future(guarded())
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if task not in done:  # ignores cancellation: abandon it (keep a reference until it ends)
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
        return ("timeout", None)

    async def _run_async(self, tool: _Tool, args: dict, limit: float) -> tuple[str, Any]:
        try:
            aw = tool.fn(**args)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return ("error", e)
        if not inspect.isawaitable(aw):
            return ("ok", aw)
        return await self._await_bounded(aw, limit)

    async def _run_thread(self, tool: _Tool, args: dict, limit: float) -> tuple[str, Any]:
        hung = self._hung
        with hung.lock:
            if hung.count >= self.max_hung_threads:
                return ("unavailable", f"{hung.count} earlier calls are still running past their time limit")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        state = {"abandoned": False, "finished": False}
        lock = threading.Lock()
        fn = tool.fn

        def deliver(outcome):
            if not fut.done():
                fut.set_result(outcome)

        def runner():
            try:
                outcome = ("ok", fn(**args))
            except BaseException as e:  # SystemExit in a tool thread is an error result too
                outcome = ("error", e)
            with lock:
                state["finished"] = True
                abandoned = state["abandoned"]
            if abandoned:
                with hung.lock:
                    hung.count -= 1
                return
            try:
                loop.call_soon_threadsafe(deliver, outcome)
            except RuntimeError:  # the loop is closed
                pass

        try:
            threading.Thread(target=runner, name=f"ossrl-tool-{tool.name}", daemon=True).start()
        except RuntimeError as e:
            return ("unavailable", f"could not start a thread: {e}")
        try:
            done, _ = await asyncio.wait({fut}, timeout=limit)
        except asyncio.CancelledError:
            done = set()
            cancelled = True
        else:
            cancelled = False
        if fut in done:
            return fut.result()
        with lock:
            finished = state["finished"]
            if not finished:  # still running: abandon the thread, count it until it ends
                state["abandoned"] = True
                with hung.lock:
                    hung.count += 1
        if cancelled:
            raise asyncio.CancelledError
        if finished:  # it finished just now; its result is already on its way to this loop
            return await fut
        return ("timeout", None)
