"""The shape the code promises (docs/architecture.md): trainers a newcomer can read in one sitting,
no function longer than a screen and a half."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ankus"
MAX_TRAINER_LINES = 500
MAX_FUNCTION_LINES = 80  # without the docstring (loss functions document their maths at length)


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(lines without the docstring, "file:line name") of every function in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str)
            doc_lines = first.end_lineno - first.lineno + 1 if is_doc else 0
            out.append((node.end_lineno - node.lineno + 1 - doc_lines, f"{path.name}:{node.lineno} {node.name}"))
    return out


def test_function_lengths_leave_out_the_docstring(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('def f():\n    """Doc\n    string."""\n    a = 1\n    return a\n\n\ndef g():\n    pass\n')
    assert function_lengths(f) == [(3, "m.py:1 f"), (2, "m.py:8 g")]


def test_trainers_fit_in_one_sitting():
    long = {p.name: n for p in sorted((SRC / "trainers").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_TRAINER_LINES}
    assert long == {}


def test_no_function_is_longer_than_a_screen_and_a_half():
    long = sorted((n, where) for p in SRC.rglob("*.py") for n, where in function_lengths(p) if n > MAX_FUNCTION_LINES)
    assert long == []
