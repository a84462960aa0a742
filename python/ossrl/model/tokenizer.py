"""Tokenizers: a checkpoint's tokenizer.json, or a small built-in byte tokenizer for tiny models.

Both speak the same small interface (:class:`Tokenizer`): ``encode``, ``decode``, ``vocab_size``,
``token_to_id`` and ``special_id`` for the harmony special tokens GPT-OSS's chat format uses.
Text given to ``encode`` is plain text unless ``allow_special=True``: a user message containing
the characters ``<|end|>`` does not become the end-of-message token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

__all__ = ["HARMONY_SPECIAL_TOKENS", "Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]

# The special tokens of the harmony chat format (their ids in GPT-OSS's o200k_harmony vocabulary
# are 199998, 199999, 200006, 200007, 200008, 200005, 200003, 200002, 200012; we look them up by name).
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)


class Tokenizer:
    """The interface the model, the chat rendering and the rollout engine use."""

    vocab_size: int

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; special tokens appear as their names (``<|end|>``)."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """The id of a special token such as ``<|call|>``; KeyError when the vocabulary lacks it."""
        i = self.token_to_id(name)
        if i is None:
            raise KeyError(f"tokenizer has no special token {name!r}")
        return i

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Where an assistant turn stops: ``<|return|>`` (final answer) and ``<|call|>`` (tool call)."""
        return (self.special_id("<|return|>"), self.special_id("<|call|>"))

    @property
    def special_ids(self) -> dict[int, str]:
        """id -> name for the harmony special tokens this vocabulary has."""
        out = {}
        for name in HARMONY_SPECIAL_TOKENS:
            i = self.token_to_id(name)
            if i is not None:
                out[i] = name
        return out


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (ids 0-255), then the harmony special tokens, then reserved ids
    up to 272, so every id a 272-way model can sample decodes. No merges, no training, no files:
    the tokenizer of ``GptOssConfig.tiny()``."""

    VOCAB_SIZE = 272
    SPECIAL = {name: 256 + i for i, name in enumerate(HARMONY_SPECIAL_TOKENS)}
    _NAMES = {**{i: n for n, i in SPECIAL.items()},
              **{i: f"<|reserved_{i}|>" for i in range(256 + len(SPECIAL), VOCAB_SIZE)}}
    _IDS = {n: i for i, n in _NAMES.items()}
    _SPLIT = re.compile("(" + "|".join(re.escape(n) for n in _IDS) + ")")

    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for piece in self._SPLIT.split(text):
            if piece in self._IDS:
                ids.append(self._IDS[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self._NAMES:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the vocabulary [0, {self.VOCAB_SIZE})")
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(self._NAMES[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._IDS:
            return self._IDS[token]
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (GPT-OSS's o200k_harmony BPE), via the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tok

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Control tokens: the harmony specials and every added token spelled <|...|>, whether the
        # file marks them special or not (tokenizers matches a non-special added token in any text).
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        names = sorted({n for n in added if n.startswith("<|") and n.endswith("|>")} |
                       {n for n in HARMONY_SPECIAL_TOKENS if self._tok.token_to_id(n) is not None}, key=len, reverse=True)
        self._control_ids = {self._tok.token_to_id(n) for n in names}
        self._control_re = re.compile("|".join(map(re.escape, names))) if names else None

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # encode_special_tokens=True makes special added tokens in the text ordinary text.
        self._tok.encode_special_tokens = not allow_special
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        ids = self._encode(text, allow_special)
        if allow_special or self._control_re is None or self._control_ids.isdisjoint(ids):
            return ids
        # A control token's spelling in plain text became the token (an added token the file did
        # not mark special): encode again with every such spelling cut after its first character,
        # so the text stays the same and no piece can match.
        out, pos = [], 0
        for m in self._control_re.finditer(text):
            out += self._encode(text[pos:m.start() + 1], False)
            pos = m.start() + 1
        return out + self._encode(text[pos:], False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer.json of a checkpoint folder (or file); None -> the built-in :class:`ByteTokenizer`."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
