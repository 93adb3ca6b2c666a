"""Reading user data: JSONL with errors that name the file, the line and the field.

    rows = read_jsonl("pairs.jsonl", required=("prompt", "chosen", "rejected"))

A malformed line, a missing field, a non-string or empty value raises :class:`DataError`
(``on_error="raise"``, the default) or is counted and skipped (``on_error="skip"``; the
count is in ``ReadStats``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)


def read_jsonl(path: str | Path, required: Iterable[str] = (), *, non_empty: Iterable[str] | None = None,
               on_error: Literal["raise", "skip"] = "raise", stats: ReadStats | None = None) -> list[dict]:
    """Rows of a JSONL file. ``required`` fields must be present and strings; ``non_empty``
    (default: the required ones) must not be blank."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    required = tuple(required)
    non_empty = required if non_empty is None else tuple(non_empty)
    stats = stats if stats is not None else ReadStats()
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _check_row(line, required, non_empty)
            except DataError as e:
                msg = f"{path}, line {lineno}: {e}"
                if on_error == "raise":
                    raise DataError(msg + " (fix the line, or skip bad lines with on_error='skip')") from None
                stats.skipped += 1
                stats.reasons.append(msg)
                continue
            rows.append(row)
            stats.read += 1
    return rows


def _check_row(line: str, required: tuple[str, ...], non_empty: tuple[str, ...]) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    for key in required:
        if key not in row:
            raise DataError(f"missing field '{key}' (present: {', '.join(row) or 'none'})")
        if not isinstance(row[key], str):
            raise DataError(f"field '{key}' must be a string, got {type(row[key]).__name__}")
    for key in non_empty:
        if key in row and isinstance(row[key], str) and not row[key].strip():
            raise DataError(f"field '{key}' is empty")
    return row


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows atomically (temporary file, then rename)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def check_length(n_tokens: int, max_len: int, where: str) -> None:
    """Raise when a sequence does not fit the model's context."""
    if n_tokens > max_len:
        raise DataError(f"{where}: {n_tokens} tokens exceed the model's context of {max_len}; "
                        "shorten it or raise the length limit")
