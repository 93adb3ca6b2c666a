"""What the evaluation tasks share: reading task files, standard errors, writing the tables.

    rows = read_task("implicature.jsonl", {"question": str, "implicature": ("yes", "no")})
    mean, se = mean_se([1, 0, 1, 1])

A task file is JSONL shipped in ``ankus/evals/data/`` (found by name) or any path. A line with a
missing or wrong field raises :class:`TaskDataError` naming the file, the line and the field.
Every task writes ``rows.jsonl`` (one scored item per line), ``table.csv`` and ``table.md``.
"""

from __future__ import annotations

import csv
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from ankus.data.io import DataError, write_jsonl

__all__ = ["TaskDataError", "read_task", "data_path", "mean_se", "write_outputs", "markdown_table", "parse_floats",
           "parse_ints"]


class TaskDataError(DataError):
    """A task file line lacks a field or holds a wrong value; the message names file, line and field."""


def data_path(name: str) -> Path:
    """A shipped task file by name (``implicature.jsonl``), else the path as given."""
    shipped = resources.files("ankus").joinpath("evals", "data", name)
    if "/" not in name and shipped.is_file():
        return Path(str(shipped))
    return Path(name)


def _check_field(row: dict, key: str, rule: Any) -> str | None:
    """What is wrong with ``row[key]`` under ``rule`` (a type, or a tuple of allowed values), or None."""
    if key not in row:
        return f"missing field '{key}'"
    value = row[key]
    if isinstance(rule, tuple):
        return None if value in rule else f"field '{key}' must be one of {list(rule)}, got {value!r}"
    if rule is str and (not isinstance(value, str) or not value.strip()):
        return f"field '{key}' must be a non-empty string, got {value!r}"
    if not isinstance(value, rule):
        return f"field '{key}' must be {rule.__name__}, got {type(value).__name__}"
    return None


def read_task(name: str | Path, fields: Mapping[str, Any]) -> list[dict]:
    """The rows of a task file; ``fields`` maps each required field to a type or allowed values."""
    path = data_path(str(name))
    if not path.is_file():
        raise TaskDataError(f"{path}: task file not found (a shipped name or a JSONL path)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}, line {lineno}: expected a JSON object")
        for key, rule in fields.items():
            problem = _check_field(row, key, rule)
            if problem:
                raise TaskDataError(f"{path}, line {lineno}: {problem} (every line needs: {', '.join(fields)})")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    return rows


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(table: Sequence[dict]) -> str:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def write_outputs(out: str | Path, rows: Sequence[dict], table: Sequence[dict], title: str) -> Path:
    """``rows.jsonl``, ``table.csv`` and ``table.md`` (titled) in ``out``; returns the CSV path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "rows.jsonl", rows)
    cols = list(dict.fromkeys(k for r in table for k in r))
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(table)
    (out / "table.md").write_text(f"## {title}\n\n" + markdown_table([{c: r.get(c, "") for c in cols} for r in table]),
                                  encoding="utf-8")
    return out / "table.csv"
