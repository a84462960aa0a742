"""The OpenEnv adapter against real environments served by openenv-core on 127.0.0.1: a plain
environment (reset / step over the WebSocket) and an MCP tool environment, each driven as a
TRL-style environment_factory through ossrl's task machinery."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("websockets")
core = pytest.importorskip("openenv.core.env_server")
uvicorn = pytest.importorskip("uvicorn")

from openenv.core.env_server import Action, Environment, Observation, State, create_app  # noqa: E402

from ossrl.rollout.openenv import OpenEnvError, openenv_environment  # noqa: E402
from ossrl.train.config import load_config  # noqa: E402
from ossrl.train.task import build_task  # noqa: E402


class CounterAction(Action):
    step: int


class CounterObservation(Observation):
    counter: int = 0


class CounterEnv(Environment):
    """Adds each action's step to a counter; the reward is the step; done at 10 or more."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        self.counter, self.n = 0, 0

    def reset(self, seed=None, episode_id=None, start: int = 0, **kwargs) -> CounterObservation:
        self.counter, self.n = int(start), 0
        return CounterObservation(counter=self.counter)

    def step(self, action: CounterAction, timeout_s=None, **kwargs) -> CounterObservation:
        self.counter += action.step
        self.n += 1
        return CounterObservation(counter=self.counter, reward=float(action.step), done=self.counter >= 10)

    @property
    def state(self) -> State:
        return State(step_count=self.n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    servers = []

    def start(app) -> str:
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        t0 = time.monotonic()
        while not server.started:
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        servers.append(server)
        return f"http://127.0.0.1:{port}"
    yield start
    for s in servers:
        s.should_exit = True


def test_a_plain_openenv_environment_runs_as_an_environment_factory(serve, tmp_path):
    url = serve(create_app(CounterEnv, CounterAction, CounterObservation, max_concurrent_envs=8))
    Env = openenv_environment(url, name="Counter")
    a, b = Env(), Env()  # two episodes at once: two sessions, separate state
    assert json.loads(a.reset(start=3, prompt="ignored by the server")) == {"counter": 3}
    assert json.loads(b.reset(start=0)) == {"counter": 0}
    assert json.loads(a.step(step=4)) == {"counter": 7} and json.loads(b.step(step=1)) == {"counter": 1}
    assert json.loads(a.step(step=5)) == {"counter": 12} and a.done
    with pytest.raises(ValueError, match="episode is over"):
        a.step(step=1)
    assert a.get_reward() == 9.0 and b.get_reward() == 1.0
    with pytest.raises(OpenEnvError, match="VALIDATION_ERROR"):
        b.step(step="not a number")
    a.close()
    b.close()
    # through the task machinery: the schema the model sees, the tool, get_reward
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Count to ten.", "start": 2}) + "\n")
    task = build_task(load_config(None, [f"dataset={rows}"]), environment_factory=Env)
    (spec,) = task.specs
    assert spec["name"] == "step" and spec["parameters"]["properties"]["step"]["type"] == "integer"
    ep = task.start({"prompt": "Count to ten.", "start": 2})
    assert ep.error is None and ep.prompt[-1].content.endswith('{"counter": 2}')  # the observation, appended
    r = asyncio.run(ep.registry.call("step", '{"step": 3}'))
    assert r.ok and json.loads(r.content) == {"counter": 5}
    bad = asyncio.run(ep.registry.call("step", '{"step": "x"}'))
    assert not bad.ok and bad.error == "bad_arguments"  # checked against the action schema before the call
    sc = task.score([{"start": 2}], [ep], [[]], [[]], [[]])
    assert sc.by_func["get_reward"] == [3.0] and sc.totals == [3.0]
    ep.close()


def test_an_mcp_openenv_environment_offers_its_tools(serve):
    fastmcp = pytest.importorskip("fastmcp")
    from openenv.core.env_server.mcp_environment import MCPEnvironment
    from openenv.core.env_server.mcp_types import CallToolAction, CallToolObservation

    class Calc(MCPEnvironment):
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            mcp = fastmcp.FastMCP("calc")

            @mcp.tool()
            def add(a: int, b: int) -> int:
                """Add two integers."""
                return a + b

            @mcp.tool()
            def fail(reason: str) -> str:
                """Always fails."""
                raise ValueError(reason)
            super().__init__(mcp)

        def reset(self, seed=None, episode_id=None, **kwargs):
            return Observation()

        def _step_impl(self, action, timeout_s=None, **kwargs):
            return Observation()

        @property
        def state(self):
            return State()

    url = serve(create_app(Calc, CallToolAction, CallToolObservation, max_concurrent_envs=4))
    Env = openenv_environment(url, name="Calc")
    assert {"add", "fail"} <= {n for n in dir(Env) if not n.startswith("_")}
    e = Env()
    assert e.reset() is None
    assert e.add(a=2, b=40) == "42"
    with pytest.raises(OpenEnvError):
        e.fail(reason="on purpose")
    e.close()
    task = build_task(load_config(None), environment_factory=Env, reward_funcs=[lambda completions, **k: [0.0] * len(completions)])
    assert {s["name"] for s in task.specs} == {"add", "fail"}
    add = next(s for s in task.specs if s["name"] == "add")
    assert add["parameters"]["properties"]["a"]["type"] == "integer" and add["description"] == "Add two integers."


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(OpenEnvError, match="127.0.0.1"):
        openenv_environment(f"http://127.0.0.1:{_free_port()}", timeout=2)
