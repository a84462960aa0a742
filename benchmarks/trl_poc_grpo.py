"""Proof of concept: ossrl's tiny GPT-OSS trained with TRL's GRPOTrainer and ``environment_factory`` on CPU.

    PYTHONPATH=python python benchmarks/trl_poc_grpo.py                   # 2 GRPO steps, after a short warm-up
    PYTHONPATH=python python benchmarks/trl_poc_grpo.py --warmup-steps 0  # random model: no tool calls

What it does:

1. builds the tiny model (``build(load_config(None))``), optionally warms it up with ossrl's own
   supervised step on demonstrations of the task (so it writes harmony tool calls; a random model
   never does), and saves it as a Hugging Face ``GptOssForCausalLM`` folder (``save_pretrained``);
2. saves beside it a transformers tokenizer with the ids of ``ByteTokenizer``, our harmony chat
   template and a ``response_template`` (see ``trl_poc_harmony_tok.py``), and checks that the
   template renders the prompt token for token as ossrl does and that TRL's ``parse_response``
   turns a hand-written harmony tool call into a tool call;
3. runs ``trl.GRPOTrainer`` with ``environment_factory=NumberEnv`` for a few steps and prints the
   seconds per step and what the rollouts did (tool calls per rollout, reward).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from trl_poc_harmony_tok import build_tokenizer  # noqa: E402


# ---- the task: a + b, where b must be looked up with a tool ----


class NumberEnv:
    """One instance per rollout (TRL calls ``NumberEnv()``, then ``reset(**row)`` per episode)."""

    def reset(self, **kwargs) -> str:
        self.a, self.b = int(kwargs["a"]), int(kwargs["b"])
        self.lookups = 0
        return f" a is {self.a}."  # TRL appends this to the last prompt message

    def lookup(self, key: str) -> str:
        """Look up a stored number.

        Args:
            key: Which number to read: "a" or "b".
        """
        self.lookups += 1
        if key not in ("a", "b"):
            raise ValueError(f"no number named {key!r}")  # TRL turns this into {"error": ...}
        return str(getattr(self, key))


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": "What is a + b? Look up b."}],
             "a": rng.randint(1, 9), "b": rng.randint(1, 9)} for _ in range(n)]


SAMPLES: list = []  # (messages, completion ids) of one rollout per reward call, printed at the end


def correct_sum(completions, a, b, completion_ids=None, **kwargs) -> list[float]:
    """1 for a final answer equal to a + b, less for a near miss (so a group's rewards differ and the
    step has a gradient), plus 0.1 when the rollout called a tool."""
    SAMPLES.append((completions[0], completion_ids[0] if completion_ids is not None else None))
    out = []
    for msgs, x, y in zip(completions, a, b):
        final = next((m.get("content") or "" for m in reversed(msgs) if m["role"] == "assistant"), "").strip()
        used_tool = any(m["role"] == "tool" for m in msgs)
        score = 0.0
        if final.lstrip("-").isdigit():
            score = 1.0 if int(final) == x + y else 0.5 * max(0.0, 1 - abs(int(final) - x - y) / 10)
        out.append(score + 0.1 * used_tool)
    return out


def demo(row: dict) -> list[dict]:
    """A worked episode in OpenAI messages, as TRL would record it."""
    env = NumberEnv()
    prompt = [{**m} for m in row["prompt"]]
    prompt[-1]["content"] += env.reset(**row)
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": "b"}}}
    return prompt + [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "lookup", "content": env.lookup("b")},
                     {"role": "assistant", "content": str(env.a + env.b)}]


# ---- checks ----


def check_tokenizer(tok) -> None:
    """Our template renders as ossrl does; TRL accepts it; TRL's parse_response reads a harmony tool call."""
    from ossrl.model.chat import from_openai
    from ossrl.model.harmony import encode_conversation
    from ossrl.model.tokenizer import ByteTokenizer
    from ossrl.rollout.function_tools import function_schema
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response, supports_tool_calling

    env = NumberEnv()
    row = make_rows(1, 0)[0]
    conv = demo(row)
    for msgs, gen in ((conv[:1], True), (conv, False)):
        ours = tok.apply_chat_template(msgs, tools=[env.lookup], tokenize=True, return_dict=False,
                                       add_generation_prompt=gen)
        ref = encode_conversation(ByteTokenizer(), from_openai(msgs, [function_schema(env.lookup)]),
                                  add_generation_prompt=gen)
        assert list(ours) == ref, "chat template and ossrl's harmony rendering differ"
    assert supports_tool_calling(tok), "TRL: supports_tool_calling is False"
    assert is_chat_template_prefix_preserving(tok), "TRL: template not prefix-preserving"
    prompt = tok.apply_chat_template(conv[:1], tools=[env.lookup], tokenize=True, return_dict=False,
                                     add_generation_prompt=True)
    text = ('<|channel|>analysis<|message|>Need b.<|end|><|start|>assistant'
            '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"key": "b"}<|call|>')
    parsed = parse_response(tok, tok(text, add_special_tokens=False)["input_ids"], prefix=prompt, tools=[env.lookup])
    want = [{"type": "function", "function": {"name": "lookup", "arguments": {"key": "b"}}}]
    assert parsed.get("tool_calls") == want, parsed
    print(f"tokenizer checks passed: renders as ossrl ({len(prompt)} prompt tokens), TRL parses {parsed}")


# ---- main ----


def warm_up(model, tok, steps: int, batch: int, lr: float, seed: int) -> None:
    """ossrl's supervised step on demonstrations, so the model writes tool calls in harmony."""
    from ossrl.model.chat import from_openai
    from ossrl.rollout.function_tools import function_schema
    from ossrl.train.episodes import demo_trajectory
    from ossrl.train.loop import pack, sft_step
    from ossrl.train.parallel import DataParallel

    specs = [function_schema(NumberEnv().lookup)]
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    dp = DataParallel()
    rows = make_rows(steps * batch, seed + 1)
    t0 = time.perf_counter()
    for i in range(steps):
        trajs = [demo_trajectory(tok, from_openai(demo(r), specs)) for r in rows[i * batch:(i + 1) * batch]]
        loss = sft_step(model, opt, pack(trajs, device), 1.0, dp)
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            print(f"warm-up step {i + 1}/{steps}: loss {loss:.3f}")
    print(f"warm-up: {steps} steps in {time.perf_counter() - t0:.1f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/trlpoc/run")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (rollouts per step)")
    p.add_argument("--max-completion-length", type=int, default=160)
    p.add_argument("--warmup-steps", type=int, default=80, help="ossrl supervised steps before saving; 0: none")
    p.add_argument("--warmup-batch", type=int, default=16)
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, GptOssForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ossrl.model import save_pretrained
    from ossrl.train.config import load_config
    from ossrl.train.loop import build

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    model_dir = os.path.join(a.out, "model")
    model, otok = build(load_config(None, [f"seed={a.seed}", "device=cpu"]))
    if a.warmup_steps:
        warm_up(model, otok, a.warmup_steps, a.warmup_batch, a.warmup_lr, a.seed)
    save_pretrained(model, model_dir)
    build_tokenizer().save_pretrained(model_dir)
    del model

    tok = AutoTokenizer.from_pretrained(model_dir)  # what was saved: chat template and response template too
    assert tok.response_template is not None and tok.chat_template is not None
    check_tokenizer(tok)

    hf = GptOssForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.set_experts_implementation("eager")  # as bench_loop.py does on the CPU
    print(f"model: {type(hf).__name__}, {sum(x.numel() for x in hf.parameters())} parameters, "
          f"attention {hf.config._attn_implementation}, eos {hf.generation_config.eos_token_id}")

    n_rows = a.steps * a.batch // a.num_generations
    dataset = Dataset.from_list(make_rows(max(n_rows, 1), a.seed))
    cfg = GRPOConfig(
        output_dir=os.path.join(a.out, "trainer"),
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_generations=a.num_generations,
        max_completion_length=a.max_completion_length,
        max_tool_calling_iterations=3,
        learning_rate=1e-4,
        beta=0.0,  # no reference model
        router_aux_loss_coef=0.0,  # TRL adds GPT-OSS's MoE load-balancing loss (config coef 0.9) unless 0; ossrl has none
        temperature=1.0,
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=a.seed,
        log_completions=False,
    )

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.logs = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            print(f"step {state.global_step}: {self.times[-1]:.2f} s")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(logs)

    timer = Timer()
    trainer = GRPOTrainer(model=hf, processing_class=tok, reward_funcs=[correct_sum], args=cfg,
                          train_dataset=dataset, environment_factory=NumberEnv, callbacks=[timer])
    print(f"TRL tools: {[t.__name__ for t in trainer.tools]}, training chat template replaced: "
          f"{trainer.chat_template is not None}")
    trainer.train()

    for i, lg in enumerate(timer.logs, 1):
        keys = ("reward", "tools/call_frequency", "tools/failure_frequency", "completions/mean_length", "loss")
        print(f"log {i}: " + ", ".join(f"{k}={lg[k]:.3g}" for k in keys if k in lg))
    for i, (msgs, ids) in enumerate(SAMPLES, 1):
        print(f"rollout sample (step {i}): {msgs}"[:600])
        if ids is not None:
            print(f"  its completion tokens, decoded: {tok.decode(ids)!r}"[:600])
    ts = timer.times
    print(f"seconds per step: {', '.join(f'{t:.2f}' for t in ts)}; mean {sum(ts) / len(ts):.2f} s "
          f"({a.batch} rollouts of up to {a.max_completion_length} tokens, {a.num_generations} per prompt)")


if __name__ == "__main__":
    main()
