"""What the loop trains on: rows, the episode each row starts, and its reward (TRL's conventions).

A :class:`Task` is built once, before any model, from the config and the Python objects given to
:func:`ossrl.train.run` (see :func:`build_task`); every mistake in it is an error at startup that
names the key and the row or object. The loop then only calls four things:

* ``train_row(gid)`` / ``eval_rows(n)``: the rows (dicts; ``prompt`` plus any other columns),
* ``demos(step, batch, lo, hi)``: warm-up conversations (OpenAI messages), or None: no warm-up,
* ``start(row)``: an :class:`Episode`: its harmony prompt, its tools and its environment,
* ``score(rows, episodes, trajs)``: rewards, per reward function and in total.

Environments follow TRL's ``environment_factory``: the factory is called with no arguments once
per episode; ``reset(**row)`` gets the whole row (``prompt`` included) and may return a string,
which is appended to the last prompt message (with no ``prompt`` column: it is the prompt);
every public function of the class (plain or static methods, except ``reset``, ``get_reward``
and ``close``) is a tool of that episode, its schema read from type hints and the Google-style
docstring; ``get_reward()`` (optional, sync or async) is added to the reward functions' sum;
``close()`` (optional) runs when the episode is scored or dropped.

Reward functions are called as TRL calls them, once per group of episodes: keyword arguments
``prompts`` (OpenAI messages), ``completions`` (the messages each episode added, as TRL gives
them: assistant messages with ``tool_calls`` whose ``arguments`` are parsed JSON, ``tool``
messages with the tool's ``name``, last the final answer), ``completion_ids``, every dataset
column as a list, ``trainer_state`` (``global_step``), ``log_metric(name, value)`` (logged as
``reward/NAME``), ``log_extra`` (accepted, ignored), and ``environments`` when there is one. A function
whose signature has no ``**kwargs`` gets only the arguments it names. It returns one float (or
None: not scored) per completion; several are summed with ``reward_weights``.

Failures stay inside their episode: a reset, tool or get_reward of the environment that raises,
hangs past ``tool_timeout`` or returns something unusable, and a reward function that raises or
returns the wrong number of values, give the episodes concerned reward 0 and are counted
(``env_errors``, ``reward_errors``). A failing tool is also an error message in the conversation
(the model reads it and goes on); arguments that do not match the tool's schema are the model's
error, not the environment's: they never reach the tool.

``--resume`` with an environment: the paused episodes in a checkpoint are rebuilt by a fresh
``reset(**row)`` and a replay of the tool calls they made, in order (results discarded). An
environment whose state follows from its row and the calls made (a deterministic environment)
resumes exactly; others resume from whatever that replay gives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib
import inspect
import json
import math
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..model.chat import from_openai, prompt_messages
from ..model.harmony import Message
from ..rollout.agent import tool_loop
from ..rollout.function_tools import function_schema
from ..rollout.tools import ToolRegistry
from .data import epoch_order, hash_split, load_rows

__all__ = ["Task", "Episode", "build_task", "resolve", "TaskError", "env_tool_names"]

BUILTIN_TOOLS = ("calculator", "python", "python_session")
_NOT_TOOLS = {"reset", "get_reward", "close"}


class TaskError(ValueError):
    """A task that cannot run: names the config key and the object or row."""


def resolve(path: Any, key: str) -> Any:
    """The object an import path ``pkg.mod:name`` names (objects pass through). The working
    directory is importable, as for ``python -m``."""
    if not isinstance(path, str):
        return path
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise TaskError(f"config key {key!r}: {path!r} must look like 'package.module:name'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod)
    except Exception as e:
        raise TaskError(f"config key {key!r}: cannot import {mod!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"config key {key!r}: {mod!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


# ---- calls that may hang: async ones on the tool loop, sync ones in daemon threads ----

shared_loop = tool_loop  # tools, resets and rewards of environments share the rollout's tool loop


def call_bounded(fn: Callable, args: tuple = (), kwargs: dict | None = None, timeout: float = 30.0) -> Any:
    """``fn(*args, **kwargs)`` (sync, async, or sync returning an awaitable) with a time limit;
    raises what it raised, or TimeoutError. A sync call that hangs keeps its daemon thread."""
    kwargs = kwargs or {}
    if inspect.iscoroutinefunction(fn):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(fn(*args, **kwargs), timeout),
                                                shared_loop()).result()
    box: cf.Future = cf.Future()

    def work():
        try:
            box.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box.set_exception(e)
    threading.Thread(target=work, name="ossrl-env-call", daemon=True).start()
    try:
        value = box.result(timeout)
    except cf.TimeoutError:
        raise TimeoutError(f"did not return within {timeout:g} s") from None
    if inspect.isawaitable(value):
        async def wait():
            return await asyncio.wait_for(value, timeout)
        return asyncio.run_coroutine_threadsafe(wait(), shared_loop()).result()
    return value


# ---- environments ----


def env_tool_names(cls: type) -> list[str]:
    """The environment's tools, chosen as TRL chooses them: the class's public functions (plain
    and static methods; not classmethods or properties), except reset, get_reward and close."""
    return [n for n in dir(cls) if not n.startswith("_") and n not in _NOT_TOOLS
            and inspect.isfunction(getattr(cls, n, None))]


def _env_schemas(cls: Any) -> list[dict]:
    if not callable(cls):
        raise TaskError(f"config key 'environment_factory': {cls!r} is not a class or callable")
    if not callable(getattr(cls, "reset", None)):
        raise TaskError(f"config key 'environment_factory': {getattr(cls, '__name__', cls)!r} has no reset() method")
    out = []
    for name in env_tool_names(cls):
        attr = inspect.getattr_static(cls, name)
        fn = getattr(cls, name)
        if not isinstance(attr, (staticmethod, classmethod)) and inspect.isfunction(fn):
            fn = types.MethodType(fn, object())  # drops self for the signature
        given = getattr(fn, "__tool_schema__", None)  # methods made at run time (OpenEnv's MCP tools)
        if isinstance(given, dict):
            out.append({"name": name, "description": given.get("description", ""),
                        "parameters": given.get("parameters", {"type": "object", "properties": {}})})
            continue
        try:
            out.append(function_schema(fn, name))
        except TypeError as e:
            raise TaskError(f"config key 'environment_factory': {getattr(cls, '__name__', cls)}.{e}") from None
    return out


@dataclass
class Episode:
    """One episode's runtime: its harmony prompt, the tools it may call, its environment."""

    prompt: list[Message]
    registry: ToolRegistry
    env: Any = None
    error: str | None = None  # the environment failed before the episode could start
    env_errors: int = 0

    def close(self) -> None:
        self.registry.close_sessions()
        closer = getattr(self.env, "close", None)
        self.env = None
        if callable(closer):
            try:
                call_bounded(closer, timeout=10.0)
            except BaseException:  # noqa: BLE001 - a failing close must not stop the loop
                pass


@dataclass
class Scores:
    totals: list[float]
    by_func: dict[str, list[float | None]] = field(default_factory=dict)
    reward_errors: int = 0
    env_errors: int = 0
    logged: dict[str, list] = field(default_factory=dict)  # what reward functions gave log_metric


@dataclass
class Task:
    name: str
    train_row: Callable[[int], dict]
    eval_rows: Callable[[int], list[dict]]
    demos: Callable[[int, int, int, int], list[list[dict]]] | None
    reward_funcs: list[Callable]
    reward_weights: list[float]
    tools: list[Any]  # built-in names and functions
    environment_factory: Any = None
    preamble: bool = True
    success_threshold: float = 1.0
    tool_timeout: float = 5.0
    specs: list[dict] = field(default_factory=list)  # every tool's schema, for the prompt
    env_tools: list[str] = field(default_factory=list)
    agent: Any = None  # async def fn(client, **row): episodes through the OpenAI API (ossrl.train.agents)
    tool_options: dict = field(default_factory=dict)  # ToolRegistry keywords: sandbox, slots, backend

    def __post_init__(self):
        self._shared: ToolRegistry | None = None
        self.func_names = _unique([getattr(f, "__name__", type(f).__name__) for f in self.reward_funcs])

    def reward_names(self) -> list[str]:
        """What ``score`` reports in ``by_func``: each reward function, then get_reward."""
        has = self.environment_factory is not None and hasattr(self.environment_factory, "get_reward")
        return self.func_names + (["get_reward"] if has else [])

    def registry(self, env: Any = None) -> ToolRegistry:
        # python_session keeps an interpreter per episode: such registries are never shared
        shared = env is None and "python_session" not in self.tools
        if shared and self._shared is not None:
            return self._shared
        reg = ToolRegistry(builtins=[t for t in self.tools if isinstance(t, str)], default_timeout=self.tool_timeout,
                           **self.tool_options)
        for fn in self.tools:
            if not isinstance(fn, str):
                s = function_schema(fn)
                reg.register(s["name"], fn, description=s["description"], parameters_schema=s["parameters"])
        if env is not None:
            for s in self.specs:
                if s["name"] in self.env_tools:
                    reg.register(s["name"], getattr(env, s["name"]), description=s["description"],
                                 parameters_schema=s["parameters"])
        elif shared:
            self._shared = reg
        return reg

    def messages(self, row: dict, observation: str | None = None) -> list[Message]:
        msgs = prompt_messages(row["prompt"]) if "prompt" in row else []
        if observation is not None:  # TRL: appended to the last prompt message (or the prompt itself)
            if msgs and isinstance(msgs[-1].get("content"), str):
                msgs = msgs[:-1] + [{**msgs[-1], "content": msgs[-1]["content"] + observation}]
            else:
                msgs = msgs + [{"role": "user", "content": observation}]
        if not any(m["role"] == "user" for m in msgs):
            raise TaskError(f"task {self.name!r}: the episode has no user message (no prompt and reset returned nothing)")
        return from_openai(msgs, self.specs, preamble=self.preamble)

    def conversation(self, messages: list[dict]) -> list[Message]:
        return from_openai(messages, self.specs, preamble=self.preamble)

    def start(self, row: dict) -> Episode:
        """A new episode for ``row``: a fresh environment reset with the row's columns."""
        if self.environment_factory is None:
            return Episode(self.messages(row), self.registry())
        try:
            env = call_bounded(self.environment_factory, timeout=self.tool_timeout)
            obs = call_bounded(env.reset, kwargs=_columns(row), timeout=self.tool_timeout)  # the whole row, as TRL
            if obs is not None and not isinstance(obs, str):
                raise TypeError(f"reset() must return a string or None, got {type(obs).__name__}")
            return Episode(self.messages(row, obs), self.registry(env), env)
        except BaseException as e:  # noqa: BLE001 - the episode fails, the run goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            prompt = self.messages(row) if "prompt" in row else [Message("user", "")]
            return Episode(prompt, self.registry(), None, error=f"{type(e).__name__}: {e}", env_errors=1)

    def replay(self, ep: Episode, chat: list[dict]) -> None:
        """Re-applies an episode's tool calls to a fresh environment (``--resume``)."""
        if ep.env is None:
            return
        for m in chat:
            for call in m.get("tool_calls") or ():
                fn = call.get("function", {})
                if fn.get("name") not in self.env_tools:
                    continue
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                    call_bounded(getattr(ep.env, fn["name"]), kwargs=args if isinstance(args, dict) else {},
                                 timeout=self.tool_timeout)
                except BaseException:  # noqa: BLE001 - it failed the first time too
                    pass

    def score(self, rows: Sequence[dict], episodes: Sequence[Episode], prompts: Sequence[list[dict]],
              completions: Sequence[list[dict]], completion_ids: Sequence[list[int]], step: int = 0) -> Scores:
        """Rewards of one batch (a group, or held-out episodes): reward functions plus get_reward."""
        n = len(rows)
        failed = [ep.error is not None for ep in episodes]
        totals = [0.0] * n
        out = Scores(totals)
        kwargs: dict[str, Any] = {"prompts": list(prompts), "completions": list(completions),
                                  "completion_ids": list(completion_ids),
                                  "trainer_state": types.SimpleNamespace(global_step=step),
                                  "log_metric": lambda name, value: out.logged.setdefault(str(name), []).append(value),
                                  "log_extra": lambda column, values: None}
        for key in sorted({k for r in rows for k in r if k != "prompt"}):
            kwargs[key] = [r.get(key) for r in rows]
        if self.environment_factory is not None:
            kwargs["environments"] = [ep.env for ep in episodes]
        for fn, name, w in zip(self.reward_funcs, self.func_names, self.reward_weights):
            values = _call_reward(fn, kwargs, n)
            if values is None:
                out.reward_errors += n
                failed = [True] * n
                values = [None] * n
            for i, v in enumerate(values):
                if v is not None and not math.isfinite(v):
                    out.reward_errors += 1
                    failed[i], values[i] = True, None
            out.by_func[name] = values
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] += w * v
        if self.environment_factory is not None and hasattr(self.environment_factory, "get_reward"):
            got = []
            for i, ep in enumerate(episodes):
                v = None
                if ep.env is not None:
                    try:
                        v = _number(call_bounded(ep.env.get_reward, timeout=self.tool_timeout))
                    except BaseException as e:  # noqa: BLE001
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        v = None
                    if v is None:
                        out.env_errors += 1
                        failed[i] = True
                    else:
                        totals[i] += v
                got.append(v)
            out.by_func["get_reward"] = got
        out.env_errors += sum(ep.env_errors for ep in episodes)
        for i in range(n):
            if failed[i]:
                totals[i] = 0.0
        return out


def _columns(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(k, str) and k.isidentifier()}


def _unique(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        k, j = n, 2
        while k in out:
            k, j = f"{n}_{j}", j + 1
        out.append(k)
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numbers

            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                v = float(v)
            else:
                return None
        except Exception:
            return None
    v = float(v)
    return v if math.isfinite(v) else None


def _accepts(fn: Callable, kwargs: dict) -> dict:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def _call_reward(fn: Callable, kwargs: dict, n: int) -> list[float | None] | None:
    """One reward function on one batch: its values, or None when it failed as a whole."""
    try:
        args = _accepts(fn, kwargs)
        if inspect.iscoroutinefunction(fn):
            values = asyncio.run_coroutine_threadsafe(fn(**args), shared_loop()).result()
        else:
            values = fn(**args)
        values = list(values)
    except Exception:  # noqa: BLE001 - counted as reward_errors; the episodes get 0
        return None
    if len(values) != n:
        return None
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
        else:
            num = _number(v)
            out.append(num if num is not None else float("nan"))
    return out


# ---- building a task from the config ----


def build_task(cfg, *, environment_factory: Any = None, reward_funcs: Sequence[Any] | None = None,
               tools: Sequence[Any] | None = None, agent: Any = None) -> Task:
    """The task the config (and the objects passed from Python, which take precedence over the
    config's import paths) describes. Everything is checked here, before any model is built."""
    from .tasks import builtin_task

    env = environment_factory if environment_factory is not None else (
        resolve(cfg.environment_factory, "environment_factory") if cfg.environment_factory else None)
    agent = agent if agent is not None else (resolve(cfg.agent, "agent") if cfg.agent else None)
    if agent is not None:
        if env is not None:
            raise TaskError("config keys 'agent' and 'environment_factory' exclude each other: an agent brings its own loop")
        if not inspect.iscoroutinefunction(agent):
            raise TaskError(f"config key 'agent': {getattr(agent, '__name__', agent)!r} must be an async function "
                            "`async def fn(client, **row) -> float | None`")
        if not cfg.dataset:
            raise TaskError("config key 'agent' needs a 'dataset' (one episode per row)")
        try:
            import openai  # noqa: F401
        except ImportError:
            raise TaskError("config key 'agent': agents get an openai.AsyncOpenAI client: pip install openai") from None
    user = bool(cfg.dataset) or env is not None
    if user and cfg.task:
        raise TaskError(f"config key 'task' ({cfg.task!r}) cannot be combined with "
                        f"{'dataset' if cfg.dataset else 'environment_factory'}: a dataset or an environment "
                        "replaces the built-in task")
    funcs = list(reward_funcs) if reward_funcs is not None else [resolve(p, "reward_funcs") for p in cfg.reward_funcs]
    for t in (cfg.tools if tools is None else tools):
        if isinstance(t, str) and t not in BUILTIN_TOOLS and ":" not in t:
            raise TaskError(f"config key 'tools': unknown built-in tool {t!r} (built in: {', '.join(BUILTIN_TOOLS)}; "
                            "or give an import path 'package.module:function')")
    tool_list = list(tools) if tools is not None else [t if t in BUILTIN_TOOLS else resolve(t, "tools")
                                                        for t in cfg.tools]
    if not user:
        return builtin_task(cfg, funcs, tool_list)
    for f in funcs:
        if not callable(f):
            raise TaskError(f"config key 'reward_funcs': {f!r} is not callable")
    if not funcs and agent is None and (env is None or not hasattr(env, "get_reward")):
        raise TaskError("nothing gives a reward: set reward_funcs, or give the environment a get_reward() method")
    weights = list(cfg.reward_weights) or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise TaskError(f"config key 'reward_weights': {len(weights)} weights for {len(funcs)} reward functions")
    seed = cfg.seed
    rows = eval_rows = None
    if cfg.dataset:
        rows = load_rows(cfg.dataset, need="prompt", what="dataset")
        if cfg.eval_dataset:
            eval_rows = load_rows(cfg.eval_dataset, need="prompt", what="eval_dataset")
        else:
            rows, eval_rows = hash_split(rows)
    elif cfg.eval_dataset:
        raise TaskError("config key 'eval_dataset' needs 'dataset' as well")
    else:  # an environment that makes its own prompts (reset returns it): every row is empty
        rows, eval_rows = [{}], None
    demos = None
    if cfg.sft_dataset:
        sft = load_rows(cfg.sft_dataset, need="messages", what="sft_dataset")

        def demos(step: int, batch: int, lo: int, hi: int) -> list[list[dict]]:
            return [sft[epoch_order(len(sft), (step - 1) * batch + j, seed, "sft")]["messages"] for j in range(lo, hi)]
    specs, names = [], []
    for t in tool_list:
        if isinstance(t, str):
            if t not in BUILTIN_TOOLS:
                raise TaskError(f"config key 'tools': unknown built-in tool {t!r} (built in: {', '.join(BUILTIN_TOOLS)}; "
                                "or give an import path 'package.module:function')")
            specs.append(ToolRegistry(builtins=[t]).specs()[0])
        else:
            if not callable(t):
                raise TaskError(f"config key 'tools': {t!r} is not callable")
            try:
                specs.append(function_schema(t))
            except TypeError as e:
                raise TaskError(f"config key 'tools': {e}") from None
    env_specs = _env_schemas(env) if env is not None else []
    for s in specs + env_specs:
        if s["name"] in names:
            raise TaskError(f"two tools are named {s['name']!r} (tools and the environment's methods)")
        names.append(s["name"])
    name = getattr(env, "__name__", None) or os.path.basename(str(cfg.dataset)) or "task"
    return Task(
        name=name,
        train_row=lambda gid: dict(rows[epoch_order(len(rows), gid, seed, "train")]),
        eval_rows=(lambda n: [dict(r) for r in eval_rows[:n]]) if eval_rows is not None else (lambda n: [{} for _ in range(n)]),
        demos=demos, reward_funcs=funcs, reward_weights=weights, tools=tool_list, environment_factory=env,
        preamble=cfg.chat_preamble, success_threshold=cfg.success_threshold, tool_timeout=cfg.tool_timeout,
        specs=[_openai_spec(s) for s in specs + env_specs], env_tools=[s["name"] for s in env_specs], agent=agent,
        tool_options=_tool_options(cfg, tool_list))


def _tool_options(cfg, tools: list) -> dict:
    """The sandboxed tools' pool and backend from the config, shared by every episode's registry."""
    if not any(t in ("python", "python_session") for t in tools):
        return {}
    from ..rollout.sandbox import SandboxConfig, _LoopLocalSemaphore

    sandbox = SandboxConfig(pool=cfg.sandbox_pool, pool_idle_seconds=cfg.sandbox_idle_s,
                            pool_memory_bytes=cfg.sandbox_pool_memory_mb << 20)
    out: dict = {"sandbox": sandbox}
    if cfg.sandbox_slots:
        out["slots"] = _LoopLocalSemaphore(cfg.sandbox_slots)
    if cfg.tool_backend == "ray" and "python" in tools:
        from ..rollout.tool_backend import RayToolBackend

        out["backend"] = RayToolBackend(address=cfg.ray_address or None, sandbox=sandbox,
                                        max_sandboxes=cfg.sandbox_slots or None)
    return out


def _openai_spec(s: dict) -> dict:
    return {"name": s["name"], "description": s.get("description", ""), "parameters": s["parameters"]}
