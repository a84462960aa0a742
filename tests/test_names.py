"""The fixed public names of DESIGN.md import exactly as written there and are the right kind.

One import per documented spelling (``from ossrl.rollout import Engine``, not the module that
happens to define it): if a name moves or stops importing, this file fails. Only names that
exist today are checked.
"""

import dataclasses
import inspect
import math

import pytest
import torch


def _params(fn):
    return inspect.signature(fn).parameters


def _kwonly_defaults(fn):
    return {n: p.default for n, p in _params(fn).items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ---- ossrl.ops --------------------------------------------------------------------------------


def test_ops_names():
    from ossrl.ops import (Routing, grouped_gemm, moe_experts, moe_route, multi_tensor_copy_, paged_attention,
                           paged_kv_append, varlen_attention)

    for fn in (grouped_gemm, moe_route, moe_experts, varlen_attention, paged_attention, paged_kv_append,
               multi_tensor_copy_):
        assert callable(fn), fn

    assert list(_params(grouped_gemm)) == ["x", "w", "offsets", "bias"]
    assert _params(grouped_gemm)["bias"].default is None
    assert list(_params(moe_route)) == ["router_logits", "top_k"]
    assert list(_params(moe_experts))[:6] == ["x", "routing", "w_gate_up", "b_gate_up", "w_down", "b_down"]
    assert _kwonly_defaults(moe_experts) == {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
    assert list(_params(varlen_attention))[:7] == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                    "max_seqlen_k"]
    assert _kwonly_defaults(varlen_attention) == {"causal": True, "window": None, "sinks": None,
                                                  "softmax_scale": None, "return_lse": False}
    assert list(_params(multi_tensor_copy_)) == ["dsts", "srcs"]

    # Routing is a NamedTuple with the documented fields, in order.
    assert issubclass(Routing, tuple)
    assert Routing._fields == ("weights", "experts", "order", "offsets")


def test_moe_route_returns_routing():
    from ossrl.ops import Routing, moe_route

    r = moe_route(torch.randn(5, 4), 2)
    assert isinstance(r, Routing)
    assert r.weights.shape == (5, 2) and r.weights.dtype == torch.float32
    assert r.experts.dtype == r.order.dtype == r.offsets.dtype == torch.int32
    assert r.order.shape == (10,) and r.offsets.shape == (4,)


def test_ops_are_registered_under_torch_ops_ossrl():
    import ossrl  # noqa: F401  (loads the extension)
    from ossrl.cli import registered_ops

    ops = set(registered_ops())
    for name in ("grouped_gemm", "moe_route", "moe_experts", "varlen_attention", "paged_attention",
                 "paged_kv_append", "multi_tensor_copy_"):
        assert name in ops, name
        assert hasattr(torch.ops.ossrl, name), name


# ---- ossrl.model ------------------------------------------------------------------------------


def test_model_names(tmp_path):
    from ossrl.model import GptOss, GptOssConfig, load_pretrained, save_pretrained

    assert inspect.isclass(GptOss) and issubclass(GptOss, torch.nn.Module)
    assert callable(load_pretrained)
    params = _params(load_pretrained)
    assert list(params)[0] == "path"
    assert params["device"].kind is inspect.Parameter.KEYWORD_ONLY and params["device"].default == "cpu"
    assert params["dtype"].kind is inspect.Parameter.KEYWORD_ONLY and params["dtype"].default is torch.bfloat16

    # GptOss.forward(input_ids, cu_seqlens) -> logits (T, vocab); load_pretrained gives a GptOss back.
    cfg = GptOssConfig.tiny()
    model = GptOss(cfg).eval()
    assert list(_params(GptOss.forward))[1:3] == ["input_ids", "cu_seqlens"]
    ids = torch.tensor([3, 1, 4, 1, 5], dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids, torch.tensor([0, 2, 5], dtype=torch.int32))
    assert logits.shape == (5, cfg.vocab_size)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert isinstance(loaded, GptOss)


# ---- ossrl.rollout ----------------------------------------------------------------------------


def test_rollout_names():
    from ossrl.rollout import Completion, Engine, Resume, SamplingParams

    for cls in (Engine, SamplingParams, Completion, Resume):
        assert inspect.isclass(cls), cls
    assert list(_params(Engine))[0] == "model"
    assert list(_params(Engine.generate))[1:3] == ["prompts", "params"]

    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.stop_token_ids) == (1.0, 1.0, 0, ())
    assert isinstance(p.max_new_tokens, int) and p.max_new_tokens >= 1
    q = SamplingParams(temperature=0, top_p=0.5, top_k=3, max_new_tokens=7, stop_token_ids=(200012, 200002))
    assert (q.temperature, q.top_p, q.top_k, q.max_new_tokens, q.stop_token_ids) == (0, 0.5, 3, 7, (200012, 200002))

    fields = {f.name for f in dataclasses.fields(Completion)}
    assert {"tokens", "logprobs"} <= fields
    assert {"handle", "tokens"} <= {f.name for f in dataclasses.fields(Resume)}


def test_engine_generate_returns_completions():
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.rollout import Completion, Engine, SamplingParams

    model = GptOss(GptOssConfig.tiny()).eval()
    params = SamplingParams(temperature=0, max_new_tokens=3)
    outs = Engine(model, max_cache_tokens=256).generate([[5, 6, 7], [9]], params)
    assert isinstance(outs, list) and len(outs) == 2
    for o in outs:
        assert isinstance(o, Completion)
        assert 1 <= len(o.tokens) <= 3 and all(isinstance(t, int) for t in o.tokens)
        assert len(o.logprobs) == len(o.tokens)
        assert all(isinstance(x, float) and math.isfinite(x) and x <= 0 for x in o.logprobs)


# ---- the `ossrl` command ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "train", "serve"])
def test_cli_subcommand_exists(command, capsys):
    from ossrl.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"ossrl {command}" in out
    if command == "train":
        for flag in ("--config", "--run-dir", "--resume", "key=value"):
            assert flag in out, flag
    if command == "serve":  # DESIGN: ossrl serve [--model tiny|CHECKPOINT_FOLDER] [--host 127.0.0.1] [--port 8000]
        for flag in ("--model", "--host", "--port"):
            assert flag in out, flag


def test_cli_rejects_unknown_subcommand(capsys):
    from ossrl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_cli_info_runs(capsys):
    from ossrl.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ossrl ") and "moe_experts" in out


def test_cli_train_arguments_reach_the_loop(tmp_path, monkeypatch):
    """`ossrl train --run-dir DIR --resume key=value` parses and hands its arguments to the loop
    (stubbed here: no training runs)."""
    import ossrl.train.loop as loop
    import ossrl.train.metrics as metrics
    from ossrl.cli import main

    seen = {}

    def fake_train(cfg, run_dir, *, resume=False, **kw):
        seen.update(cfg=cfg, run_dir=run_dir, resume=resume)
        return tmp_path

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(metrics, "plot", lambda run_dir: [])
    assert main(["train", "--run-dir", str(tmp_path), "--resume", "steps=3"]) == 0
    assert seen["run_dir"] == str(tmp_path) and seen["resume"] is True
    assert seen["cfg"].steps == 3


def test_bring_your_own_task_names():
    """DESIGN's "Bringing your own task": the config keys, and ossrl.train.run taking the objects."""
    import ossrl.train
    import ossrl.train.loop
    from ossrl.train.config import TrainConfig

    keys = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig)}
    for key, default in {"dataset": "", "eval_dataset": "", "reward_funcs": [], "reward_weights": [],
                         "tools": [], "environment_factory": "", "sft_dataset": "", "success_threshold": 1.0}.items():
        assert keys[key] == default, key
    assert keys["task"] == ""  # "arithmetic" while no dataset or environment_factory is given
    params = _params(ossrl.train.loop.run)
    for name in ("config", "environment_factory", "reward_funcs", "tools"):
        assert name in params, name
    assert callable(ossrl.train.run)


def test_serving_and_agent_names():
    """DESIGN's "Serving and external agents": the routes, and the agent config key."""
    import dataclasses as dc

    from ossrl.model import ByteTokenizer, GptOss, GptOssConfig
    from ossrl.serve import create_app
    from ossrl.train.config import TrainConfig

    pytest.importorskip("starlette")
    app = create_app(GptOss(GptOssConfig.tiny()), ByteTokenizer(), model_name="tiny", preamble=False)
    paths = {r.path for r in app.routes}
    assert {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths
    app.state.runner.close()
    assert {f.name: f.default for f in dc.fields(TrainConfig)}["agent"] == ""
