"""Bringing your own task: datasets, reward functions, tools, TRL-style environments, the
Python entry point, and what bad input does (ossrl.train.task, data, episodes; ossrl.model.chat)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import types
from typing import Literal

import pytest

from ossrl.model import ByteTokenizer
from ossrl.model.chat import ChatFormatError, from_openai, to_openai
from ossrl.model.harmony import Message, encode_completion, parse_completion
from ossrl.rollout.agent import advance
from ossrl.rollout.engine import Completion, Resume, SamplingParams
from ossrl.rollout.function_tools import ToolSchemaError, function_schema
from ossrl.train.config import load_config
from ossrl.train.data import DatasetError, hash_split, load_rows
from ossrl.train.episodes import Group, _start, demo_trajectory, score, trl_completion
from ossrl.train.task import TaskError, build_task

ROWS = [{"prompt": "What is 2+3?", "answer": "5", "level": 1, "tags": ["a", "b"]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And 4*4?"}],
         "answer": "16", "level": 2, "tags": ["c"]}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- datasets ----------------------------------------------------------------------------------


def test_every_dataset_format_gives_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "What is 2+3?", "answer": "5", "level": 1}, {"prompt": "And 4*4?", "answer": "16", "level": 2}]
    assert load_rows(_write_jsonl(tmp_path / "d.jsonl", rows)) == rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(tmp_path / "d.parquet") == rows
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(tmp_path / "saved") == rows
    # messages as the prompt, in every format
    msgs = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    assert load_rows(_write_jsonl(tmp_path / "m.jsonl", msgs)) == msgs
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "m_saved"))
    assert load_rows(tmp_path / "m_saved") == msgs


@pytest.mark.parametrize("content, match", [
    ('{"answer": 1}\n', r"row 0: no 'prompt' column"),
    ('{"prompt": "a"}\nnot json\n', r"line 2: not JSON"),
    ('["a list"]\n', r"line 1: a row must be a JSON object"),
    ('{"prompt": 5}\n', r"row 0: prompt: expected a string or a non-empty list"),
    ('{"prompt": [{"role": "wizard", "content": "x"}]}\n', r"row 0: prompt\[0\]: expected a message with a role"),
    ("\n", r"has no rows"),
])
def test_bad_datasets_name_the_file_and_row(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DatasetError, match=match) as e:
        load_rows(f)
    assert "bad.jsonl" in str(e.value)


def test_missing_and_foreign_dataset_files(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"expected a \.jsonl or \.parquet"):
        load_rows(tmp_path / "x.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError, match="save_to_disk"):
        load_rows(tmp_path / "folder")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_rows(tmp_path / "junk.parquet")


def test_hash_split_is_fixed_and_disjoint():
    rows = [{"prompt": f"q{i}"} for i in range(400)]
    train, held = hash_split(rows)
    assert (train, held) == hash_split(list(rows))  # the same split every time, on every machine
    assert 20 < len(held) < 80 and len(train) + len(held) == 400  # ~1/8 held out
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


# ---- tools from functions ----------------------------------------------------------------------


def _search(query: str, limit: int = 5, mode: "str | None" = None) -> str:
    """Search the notes.

    Args:
        query: What to look for,
            over two lines.
        limit: How many hits.
        mode: Optional mode.

    Returns:
        The hits.
    """
    return query


def test_function_schema_from_hints_and_docstring():

    s = function_schema(_search)
    assert s["name"] == "_search" and s["description"] == "Search the notes."
    p = s["parameters"]
    assert p["required"] == ["query"]
    assert p["properties"]["query"] == {"type": "string", "description": "What to look for, over two lines."}
    assert p["properties"]["limit"] == {"type": "integer", "description": "How many hits.", "default": 5}
    assert p["properties"]["mode"]["type"] == ["string", "null"]

    def pick(color: Literal["red", "blue"], sizes: list[int], extra: dict[str, float]) -> str:
        """Pick."""
    q = function_schema(pick)["parameters"]["properties"]
    assert q == {"color": {"enum": ["red", "blue"]}, "sizes": {"type": "array", "items": {"type": "integer"}},
                 "extra": {"type": "object", "additionalProperties": {"type": "number"}}}


def test_functions_that_cannot_be_tools_are_named():
    def no_hint(x) -> str:
        """x."""

    def star(*args: int) -> str:
        """x."""

    with pytest.raises(ToolSchemaError, match=r"'no_hint'.*parameter 'x' has no type hint"):
        function_schema(no_hint)
    with pytest.raises(ToolSchemaError, match="star"):
        function_schema(star)


# ---- OpenAI chat <-> harmony -------------------------------------------------------------------


def test_openai_messages_render_to_harmony_and_back():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "reasoning_content": "Use the tool.", "content": None,
             "tool_calls": [{"id": "c7", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "c7", "content": "5"},
            {"role": "assistant", "content": "5"}]
    tools = [{"type": "function", "function": function_schema(_search)}]
    h = from_openai(msgs, tools)
    assert [m.role for m in h] == ["system", "developer", "user", "assistant", "assistant", "functions.add", "assistant"]
    assert "# Instructions\n\nBe brief." in h[1].content and "namespace functions" in h[1].content
    assert (h[3].channel, h[3].content) == ("analysis", "Use the tool.")
    assert (h[4].recipient, h[4].content_type, h[4].content) == ("functions.add", "json", '{"a": 2, "b": 3}')
    assert (h[5].recipient, h[5].content) == ("assistant", "5") and h[6].channel == "final"
    # without the preamble, a bare conversation is exactly its messages
    assert [m.role for m in from_openai(msgs[1:], preamble=False)] == ["user", "assistant", "assistant",
                                                                         "functions.add", "assistant"]
    # what a model writes comes back as OpenAI messages
    tok = ByteTokenizer()
    turn = encode_completion(tok, Message("assistant", "think", channel="analysis"))[:-1] + \
        [tok.special_id("<|end|>"), tok.special_id("<|start|>")] + tok.encode("assistant", allow_special=False) + \
        encode_completion(tok, h[4])
    out = to_openai(parse_completion(turn, tok), first_call=3)
    assert out == [{"role": "assistant", "content": None, "reasoning_content": "think",
                    "tool_calls": [{"id": "call_3", "type": "function",
                                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}]
    assert trl_completion(out)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    assert trl_completion(out)[0]["content"] == ""
    # an answer cut off by the token limit is neither an answer nor a call
    assert to_openai([Message("assistant", "12", channel="final", end=None)]) == []
    with pytest.raises(ChatFormatError, match=r"messages\[0\]: unknown role"):
        from_openai([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match=r"messages\[1\]: a tool message needs"):
        from_openai([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


# ---- a TRL-style environment, driven by a scripted engine ---------------------------------------


class Counter:
    """A TRL-style environment with state across turns, an async tool and get_reward."""

    instances: list = []

    def __init__(self):
        self.total = 0
        self.calls = []
        self.closed = False
        Counter.instances.append(self)

    def reset(self, start: int = 0, **row) -> str:
        self.total = start
        return f" [start at {start}]"

    def add(self, n: int) -> str:
        """Add a number to the running total.

        Args:
            n: The number to add.
        """
        self.calls.append(n)
        self.total += n
        return str(self.total)

    async def double(self) -> str:
        """Double the running total."""
        await asyncio.sleep(0.01)
        self.total *= 2
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total)

    def close(self):
        self.closed = True


def seen(completions, start, environments, prompts, trainer_state, **kwargs):
    """A reward function that checks what TRL would hand it."""
    assert len(completions) == len(start) == len(environments) == len(prompts)
    assert trainer_state.global_step >= 0
    return [1.0 if c and c[-1]["content"] == str(e.total) else 0.0 for c, e in zip(completions, environments)]


class _Engine:
    """Stands in for Engine: the episode whose prompt contains ``[start at S]`` writes the turns
    of script[S]; a Resume starts its next turn."""

    def __init__(self, tok, script):
        self.tok, self.script, self.state, self.kept, self.running, self.ids = tok, script, {}, {}, [], 0

    def add_request(self, prompt, params, *, keep=False, seed=None):
        if isinstance(prompt, Resume):
            key = self.kept.pop(prompt.handle)
            self.state[key] += 1
        else:
            text = self.tok.decode([t for t in prompt if t not in self.tok.special_ids])
            key = int(re.findall(r"\[start at (\d+)\]", text)[0])
            self.state.setdefault(key, 0)
        self.ids += 1
        seq = types.SimpleNamespace(id=self.ids, key=key, keep=keep, out=None)
        self.running.append(seq)
        return seq

    def can_step(self):
        return bool(self.running)

    def step(self):
        done, self.running = self.running, []
        for seq in done:
            toks = self.script[seq.key][self.state[seq.key]]
            seq.out = Completion(list(toks), [-0.1] * len(toks), "stop")
            if seq.keep:
                seq.out.handle = seq.id
                self.kept[seq.id] = seq.key
        return done

    def release(self, handle):
        self.kept.pop(handle, None)

    def abort(self, seq):
        self.running.remove(seq)
        return Completion([], [], "aborted")


def _call(tok, name, args):
    return encode_completion(tok, Message("assistant", args, channel="commentary", recipient=f"functions.{name}",
                                          content_type="json"))


def _final(tok, text):
    return encode_completion(tok, Message("assistant", text, channel="final"))


def _env_task(tmp_path, **extra):
    rows = [{"prompt": "Count.", "start": s} for s in (1, 2, 3)]
    cfg = load_config(None, [f"dataset={_write_jsonl(tmp_path / 'rows.jsonl', rows)}", "max_turns=6",
                             "tool_timeout=1.0"] + [f"{k}={v}" for k, v in extra.items()])
    return build_task(cfg, environment_factory=Counter, reward_funcs=[seen])


def _run(task, tok, rows, script):
    eps, trajs = zip(*(_start(task, tok, r, i) for i, r in enumerate(rows)))
    advance(_Engine(tok, script), tok, [e.registry for e in eps], list(trajs), SamplingParams(max_new_tokens=64),
            max_turns=6, tool_timeout=1.0)
    return list(eps), list(trajs), score(task, rows, list(eps), list(trajs))


def test_environment_state_persists_across_turns_and_rewards_see_it(tmp_path):
    tok = ByteTokenizer()
    task = _env_task(tmp_path)
    assert [s["name"] for s in task.specs] == ["add", "double"]  # public methods; not reset/get_reward/close
    rows = [{"prompt": "Count.", "start": s} for s in (1, 2)]
    script = {1: [_call(tok, "add", '{"n": 2}'), _call(tok, "double", "{}"), _final(tok, "6")],  # (1+2)*2
              2: [_call(tok, "add", '{"n": 5}'), _final(tok, "99")]}  # wrong answer: 7
    eps, trajs, sc = _run(task, tok, rows, script)
    assert [e.env.total for e in eps] == [6, 7] and eps[0].env.calls == [2]
    assert sc.by_func["seen"] == [1.0, 0.0] and sc.by_func["get_reward"] == [6.0, 7.0]
    assert sc.totals == [7.0, 7.0] and sc.reward_errors == sc.env_errors == 0
    c = trajs[0].chat  # what the episode added, OpenAI-style
    assert [m["role"] for m in c] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert c[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"n": 2}'}
    assert c[1] == {"role": "tool", "tool_call_id": "call_0", "name": "add", "content": "3"}
    assert c[3]["content"] == "6" and c[4]["content"] == "6"
    # the reset's string was appended to the prompt (TRL): the prompt tokens hold it
    assert "Count. [start at 1]" in tok.decode([t for t in trajs[0].tokens if t not in tok.special_ids])


class Fragile(Counter):
    def reset(self, start: int = 0, **row):
        if start == 2:
            raise RuntimeError("reset broke")
        if start == 3:
            time.sleep(5)  # hangs past tool_timeout
        return super().reset(start)

    def add(self, n: int) -> str:
        """Add.

        Args:
            n: n.
        """
        if n == 13:
            raise ValueError("unlucky")
        if n == 14:
            time.sleep(5)
        return super().add(n)

    def weird(self) -> object:
        """Returns something that cannot be printed."""
        class Bad:
            def __str__(self):
                raise RuntimeError("no text")
        return Bad()


def test_failures_stay_in_their_episode_and_are_counted(tmp_path):
    tok = ByteTokenizer()
    task = build_task(load_config(None, [f"dataset={_write_jsonl(tmp_path / 'r.jsonl', [{'prompt': 'x'}])}",
                                         "tool_timeout=0.5"]), environment_factory=Fragile, reward_funcs=[seen])
    rows = [{"prompt": "Count.", "start": s} for s in (1, 2, 3, 4)]
    script = {1: [_call(tok, "add", '{"n": 13}'), _call(tok, "add", '{"n": 14}'), _call(tok, "weird", "{}"),
                  _final(tok, "1")],
              4: [_final(tok, "4")]}
    t0 = time.monotonic()
    eps, trajs, sc = _run(task, tok, rows, script)
    assert time.monotonic() - t0 < 4  # the hanging reset and tool were cut off
    assert [t.finish for t in trajs] == ["answer", "env_error", "env_error", "answer"]
    errors = [m["content"] for m in trajs[0].chat if m["role"] == "tool"]
    assert "ValueError: unlucky" in errors[0] and "time limit" in errors[1] and "could not be converted" in errors[2]
    assert sc.totals[1] == sc.totals[2] == 0.0 and sc.totals[3] == 5.0  # reward 1 (seen) + get_reward 4
    assert sc.totals[0] == 0.0  # its tools failed: reward 0 although its answer matches its total
    assert sc.env_errors == 2 + 3  # two resets; three tool calls (a raise, a hang, an unprintable result)
    # a reward function that raises, or returns the wrong number of values: 0 for those episodes
    def raises(completions, **kw):
        raise RuntimeError("boom")

    def short(completions, **kw):
        return [1.0]
    for bad in (raises, short):
        t = build_task(load_config(None, [f"dataset={tmp_path / 'r.jsonl'}"]), environment_factory=Counter,
                       reward_funcs=[seen, bad])
        _, _, s2 = _run(t, tok, rows[:1] + rows[3:], {1: [_final(tok, "1")], 4: [_final(tok, "4")]})
        assert s2.totals == [0.0, 0.0] and s2.reward_errors == 2, bad


def test_a_paused_episode_keeps_its_environment_and_resume_replays_it(tmp_path):
    tok = ByteTokenizer()
    task = _env_task(tmp_path)
    groups = []
    for gid, start in enumerate((1, 2)):
        ep, t = _start(task, tok, {"prompt": "Count.", "start": start}, gid)
        groups.append(Group(gid, {"prompt": "Count.", "start": start}, [t], [ep]))
    script = {1: [_final(tok, "1")],  # group 0 is done after one turn ...
              2: [_call(tok, "add", '{"n": 4}'), _call(tok, "add", '{"n": 1}'), _final(tok, "7")]}
    engine = _Engine(tok, script)
    params = SamplingParams(max_new_tokens=64)
    trajs = [g.trajs[0] for g in groups]
    done = advance(engine, tok, [g.episodes[0].registry for g in groups], trajs, params, max_turns=6,
                   tool_timeout=1.0, groups=[[0], [1]], quota=1)
    g = groups[1]  # ... group 1 is paused after its first call: the call's result is in, the state too
    assert done == [0] and not g.trajs[0].done and g.episodes[0].env.total == 6
    # --resume: rebuilt from JSON, a fresh environment replays the call the episode had made
    g2 = Group.from_json(json.loads(json.dumps(g.to_json())), task)
    assert g2.episodes[0].env is not g.episodes[0].env and g2.episodes[0].env.total == 6
    engine.state[2] = 1  # the scripted engine: the next request is the episode's second turn
    advance(engine, tok, [e.registry for e in g2.episodes], g2.trajs, params, max_turns=6, tool_timeout=1.0)
    assert g2.trajs[0].done and g2.episodes[0].env.calls == [4, 1] and g2.episodes[0].env.total == 7
    assert score(task, [g2.row], g2.episodes, g2.trajs).by_func["seen"] == [1.0]
    env = g2.episodes[0].env
    g2.close()
    assert env.closed and g2.episodes[0].env is None


# ---- building a task: errors at startup ----------------------------------------------------------


def test_bad_task_configs_are_errors_before_any_model(tmp_path, monkeypatch):
    data = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "x", "answer": "1"}])
    (tmp_path / "myrewards.py").write_text("def exact(completions, answer, **kw):\n    return [1.0] * len(answer)\n"
                                           "def untyped(x):\n    return x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ok = build_task(load_config(None, [f"dataset={data}", 'reward_funcs=["myrewards:exact"]']))
    assert ok.func_names == ["exact"] and ok.eval_rows(5) == [{"prompt": "x", "answer": "1"}]
    cases = [
        ([f"dataset={data}", "task=arithmetic", 'reward_funcs=["myrewards:exact"]'], "cannot be combined"),
        ([f"dataset={data}", 'reward_funcs=["myrewards:nope"]'], "has no 'nope'"),
        ([f"dataset={data}", 'reward_funcs=["nomodule_xyz:f"]'], "cannot import 'nomodule_xyz'"),
        ([f"dataset={data}", 'reward_funcs=["no_colon"]'], "must look like"),
        ([f"dataset={data}", 'reward_funcs=["myrewards:exact"]', 'tools=["myrewards:untyped"]'], "has no type hint"),
        ([f"dataset={data}", 'reward_funcs=["myrewards:exact"]', 'tools=["browser"]'], "unknown built-in tool"),
        ([f"dataset={data}", 'reward_funcs=["myrewards:exact"]', "reward_weights=[1.0, 2.0]"], "2 weights for 1"),
        ([f"dataset={data}"], "nothing gives a reward"),
        ([f"dataset={tmp_path / 'missing.jsonl'}", 'reward_funcs=["myrewards:exact"]'], "no such file"),
        (['reward_funcs=["myrewards:exact"]'], "brings its own"),
        (["task=chess"], "unknown task 'chess'"),
    ]
    for overrides, match in cases:
        with pytest.raises((TaskError, DatasetError), match=match):
            build_task(load_config(None, overrides))
    with pytest.raises(ValueError, match="list of strings"):
        load_config(None, ["reward_funcs=[1, 2]"])

    class NoReset:
        pass
    with pytest.raises(TaskError, match="no reset"):
        build_task(load_config(None), environment_factory=NoReset, reward_funcs=[lambda completions, **k: []])
    # the CLI: an error naming the key, exit status 2, before any model is built
    from ossrl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--run-dir", str(tmp_path / "run"), f"dataset={data}", "task=arithmetic"])
    assert e.value.code == 2 and not (tmp_path / "run").exists()


# ---- the built-in tasks on the same contract ------------------------------------------------------


def test_lookup_task_needs_two_dependent_lookups_and_its_demos_replay():
    from ossrl.train.tasks import LookupEnv

    tok = ByteTokenizer()
    task = build_task(load_config(None, ["task=lookup", "max_turns=5"]))
    row = task.train_row(3)
    demo = task.demos(1, 4, 0, 4)[0]
    calls = [m["tool_calls"][0]["function"] for m in demo if m.get("tool_calls")]
    assert [c["name"] for c in calls] == ["lookup", "lookup", "calculator"]
    env = LookupEnv()
    env.reset(**row)
    assert sorted(env.values) == sorted(row["keys"])
    ep = task.start(row)
    assert ep.env is not None and "lookup" in ep.registry.names and "calculator" in ep.registry.names
    r = asyncio.run(ep.registry.call("lookup", json.dumps({"key": row["keys"][0]})))
    assert r.ok and r.content == str(row["values"][0])
    # the demonstration: tool results are context, the assistant's turns carry the loss
    t = demo_trajectory(tok, task.conversation(demo))
    context = tok.decode([x for x, m in zip(t.tokens, t.loss_mask) if not m and x not in tok.special_ids])
    learned = tok.decode([x for x, m in zip(t.tokens, t.loss_mask) if m and x not in tok.special_ids])
    assert all(str(v) in context for v in task.demos(1, 4, 0, 4)[0][2:3][0]["content"].split())
    assert "lookup" in learned and demo[-1]["content"] in learned


# ---- the whole loop from Python, and --resume with an environment -------------------------------------------


def test_run_from_python_with_a_user_environment_and_resume(tmp_path):
    import ossrl.train

    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Count.", "start": s} for s in range(1, 9)])
    demo = [{"role": "user", "content": "Count. [start at 1]"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "add", "arguments": '{"n": 1}'}}]},
            {"role": "tool", "tool_call_id": "a", "content": "2"}, {"role": "assistant", "content": "2"}]
    sft = tmp_path / "demos.jsonl"
    sft.write_text(json.dumps({"messages": demo}) + "\n")
    common = dict(dataset=str(rows), sft_dataset=str(sft), sft_steps=3, sft_batch=4, prompts_per_step=2,
                  group_size=2, extra_groups=2, eval_prompts=2, eval_every=1, max_new_tokens=8, max_turns=2,
                  checkpoint_every=1, chat_preamble=False, filter_groups=False)
    run_dir = tmp_path / "run"
    Counter.instances.clear()
    ossrl.train.run(dict(common, steps=1), run_dir=run_dir, environment_factory=Counter, reward_funcs=[seen],
                    log=lambda *a: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft_losses = [r["sft_loss"] for r in records if "sft_loss" in r]
    assert len(sft_losses) == 3  # the warm-up ran on the demonstrations
    step = next(r for r in records if r.get("step") == 1 and "reward_mean" in r)
    for key in ("reward_mean/seen", "reward_mean/get_reward", "reward_errors", "env_errors"):
        assert key in step, key
    assert step["reward_errors"] == 0 and step["env_errors"] == 0
    assert any("eval_success_rate" in r for r in records)
    assert len(Counter.instances) >= 2 * 2 and any(c.closed for c in Counter.instances)  # scored ones are closed
    ossrl.train.run(dict(common, steps=2), run_dir=run_dir, resume=True, environment_factory=Counter,
                    reward_funcs=[seen], log=lambda *a: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 2 and "reward_mean" in r for r in records)
    assert sum("sft_loss" in r for r in records) == 3  # resumed after the warm-up: not repeated
