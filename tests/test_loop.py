"""`ossrl train` end to end on the tiny default, kill-and-resume, configs and packing."""

import json
import math
import shutil

import pytest
import torch

from ossrl.cli import main
from ossrl.rollout.agent import Trajectory
from ossrl.train.config import load_config
from ossrl.train.loop import micro_batches, pack
from ossrl.train.metrics import read

from _ranks import run_ranks

SHORT = ["sft_steps=25", "steps=4", "prompts_per_step=4", "group_size=4", "eval_prompts=8", "eval_every=2",
         "checkpoint_every=2", "max_turns=2", "micro_batch_tokens=1500", "sft_batch=32",
         "filter_groups=false"]  # a short warm-up leaves no reward: train on every group anyway
RESULTS = ("reward_mean", "loss", "tis_weight_mean", "generated_tokens", "tool_calls", "answered_frac")


def _results(records):
    return [{k: r.get(k) for k in ("step", "eval_success_rate", *RESULTS) if k in r} for r in records if "step" in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    assert main(["train", "--run-dir", str(run), *SHORT]) == 0
    return run


def test_default_run_writes_metrics_checkpoints_and_plots(full_run):
    records = read(full_run / "metrics.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_success_rate" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in steps:
        assert 0 <= r["reward_mean"] <= 1 and r["generated_tokens"] > 0
        assert r["rollout_s"] > 0 and r["train_s"] > 0
        # 4 + 4 extra groups of 4 decode at once at most; every forward pass feeds a token at least
        assert 1 <= r["engine_batch_mean"] <= 32 and r["engine_forward_tokens"] >= r["engine_steps"] > 0
        assert r["mismatch_kl"] >= 0 and math.isfinite(r["mismatch_kl"]) and r["logprob_gap_max"] >= 0
        if r["staleness_max"] == 0:  # the engine shares the trainer's modules and weights: rounding only
            assert r["mismatch_kl"] < 1e-3 and r["logprob_gap_max"] < 0.05, r
    sft = [r["sft_loss"] for r in records if "sft_loss" in r]
    assert len(sft) == 25 and sft[-1] < sft[0]  # the warm-up learns the format
    # the two newest checkpoints, and the KL reference (the post-warm-up policy: kl_coef > 0 by default)
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["reference.safetensors", "step_00000002",
                                                                           "step_00000004"]
    assert (full_run / "plots" / "reward.png").stat().st_size > 0


def test_kill_mid_checkpoint_and_resume_repeats_the_run(full_run, tmp_path):
    run = tmp_path / "resumed"
    half = [a if not a.startswith("steps=") else "steps=2" for a in SHORT]
    assert main(["train", "--run-dir", str(run), *half]) == 0
    # a kill while writing the step-4 checkpoint leaves a partial temporary folder behind
    partial = run / "checkpoints" / ".tmp-step_00000004"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    # ... and metrics of steps the checkpoint does not cover
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 123.0}) + "\n")
    assert main(["train", "--run-dir", str(run), "--resume", *SHORT]) == 0
    assert _results(read(run / "metrics.jsonl")) == _results(read(full_run / "metrics.jsonl"))
    # a tampered checkpoint is a clear error
    state_file = run / "checkpoints" / "step_00000004" / "state.json"
    state = json.loads(state_file.read_text())
    state["ranks"][0]["carry"] = [{"gid": 1, "problem": {"prompt": "1+1", "answer": "2"}, "trajs": [{"tokens": 5}]}]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="malformed paused episodes"):
        main(["train", "--run-dir", str(run), "--resume", *SHORT])


def test_config_file_overrides_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 3\nlr = 1e-4\n[loss]\ntis_cap = 3.0\n')
    cfg = load_config(f, ["steps=5", "loss.clip_high=0.3", "task=arithmetic"])
    assert (cfg.steps, cfg.lr, cfg.loss.tis_cap, cfg.loss.clip_high) == (5, 1e-4, 3.0, 0.3)
    for bad, match in [(["stepz=3"], "unknown config key 'stepz'"), (["steps=three"], "'steps' must be an integer"),
                       (["loss.tis_cap=x"], "'loss.tis_cap' must be a number"), (["steps"], "key=value"),
                       (["group_size=0"], "group_size"), (["loss=1"], "is a table")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, bad)
    f.write_text("steps = [")
    with pytest.raises(ValueError, match="c.toml"):
        load_config(f)
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", str(tmp_path / "x"), "nonsense=1"])


def test_the_config_file_is_the_default_written_out():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "arithmetic_tiny.toml"
    assert load_config(path) == load_config(None)


def test_learning_rate_schedule_and_its_config():
    from ossrl.train.schedule import scheduled_lr

    cfg = load_config(None, ["min_lr_ratio=0.1"])
    lrs = [scheduled_lr(1.0, i, 100, cfg, 10) for i in range(1, 101)]
    assert lrs[:10] == pytest.approx([i / 10 for i in range(1, 11)])  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then it only decays ...
    assert lrs[-1] == pytest.approx(0.1) and lrs[54] == pytest.approx(0.55)  # ... to 10%, half-way at the middle
    assert scheduled_lr(2.0, 50, 100, load_config(None, ["lr_schedule=constant"]), 10) == 2.0
    assert scheduled_lr(2.0, 5, 5, cfg, 0) == pytest.approx(0.2)  # no warm-up: the phase's end is the floor
    for bad, match in [(["lr_schedule=linear"], "lr_schedule"), (["min_lr_ratio=1.5"], "min_lr_ratio"),
                       (["warmup_steps=-1"], "warmup_steps"), (["demo_guess_rate=2"], "demo_guess_rate")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, bad)


def test_demonstrations_guess_at_the_configured_rate():
    import random

    from ossrl.train.tasks import ArithmeticTask, exact_answer

    task = ArithmeticTask(demo_guess_rate=0.5)
    problems = task.sample(random.Random(0), 400)
    demos = [task.demonstration(p, random.Random(i)) for i, p in enumerate(problems)]
    guesses = [(p, d) for p, d in zip(problems, demos) if len(d) == 1]
    assert 150 < len(guesses) < 250  # binomial(400, 0.5): 5 sigma either side
    for p, (answer,) in guesses:  # a guess is the question's first number: never rewarded
        assert answer["role"] == "assistant" and p.prompt.startswith(answer["content"]) and len(answer["content"]) == 2
        assert exact_answer([[answer]], [p.answer]) == [0.0]
    for p, d in zip(problems, demos):  # the others call the tool and answer with its result
        if len(d) == 3:
            call = d[0]["tool_calls"][0]["function"]
            assert call == {"name": "calculator", "arguments": p.prompt} and d[2]["content"] == p.answer
            assert exact_answer([d], [p.answer]) == [1.0]
    assert all(len(task.demonstration(p)) == 3 for p in problems[:20])  # no generator: the teacher never guesses


def test_steps_without_signal_take_no_optimizer_step(tmp_path):
    """No warm-up: no episode is rewarded, so every group has equal rewards and (filter_groups,
    the default) no RL step moves the weights; the steps still run, log and checkpoint."""
    from ossrl.train import checkpoint

    run = tmp_path / "nosignal"
    args = [a for a in SHORT if not a.startswith(("sft_steps=", "filter_groups="))] + ["sft_steps=0"]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    steps = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    assert len(steps) == 4 and all(r["reward_mean"] == 0 and r["signal_groups"] == 0 for r in steps)
    assert all(r["grad_norm"] is None and r["trained_episodes"] == 0 for r in steps)
    first = checkpoint.read_weights(run / "checkpoints" / "reference.safetensors")
    _, last, _ = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    assert set(first) == set(last) and all(torch.equal(first[k], last[k]) for k in first)


def test_pack_and_micro_batches():
    trajs = [Trajectory([1, 2, 3], [0, 1, 1], [0.0, -0.5, -0.25]), Trajectory([4, 5], [0, 1], [0.0, -1.0])]
    b = pack(trajs, "cpu")
    assert b["ids"].tolist() == [1, 2, 3, 4, 5]
    assert b["targets"].tolist() == [2, 3, 0, 5, 0]
    assert b["mask"].tolist() == [1, 1, 0, 1, 0]  # position p carries the loss of token p+1
    assert b["rollout_logprobs"].tolist() == [-0.5, -0.25, 0.0, -1.0, 0.0]
    assert b["cu_seqlens"].tolist() == [0, 3, 5] and b["cu_seqlens"].dtype == torch.int32
    assert micro_batches(trajs * 3, 5) == [[0, 1], [2, 3], [4, 5]]
    assert micro_batches([Trajectory([0] * 9, [0] * 9, [0.0] * 9)], 4) == [[0]]


def test_engine_failure_is_recovered_and_counted(tmp_path, monkeypatch):
    from ossrl.rollout.engine import Engine

    real_step, calls = Engine.step, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-rollout of the first RL step, with requests in flight
            raise torch.OutOfMemoryError("injected")
        return real_step(self)

    run = tmp_path / "flaky"
    args = [a for a in SHORT if not a.startswith(("steps=", "sft_steps="))] + ["steps=1", "sft_steps=0"]
    monkeypatch.setattr(Engine, "step", flaky)
    assert main(["train", "--run-dir", str(run), *args]) == 0
    monkeypatch.setattr(Engine, "step", real_step)
    records = [r for r in read(run / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in records] == [0, 1, 1]  # eval, train step, eval: the run went on
    assert sum(r["engine_restarts"] for r in records) == 1


def _dp_worker(rank, world, run_dir, args):
    assert main(["train", "--run-dir", run_dir, *args]) == 0


@pytest.mark.parametrize("parallel, extra", [
    pytest.param("dp", [], id="dp"),
    pytest.param("fsdp", [], id="fsdp"),
    pytest.param("fsdp", ["lora_rank=4", "loss.kl_coef=0.05"], id="fsdp-lora-kl"),
    pytest.param("fsdp", ["loss.kl_coef=0.05"], id="fsdp-kl"),
    # routing replay under FSDP2 with LoRA: the recorded experts reach the sharded trainer's forward
    pytest.param("fsdp", ["lora_rank=4", "routing_replay=true"], id="fsdp-lora-replay"),
    pytest.param("fsdp", ["activation_checkpointing=true", "offload_activations=true", "offload_optimizer=true"],
                 id="fsdp-ckpt-offload"),
    # experts split across the two ranks (all-to-all), the engine on a replica synced from the shards;
    # small micro-batches: the ranks have different numbers of them (padding passes, KL forward included)
    pytest.param("dp", ["expert_parallel=2", "routing_replay=true", "micro_batch_tokens=64"], id="ep-replay"),
    # both ranks train on both ranks' trajectories, each on half of every micro-batch's tokens
    pytest.param("fsdp", ["context_parallel=2", "activation_checkpointing=true"], id="fsdp-cp-ckpt"),
    pytest.param("dp", ["expert_parallel=2", "context_parallel=2", "lora_rank=4", "micro_batch_tokens=64"],
                 id="ep-cp-lora"),
    # FSDP2 shards the dense weights, expert parallelism the experts; the engine's replica is
    # refreshed by one reshard plan per mesh
    pytest.param("fsdp", ["expert_parallel=2", "micro_batch_tokens=64"], id="fsdp-ep"),
])
def test_two_process_gloo_run_matches_one_process(tmp_path, parallel, extra):
    """Two ranks, each with half of every batch and gradients summed, compute what one process
    computes on the same global batch: same samples, rewards and (to rounding) losses; with the
    model replicated (dp) or sharded by FSDP2 (the engine then runs a replica synced from the
    shards)."""
    args = ["sft_steps=6", "steps=2", "prompts_per_step=4", "group_size=4", "eval_prompts=8", "eval_every=2",
            "checkpoint_every=2", "max_turns=2", "sft_batch=8", "filter_groups=false",
            "extra_groups=0"]  # every group runs to the end: which ones finish first depends on the batch
    layout = [e for e in extra if e.startswith(("expert_parallel=", "context_parallel="))]  # two processes only
    args += [e for e in extra if e not in layout]
    assert main(["train", "--run-dir", str(tmp_path / "one"), *args]) == 0
    args += [f"parallel={parallel}", *layout]
    run_ranks(_dp_worker, 2, str(tmp_path / "two"), args, init=False,
              reset=lambda: shutil.rmtree(tmp_path / "two", ignore_errors=True))
    one, two = read(tmp_path / "one" / "metrics.jsonl"), read(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.keys() - {"processes"} == b.keys() - {"processes"}
        for k in ("step", "sft_step", "reward_mean", "generated_tokens", "tool_calls", "eval_success_rate",
                  "eval_greedy_success_rate"):
            assert a.get(k) == b.get(k), (k, a, b)
        for k in ("sft_loss", "loss", "kl"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert [r["processes"] for r in two if "reward_mean" in r] == [2, 2]
    # the checkpoints hold the same full weights under the same names
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "checkpoints" / "step_00000002" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert all(r["generated_tokens"] > 0 for r in two if "reward_mean" in r)
    sft = [r["sft_loss"] for r in two if "sft_loss" in r]
    assert len(sft) == 6 and sft[-1] < sft[0]


def test_activation_checkpointing_and_offload_give_the_same_run(full_run, tmp_path):
    run = tmp_path / "ckpt"
    args = [a for a in SHORT if not a.startswith("steps=")] + ["steps=2", "activation_checkpointing=true",
                                                               "offload_optimizer=true", "offload_activations=true"]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    ours = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    ref = [r for r in read(full_run / "metrics.jsonl") if "reward_mean" in r][:2]
    for a, b in zip(ours, ref):
        assert a["reward_mean"] == b["reward_mean"] and a["generated_tokens"] == b["generated_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)


def test_bf16_rollout_copy_is_synced_in_place(tmp_path):
    """With its own bf16 copy, the engine sees every update through the reshard plan, in place."""
    from ossrl.train import loop

    seen = {}
    real = loop.rollout_copy

    def spy(model, cfg, **kw):
        copy_ = real(model, cfg, **kw)
        seen.update(model=model, copy=copy_, ptrs={n: p.data_ptr() for n, p in copy_.named_parameters()})
        return copy_

    loop.rollout_copy = spy
    try:
        args = [a for a in SHORT if not a.startswith("steps=")] + ["steps=2", "rollout_dtype=bfloat16"]
        assert main(["train", "--run-dir", str(tmp_path / "bf16"), *args]) == 0
    finally:
        loop.rollout_copy = real
    steps = [r for r in read(tmp_path / "bf16" / "metrics.jsonl") if "reward_mean" in r]
    n_params = sum(p.numel() for p in seen["model"].parameters())
    assert [r["sync_bytes"] for r in steps] == [2 * n_params] * 2  # every parameter, as bf16
    for (name, p), (_, c) in zip(seen["model"].named_parameters(), seen["copy"].named_parameters()):
        assert c.dtype == torch.bfloat16 and c.data_ptr() == seen["ptrs"][name]
        assert torch.equal(c, p.detach().to(torch.bfloat16)), name


def test_train_from_a_hugging_face_checkpoint_folder(tmp_path):
    """`model = FOLDER` (config.json, safetensors, tokenizer.json): the warm-up, rollouts and
    checkpoints run with that model and its BPE tokenizer, and the checkpoints load back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ossrl.model import GptOss, GptOssConfig, load_pretrained, load_tokenizer, save_pretrained
    from ossrl.model.tokenizer import HARMONY_SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(HARMONY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system functions.calculator commentary final analysis "
                             "Use the calculator tool, then give only the number. 12+34*56-78"] * 20, trainer)
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    ours = load_tokenizer(folder)
    torch.manual_seed(0)
    save_pretrained(GptOss(GptOssConfig.tiny(vocab_size=tok.get_vocab_size(), eos_token_id=list(ours.stop_token_ids),
                                             pad_token_id=ours.special_id("<|endoftext|>"))), folder)
    run = tmp_path / "run"
    args = [f"model={folder}", "sft_steps=4", "steps=2", "prompts_per_step=2", "group_size=2", "eval_prompts=2",
            "eval_every=2", "checkpoint_every=2", "max_turns=2", "max_new_tokens=16"]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    steps = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["generated_tokens"] > 0 for r in steps)
    saved = run / "checkpoints" / "step_00000002" / "model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(saved)
    before = load_pretrained(folder, dtype=torch.float32).state_dict()
    assert weights.keys() <= before.keys() and any(not torch.equal(weights[k], before[k]) for k in weights)


def test_a_non_finite_gradient_skips_the_update_and_the_run_goes_on(tmp_path, monkeypatch):
    from ossrl.train import checkpoint, loop

    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(params, max_norm, *a, **k):
        params = list(params)
        real(params, max_norm, *a, **k)
        calls["n"] += 1
        if calls["n"] > 25:  # the RL steps (the warm-up's 25 steps are left alone)
            for p in params:
                p.grad.fill_(float("nan"))
            return torch.tensor(float("nan"))
        return torch.tensor(1.0)

    monkeypatch.setattr(loop.torch.nn.utils, "clip_grad_norm_", poisoned)
    run = tmp_path / "nan"
    assert main(["train", "--run-dir", str(run), *SHORT]) == 0
    steps = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    assert len(steps) == 4 and all(r["nonfinite_grad"] and r["grad_norm"] is None for r in steps)
    first = checkpoint.read_weights(run / "checkpoints" / "reference.safetensors")  # the post-warm-up weights
    _, last, _ = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    assert all(torch.equal(first[k], last[k]) and torch.isfinite(last[k]).all() for k in first)
