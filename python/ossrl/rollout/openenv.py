"""OpenEnv environments as ``environment_factory`` classes (TRL's convention).

OpenEnv (``openenv-core``) serves an environment over HTTP and WebSocket; one WebSocket
connection is one episode. :func:`openenv_environment` asks the server for its action schema
once and returns a class whose instances each drive one episode:

* ``reset(**row)`` opens the connection and resets the remote environment with the row's
  columns (the server passes on those its ``reset`` accepts); the observation, as text, is
  appended to the prompt;
* a plain environment gets one tool, ``step``, whose parameters are the action's fields; an MCP
  tool environment gets one tool per MCP tool, listed from the server, with its input schema;
* ``get_reward()`` is the sum of the rewards the remote environment reported;
* ``close()`` ends the connection (the loop calls it once the episode is scored).

Write a one-line module and point ``environment_factory`` at it::

    # myenvs.py
    from ossrl.rollout.openenv import openenv_environment
    Echo = openenv_environment("http://127.0.0.1:8001")

    ossrl train environment_factory=myenvs:Echo "reward_funcs=[...]" ...

The server must accept as many concurrent sessions as episodes run at once (OpenEnv's
``SUPPORTS_CONCURRENT_SESSIONS`` and ``max_concurrent_envs``). Needs ``websockets``
(``pip install ossrl[openenv]``); nothing here imports ``openenv`` itself.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

__all__ = ["openenv_environment", "OpenEnvError", "OpenEnvEpisode"]


class OpenEnvError(RuntimeError):
    """The remote environment refused a request or could not be reached."""


def _get_json(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - a URL the user configured
            return json.loads(r.read().decode())
    except Exception as e:  # noqa: BLE001
        raise OpenEnvError(f"OpenEnv server at {url}: {type(e).__name__}: {e}") from None


def _ws_url(base: str) -> str:
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/ws"
    return base + "/ws"


def _text(obs: Any) -> str | None:
    """An observation for the model: its one text field, else JSON of its fields."""
    if obs is None or obs == {}:
        return None
    if isinstance(obs, dict):
        texts = [v for v in obs.values() if isinstance(v, str)]
        if len(obs) == 1 and texts:
            return texts[0]
    return json.dumps(obs, ensure_ascii=False, default=str)


class OpenEnvEpisode:
    """One episode of a remote OpenEnv environment; :func:`openenv_environment` makes the subclasses."""

    base_url = ""
    timeout = 60.0

    def __init__(self):
        self._ws = None
        self._lock = threading.Lock()
        self.rewards: list[float] = []
        self.done = False

    # -- the connection ----------------------------------------------------------------------

    def _connect(self):
        try:
            from websockets.sync.client import connect
        except ImportError:
            raise OpenEnvError("the OpenEnv adapter needs websockets (pip install ossrl[openenv])") from None
        try:  # held open for the episode: entered here, exited in close()
            return connect(_ws_url(self.base_url), open_timeout=self.timeout, max_size=100 << 20).__enter__()
        except Exception as e:  # noqa: BLE001
            raise OpenEnvError(f"cannot connect to the OpenEnv server at {self.base_url}: {type(e).__name__}: {e}") from None

    def _request(self, message: dict) -> dict:
        with self._lock:
            if self._ws is None:
                self._ws = self._connect()
            self._ws.send(json.dumps(message, default=str))
            reply = json.loads(self._ws.recv(timeout=self.timeout))
        if reply.get("type") == "error":
            data = reply.get("data") or {}
            raise OpenEnvError(f"{data.get('code', 'error')}: {data.get('message', reply)}")
        return reply.get("data") or {}

    def _observe(self, data: dict) -> dict:
        if isinstance(data.get("reward"), (int, float)) and not isinstance(data.get("reward"), bool):
            self.rewards.append(float(data["reward"]))
        self.done = bool(data.get("done"))
        return data.get("observation") or {}

    # -- the TRL environment contract ------------------------------------------------------------

    def reset(self, **row) -> str | None:
        self.rewards, self.done = [], False
        data = {k: v for k, v in row.items() if _jsonable(v)}
        return _text(self._observe(self._request({"type": "reset", "data": data})))

    def get_reward(self) -> float:
        return float(sum(self.rewards))

    def close(self) -> None:
        with self._lock:
            ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.send(json.dumps({"type": "close"}))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            ws.__exit__(None, None, None)

    def _step(self, action: dict) -> str:
        if self.done:
            raise ValueError("the episode is over: the environment reported done")
        return _text(self._observe(self._request({"type": "step", "data": action}))) or ""

    def _call_tool(self, name: str, arguments: dict) -> str:
        if self.done:
            raise ValueError("the episode is over: the environment reported done")
        obs = self._observe(self._request({"type": "step", "data": {"type": "call_tool", "tool_name": name,
                                                                   "arguments": arguments}}))
        if obs.get("error"):
            err = obs["error"]
            raise OpenEnvError(f"{err.get('error_type', 'error')}: {err.get('message', err)}")
        result = obs.get("result")
        if isinstance(result, dict):
            text = "".join(c.get("text", "") for c in result.get("content") or () if isinstance(c, dict))
            if result.get("is_error"):
                raise OpenEnvError(text or "the tool failed")
            if isinstance(result.get("data"), str):
                return result["data"]
            return text if text else json.dumps(result.get("data", result), default=str)
        return "" if result is None else str(result)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _step_tool(action_schema: dict):
    props = {k: v for k, v in (action_schema.get("properties") or {}).items() if k != "metadata"}
    params = {"type": "object", "properties": props}
    if action_schema.get("required"):
        params["required"] = [r for r in action_schema["required"] if r in props]

    def step(self, **action) -> str:
        return self._step(action)
    step.__doc__ = action_schema.get("description") or "Take one action in the environment."
    step.__tool_schema__ = {"description": step.__doc__, "parameters": params}
    return step


def _mcp_tool(spec: dict):
    name = spec["name"]

    def tool(self, **arguments) -> str:
        return self._call_tool(name, arguments)
    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = spec.get("description") or ""
    schema = spec.get("input_schema") or spec.get("inputSchema") or {"type": "object", "properties": {}}
    tool.__tool_schema__ = {"description": tool.__doc__, "parameters": schema}
    return tool


def openenv_environment(base_url: str, *, name: str = "OpenEnv", timeout: float = 60.0) -> type:
    """A TRL-style environment class for the OpenEnv server at ``base_url`` (see the module
    docstring). Asks the server for its schema (and, for MCP environments, its tools) now."""
    base = base_url.rstrip("/")
    schema = _get_json(base + "/schema", timeout)
    action = schema.get("action") if isinstance(schema, dict) else None
    if not isinstance(action, dict):
        raise OpenEnvError(f"OpenEnv server at {base}: /schema has no action schema")
    ns: dict[str, Any] = {"base_url": base, "timeout": float(timeout),
                          "__doc__": f"The OpenEnv environment at {base}, one episode per instance."}
    props = action.get("properties") or {}
    if action.get("title") in ("CallToolAction", "ListToolsAction") or "tool_name" in props:
        probe = type(name, (OpenEnvEpisode,), dict(ns))()
        try:
            tools = probe._observe(probe._request({"type": "step", "data": {"type": "list_tools"}})).get("tools") or []
        finally:
            probe.close()
        for spec in tools:
            if not isinstance(spec, dict) or not str(spec.get("name", "")).isidentifier():
                raise OpenEnvError(f"OpenEnv server at {base}: cannot offer the tool {spec!r:.200}")
            if spec["name"] in ("reset", "get_reward", "close") or spec["name"].startswith("_"):
                raise OpenEnvError(f"OpenEnv server at {base}: the tool name {spec['name']!r} is reserved here")
            ns[spec["name"]] = _mcp_tool(spec)
    else:
        ns["step"] = _step_tool(action)
    return type(name, (OpenEnvEpisode,), ns)
