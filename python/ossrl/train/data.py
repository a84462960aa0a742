"""Datasets for ``ossrl train``: rows from ``.jsonl``, ``.parquet`` or a folder written by
``datasets.Dataset.save_to_disk`` (read with pyarrow: the ``datasets`` package is not needed).

A row is a dict of JSON-like values. Training rows need ``prompt`` (a string or OpenAI-style
messages); demonstration rows need ``messages``. Rows are checked when loaded, so a bad file is
an error naming the file and the row before any model is built.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from ..model.chat import ChatFormatError, prompt_messages

__all__ = ["DatasetError", "load_rows", "hash_split", "epoch_order"]


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file (and the row)."""


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}, line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}, line {n}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _arrow_table(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet and datasets folders needs pyarrow (pip install pyarrow)") from None
    if path.is_dir():
        state = path / "state.json"
        if not state.is_file():
            raise DatasetError(f"{path}: a folder must be written by datasets.Dataset.save_to_disk "
                               "(no state.json; a DatasetDict folder: pass one split's folder)")
        try:
            files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{state}: unreadable ({type(e).__name__}: {e})") from None
        tables = []
        for name in files:
            f = (path / name).resolve()
            if f.parent != path.resolve():
                raise DatasetError(f"{state}: data file {name!r} lies outside the folder")
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        return pa.concat_tables(tables) if tables else pa.table({})
    return pq.read_table(str(path))


def load_rows(path: str | Path, *, need: str = "prompt", what: str = "dataset") -> list[dict]:
    """Every row of the file or folder at ``path``, each checked to have a usable ``need``
    column ("prompt" or "messages")."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{what} {str(path)!r}: no such file or folder")
    try:
        if p.is_file() and p.suffix in (".jsonl", ".json"):
            rows = _jsonl(p)
        elif p.is_dir() or p.suffix == ".parquet":
            rows = _arrow_table(p).to_pylist()
        else:
            raise DatasetError(f"{what} {str(path)!r}: expected a .jsonl or .parquet file or a save_to_disk folder")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {str(path)!r}: {type(e).__name__}: {e}") from None
    except DatasetError:
        raise
    except Exception as e:  # pyarrow's own errors: a corrupt or foreign file
        raise DatasetError(f"{what} {str(path)!r}: cannot be read ({type(e).__name__}: {e})") from None
    if not rows:
        raise DatasetError(f"{what} {str(path)!r} has no rows")
    for i, row in enumerate(rows):
        if need not in row:
            raise DatasetError(f"{what} {str(path)!r}, row {i}: no {need!r} column (columns: {sorted(row)})")
        try:
            if need == "prompt":
                prompt_messages(row["prompt"], f"{what} {str(path)!r}, row {i}: prompt")
            else:
                _check_messages(row[need], f"{what} {str(path)!r}, row {i}: {need}")
        except ChatFormatError as e:
            raise DatasetError(str(e)) from None
    return rows


def _check_messages(messages: Any, where: str) -> None:
    msgs = prompt_messages(messages, where)
    if not any(m.get("role") == "assistant" for m in msgs):
        raise DatasetError(f"{where}: a demonstration needs at least one assistant message")
    if msgs[0].get("role") == "assistant":
        raise DatasetError(f"{where}: a demonstration starts with a prompt (system / user), not the assistant")


def _row_key(row: dict) -> bytes:
    return json.dumps(row, sort_keys=True, default=str).encode()


def hash_split(rows: list[dict], eval_fraction: float = 0.125) -> tuple[list[dict], list[dict]]:
    """A fixed split (the same on every machine and run): a row is held out when the hash of
    its content says so; at least one row goes to each side when there are two or more."""
    train, held = [], []
    for row in rows:
        h = hashlib.sha256(_row_key(row)).digest()
        (held if h[0] < 256 * eval_fraction else train).append(row)
    if len(rows) > 1 and not held:
        held.append(train.pop())
    if len(rows) > 1 and not train:
        train.append(held.pop())
    return train or list(rows), held or list(rows)


def epoch_order(n: int, index: int, seed: int, salt: str) -> int:
    """The row for draw number ``index``: every row once per epoch, in an order shuffled per
    epoch from ``seed`` (so draw N is the same row whether or not the run was resumed)."""
    epoch, k = divmod(index, n)
    order = list(range(n))
    random.Random(f"{seed}-{salt}-epoch-{epoch}").shuffle(order)
    return order[k]
