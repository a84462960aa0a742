"""Checkpoints and configs are untrusted input: a clear error naming the file, never a guess,
never a non-finite checkpoint, never a good checkpoint rotated away because of a bad one."""

import json
import math
import shutil

import pytest
import torch

from ossrl.cli import main
from ossrl.train import checkpoint
from ossrl.train.checkpoint import ResumeError
from ossrl.train.config import load_config


def _save(d, step, value=1.0, keep=2):
    tensors = {"w": torch.full((3,), value), "b": torch.zeros(2)}
    return checkpoint.save(d, step, tensors, {"state": {}, "param_groups": []}, {"sft_done": True, "ranks": [{}]},
                           keep=keep)


def test_round_trip_and_the_latest_is_a_real_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    _save(d, 3)
    _save(d, 7, value=2.0)
    (d / "step_best").mkdir()  # a folder of the user's: not a checkpoint, whatever it holds
    (d / "step_best" / "state.json").write_text(json.dumps({"step": 99}))
    (d / "step_00000099").write_text("a file")
    assert checkpoint.latest(d).name == "step_00000007"
    state, tensors, optim = checkpoint.load(checkpoint.latest(d))
    assert state["step"] == 7 and torch.equal(tensors["w"], torch.full((3,), 2.0)) and optim["param_groups"] == []
    _save(d, 9)  # rotation keeps the two newest real checkpoints and leaves the user's folder alone
    assert sorted(p.name for p in d.iterdir()) == ["step_00000007", "step_00000009", "step_00000099", "step_best"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_never_written_and_rotate_nothing_away(tmp_path, bad):
    d = tmp_path / "checkpoints"
    _save(d, 1)
    _save(d, 2)
    with pytest.raises(FloatingPointError, match="step 3: non-finite weights .*step_00000002"):
        _save(d, 3, value=bad)
    assert [p.name for p in checkpoint.complete(d)] == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("tamper, match", [
    (lambda p: (p / "state.json").write_text("{not json"), "state.json: cannot be read"),
    (lambda p: (p / "state.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda p: (p / "state.json").write_text(json.dumps({"step": -5, "ranks": [{}]})), "'step' must be the folder's"),
    (lambda p: (p / "state.json").write_text(json.dumps({"step": 4, "ranks": [{}]})), "'step' must be the folder's"),
    (lambda p: (p / "state.json").write_text(json.dumps({"step": 2, "ranks": [{"next_group": -1}]})), "next_group"),
    (lambda p: (p / "state.json").write_text(json.dumps({"step": 2, "ranks": "x"})), "'ranks'"),
    (lambda p: (p / "state.json").write_text("[" * 100_000 + "]" * 100_000), "state.json: cannot be read"),
    (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda p: (p / "optimizer.pt").write_bytes(b"garbage"), "optimizer.pt: cannot be read"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"), "model.safetensors"),
])
def test_a_tampered_checkpoint_is_refused_naming_the_file(tmp_path, tamper, match):
    d = tmp_path / "checkpoints"
    path = _save(d, 2)
    tamper(path)
    with pytest.raises(ResumeError, match=match):
        checkpoint.load(path)


def test_resume_from_a_tampered_checkpoint_is_a_clear_cli_error(tmp_path, capsys):
    args = ["sft_steps=2", "steps=1", "prompts_per_step=2", "group_size=2", "eval_prompts=2", "eval_every=1",
            "checkpoint_every=1", "max_turns=1", "max_new_tokens=8", "sft_batch=4"]
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *args]) == 0
    latest = checkpoint.latest(run / "checkpoints")
    state = json.loads((latest / "state.json").read_text())
    (latest / "state.json").write_text(json.dumps({**state, "step": -5}))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(SystemExit) as e:
        main(["train", "--run-dir", str(run), "--resume", *args])
    assert e.value.code == 2 and "state.json" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == kept  # nothing rotated away
    shutil.rmtree(run)


@pytest.mark.parametrize("key", ["lr", "sft_lr", "temperature", "grad_clip", "weight_decay", "tool_timeout",
                                 "lora_alpha", "loss.clip_low", "loss.clip_high", "loss.tis_cap", "loss.kl_coef",
                                 "top_p", "min_lr_ratio", "demo_guess_rate"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_config_values_are_errors(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("item", ["lr=-1e-3", "sft_lr=0", "temperature=-0.5", "grad_clip=0", "weight_decay=-0.1",
                                  "tool_timeout=-1", "lora_alpha=-2", "loss.clip_low=1.5", "loss.clip_low=-0.1",
                                  "loss.clip_high=-0.2", "loss.kl_coef=-0.05"])
def test_out_of_range_config_values_are_errors(item):
    with pytest.raises(ValueError, match=item.split("=")[0].replace(".", r"\.")):
        load_config(None, [item])
