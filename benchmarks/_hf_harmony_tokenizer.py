"""A Hugging Face tokenizer for ossrl's tiny GPT-OSS model, for TRL's tool-using GRPO (bench_vs_trl.py).

* Same ids as ``ossrl.model.ByteTokenizer``: bytes 0-255, the nine harmony special tokens at
  256-264, ``<|reserved_265|>`` ... ``<|reserved_271|>``.
* A chat template (our own, written from the layout described in ``ossrl/model/harmony.py`` and
  ``ossrl/model/chat.py``) that renders OpenAI-style messages, ``tools`` included, exactly as
  ``render_text(from_openai(messages, tools))`` does: the system preamble (fixed date), a
  developer message with the tools as a TypeScript ``namespace functions``, tool calls as
  ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>`` and tool
  results as ``<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>``.
* A ``response_template`` (transformers >= 5.13 response parsing, what TRL's ``parse_response``
  uses) for what the model writes after ``<|start|>assistant``.

TRL only sets a response template itself for chat templates it recognises by exact string
equality (``trl.chat_template_utils.add_response_schema``); ours is not one of them, so we set
``tokenizer.response_template`` ourselves, and TRL then leaves it alone.
"""

from __future__ import annotations

from ossrl.model.tokenizer import HARMONY_SPECIAL_TOKENS, ByteTokenizer

# ---- the chat template ----
# Kwargs (apply_chat_template(..., **kw) / GRPOConfig.chat_template_kwargs): preamble (default
# true), current_date (default 2025-06-01, ossrl's TRAINING_DATE), reasoning_effort (default medium).
HARMONY_CHAT_TEMPLATE = r"""
{%- macro ts_type(s) -%}
{%- if s is not mapping -%}any
{%- elif s.enum is defined -%}{%- for v in s.enum -%}{{ v | tojson }}{{ " | " if not loop.last }}{%- endfor -%}
{%- elif s.type is defined and s.type is not string and s.type is iterable -%}
{%- for t in s.type -%}{{ ts_type({"type": t, "items": s.get("items"), "properties": s.get("properties"), "required": s.get("required", [])}) }}{{ " | " if not loop.last }}{%- endfor -%}
{%- elif s.type == "string" -%}string
{%- elif s.type == "number" or s.type == "integer" -%}number
{%- elif s.type == "boolean" or s.type == "null" -%}{{ s.type }}
{%- elif s.type == "array" -%}
{%- set item = ts_type(s.get("items")) -%}
{%- if " | " in item -%}({{ item }})[]{%- else -%}{{ item }}[]{%- endif -%}
{%- elif s.type == "object" and s.properties -%}{{ "{\n" }}{{ ts_fields(s) }}}
{%- else -%}any
{%- endif -%}
{%- endmacro -%}

{%- macro ts_fields(s) -%}
{%- set required = s.required or [] -%}
{%- for name, prop in s.properties.items() -%}
{%- if prop is mapping and prop.description -%}
{%- for line in prop.description.split("\n") -%}{{ "// " + line + "\n" }}{%- endfor -%}
{%- endif -%}
{{ name }}{{ "" if name in required else "?" }}: {{ ts_type(prop) }},
{%- if prop is mapping and prop.default is defined -%}
{{ " // default: " }}{{ prop.default if prop.default is string else (prop.default | tojson) }}
{%- endif -%}
{{ "\n" }}
{%- endfor -%}
{%- endmacro -%}

{%- macro ts_tool(t) -%}
{%- set f = t.function if t.function is defined else t -%}
{%- if f.description -%}{%- for line in f.description.split("\n") -%}{{ "// " + line + "\n" }}{%- endfor -%}{%- endif -%}
{%- if f.parameters and f.parameters.properties -%}
type {{ f.name }} = (_: {{ "{\n" }}{{ ts_fields(f.parameters) }}}) => any;
{%- else -%}
type {{ f.name }} = () => any;
{%- endif -%}
{%- endmacro -%}

{%- macro text(c) -%}
{%- if c is none -%}
{%- elif c is string -%}{{ c }}
{%- else -%}{%- for p in c -%}{%- if p.type == "text" -%}{{ p.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}

{%- set preamble = preamble if preamble is defined else true -%}
{%- set current_date = current_date if current_date is defined else "2025-06-01" -%}
{%- set reasoning_effort = reasoning_effort if reasoning_effort is defined else "medium" -%}
{%- set ns = namespace(instructions=[], last_call=none) -%}
{%- for m in messages -%}
{%- if m.role == "system" or m.role == "developer" -%}
{%- set ns.instructions = ns.instructions + [text(m.content)] -%}
{%- endif -%}
{%- endfor -%}

{%- if preamble -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ current_date }}

Reasoning: {{ reasoning_effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{%- if tools %}{{ "\n" }}Calls to these tools must go to the commentary channel: 'functions'.{% endif -%}
<|end|>
{%- endif -%}
{%- if ns.instructions or (preamble and tools) -%}
<|start|>developer<|message|>
{%- if ns.instructions -%}# Instructions{{ "\n\n" }}{{ ns.instructions | join("\n\n") }}{%- endif -%}
{%- if preamble and tools -%}
{%- if ns.instructions -%}{{ "\n\n" }}{%- endif -%}
# Tools{{ "\n\n" }}## functions{{ "\n\n" }}namespace functions {{ "{\n\n" }}
{%- for t in tools -%}{{ ts_tool(t) }}{{ "\n\n" if not loop.last }}{%- endfor -%}
{{ "\n\n" }}} // namespace functions
{%- endif -%}
<|end|>
{%- endif -%}

{%- for m in messages -%}
{%- if m.role == "user" -%}
<|start|>user<|message|>{{ text(m.content) }}<|end|>
{%- elif m.role == "assistant" -%}
{%- set thinking = m.reasoning_content or m.reasoning or m.thinking -%}
{%- if thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ thinking }}<|end|>{%- endif -%}
{%- set calls = m.tool_calls or [] -%}
{%- set content = text(m.content) -%}
{%- if content or not calls -%}
<|start|>assistant<|channel|>{{ "commentary" if calls else "final" }}<|message|>{{ content }}<|end|>
{%- endif -%}
{%- for call in calls -%}
{%- set f = call.function if call.function is defined else call -%}
{%- set args = f.arguments if f.arguments is defined else "{}" -%}
{%- if args is string -%}
{%- set is_object = args.strip().startswith("{") and args.strip().endswith("}") -%}
{%- else -%}
{%- set is_object = args is mapping -%}
{%- set args = args | tojson -%}
{%- endif -%}
<|start|>assistant<|channel|>commentary to=functions.{{ f.name }}{{ " <|constrain|>json" if is_object }}<|message|>{{ args }}<|call|>
{%- set ns.last_call = f.name -%}
{%- endfor -%}
{%- elif m.role == "tool" -%}
<|start|>functions.{{ m.name or ns.last_call }} to=assistant<|channel|>commentary<|message|>{{ text(m.content) }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}
"""

# ---- the response template: what the model writes after "<|start|>assistant" ----
# Fields are regions between literal / regex anchors; text outside any region (the "<|start|>assistant"
# between two messages) is dropped. Tool-call arguments are parsed as JSON ("json" content parser).
HARMONY_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start|>assistant",
    "fields": {
        "reasoning_content": {
            "open": "<|channel|>analysis<|message|>",
            "close_pattern": r"<\|end\|>\s*",
            "content": "text",
            "repeats": True,
            "join": "\n",
        },
        "content": {
            "open": "<|channel|>final<|message|>",
            "close_pattern": r"<\|return\|>\s*|<\|end\|>\s*",
            "content": "text",
        },
        "tool_calls": {
            "open_pattern": r"<\|channel\|>commentary to=functions\.(?P<name>[^\s<]+)\s*(?:<\|constrain\|>\s*json)?<\|message\|>",
            "close_pattern": r"<\|call\|>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (the alphabet tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer():
    """A transformers fast tokenizer with ByteTokenizer's ids, the harmony chat template and response template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = [ByteTokenizer._NAMES[i] for i in range(256, ByteTokenizer.VOCAB_SIZE)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for i, n in enumerate(names, 256):
        assert tok.token_to_id(n) == i, (n, tok.token_to_id(n), i)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|return|>",  # generation also stops at <|call|>: the model's generation_config lists both
        pad_token="<|endoftext|>",
        chat_template=HARMONY_CHAT_TEMPLATE,
    )
    hf.response_template = HARMONY_RESPONSE_TEMPLATE
    assert all(hf.convert_tokens_to_ids(n) == ByteTokenizer.SPECIAL[n] for n in HARMONY_SPECIAL_TOKENS)
    return hf
