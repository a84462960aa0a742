"""LoRA adapters: the math against float64, frozen shared base, reference policy, the LoRA loop."""

import copy

import pytest
import torch
from torch import nn

from ossrl.cli import main
from ossrl.model import GptOss, GptOssConfig
from ossrl.model.lora import LoRALinear, adapters_disabled, apply_lora, lora_parameters, merge_lora
from ossrl.train.metrics import read

from _tolerance import assert_within, gamma, rounding_scale


def test_lora_linear_matches_float64_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 24)
    merged = w0.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()
    want = x.double() @ merged.T + base.bias.double()
    # float32, any summation order: x W^T + b (24 products) plus 2 (x A^T) B^T (24 then 4), added
    a, b, wa, wb = x.double().abs(), base.bias.double().abs(), layer.lora_A.double().abs(), layer.lora_B.double().abs()
    bound = gamma(24 + 4 + 3) * (a @ w0.double().abs().T + b + 2.0 * (a @ wa.T) @ wb.T)
    assert_within(layer(x), want, bound)
    layer(x).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None  # frozen
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight is base.weight  # the very same Parameter: same name, same storage


def test_apply_lora_freezes_the_base_and_starts_as_the_identity():
    torch.manual_seed(0)
    model = GptOss(GptOssConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (20,))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    before = model(ids, cu)
    names = {n for n, _ in model.named_parameters()}
    adapted = apply_lora(model, rank=4, targets=("q_proj", "v_proj", "router"))
    assert len(adapted) == 3 * model.config.num_hidden_layers
    assert {n for n, _ in model.named_parameters()} - names == {f"{m}.{p}" for m in adapted for p in ("lora_A", "lora_B")}
    assert [p for p in model.parameters() if p.requires_grad] == lora_parameters(model)
    assert torch.equal(model(ids, cu), before)  # B = 0
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    changed = model(ids, cu)
    assert not torch.allclose(changed, before)
    with adapters_disabled(model):
        assert torch.equal(model(ids, cu), before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    merged = model(ids, cu)
    # W + s B A rounded once to float32, then other sums than x W^T + s (x A^T) B^T: the float32
    # rounding of the merged model's own pass (against float64, on this machine) sets the scale
    with torch.no_grad():
        merged64 = copy.deepcopy(model).double()(ids, cu)
    assert_within(merged, changed, 4 * rounding_scale((merged, merged64)))


def test_apply_lora_bad_input():
    model = GptOss(GptOssConfig.tiny())
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, 0)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, 2, targets=("gate_up_proj",))
    apply_lora(model, 2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, 2)


SHORT = ["sft_steps=10", "steps=2", "prompts_per_step=4", "group_size=4", "eval_prompts=8", "eval_every=2",
         "checkpoint_every=2", "max_turns=2", "micro_batch_tokens=1500", "sft_batch=32",
         "filter_groups=false"]


def test_lora_mode_trains_adapters_only_with_one_shared_copy(tmp_path, monkeypatch):
    from ossrl.train import loop

    seen = {}
    real = loop.rollout_copy

    def spy(model, cfg, **kw):
        seen["model"] = model
        seen["base"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        copy_ = real(model, cfg, **kw)
        seen["engine_model"] = copy_
        return copy_

    monkeypatch.setattr(loop, "rollout_copy", spy)
    run = tmp_path / "lora"
    assert main(["train", "--run-dir", str(run), *SHORT, "lora_rank=4", "loss.kl_coef=0.05"]) == 0
    model = seen["model"]
    assert seen["engine_model"] is model  # the engine runs the same modules: one copy of the base
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, seen["base"][n]), n
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    steps = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    assert [r["sync_bytes"] for r in steps] == [0, 0]
    assert all(r["kl"] > 0 for r in steps)  # the reference is the base: the warm-up moved the adapters
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", str(tmp_path / "x"), "lora_rank=4", "lora_targets=q_proj,mlp"])


def test_lora_with_a_bf16_engine_copy_syncs_only_the_adapters(tmp_path, monkeypatch):
    from ossrl.train import loop

    seen = {}
    real = loop.rollout_copy

    def spy(model, cfg, **kw):
        seen["model"], seen["copy"] = model, real(model, cfg, **kw)
        return seen["copy"]

    monkeypatch.setattr(loop, "rollout_copy", spy)
    assert main(["train", "--run-dir", str(tmp_path / "r"), *SHORT, "lora_rank=4", "rollout_dtype=bfloat16"]) == 0
    adapters = sum(p.numel() for n, p in seen["model"].named_parameters() if "lora_" in n)
    steps = [r for r in read(tmp_path / "r" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["sync_bytes"] for r in steps] == [2 * adapters] * 2  # bf16 adapters, never the base
    for (n, p), (_, c) in zip(seen["model"].named_parameters(), seen["copy"].named_parameters()):
        assert c.dtype == torch.bfloat16 and torch.equal(c, p.detach().to(torch.bfloat16)), n


def test_kl_reference_is_the_post_warm_up_policy_and_survives_resume(tmp_path, monkeypatch):
    from ossrl.train import loop

    # A short warm-up earns no reward: give the episodes alternating advantages so that the first
    # RL step moves the policy away from the reference (nothing else would: a fresh optimizer
    # with zero gradients takes a zero step).
    monkeypatch.setattr(loop, "group_advantages",
                        lambda r, g, scale="std": torch.tensor([(-1.0) ** i for i in range(len(r))], dtype=r.dtype))
    run = tmp_path / "kl"
    assert main(["train", "--run-dir", str(run), *SHORT, "loss.kl_coef=0.1"]) == 0
    steps = [r for r in read(run / "metrics.jsonl") if "reward_mean" in r]
    assert steps[0]["kl"] == 0.0  # the first RL step's policy is the reference
    assert steps[1]["kl"] > 0.0
    assert (run / "checkpoints" / "reference.safetensors").exists()
    more = [a if not a.startswith("steps=") else "steps=3" for a in SHORT]
    assert main(["train", "--run-dir", str(run), "--resume", *more, "loss.kl_coef=0.1"]) == 0
    assert [r["step"] for r in read(run / "metrics.jsonl") if "reward_mean" in r] == [1, 2, 3]
