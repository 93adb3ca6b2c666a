"""The package's import graph: no cycles, and no module importing from a layer above its own.

Read from the sources (every ``import``/``from ... import`` of an ``ankus`` module, at module
level or inside a function; imports under ``if TYPE_CHECKING:`` are annotations only and left
out). Layers, lowest first, as docs/architecture.md draws them: an import may go down or stay in
its own layer, never up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# module prefix -> layer; the longest matching prefix decides
LAYERS: dict[str, int] = {
    # 0: plain values and pure math: configs, files, token rules, losses, RL estimators
    "ankus.config": 0, "ankus.atomic": 0, "ankus.optim": 0, "ankus.data.io": 0, "ankus.data.tokens": 0,
    "ankus.data.assets": 0, "ankus.data.batching": 0, "ankus.losses": 0, "ankus.rl.stats": 0, "ankus.rl.gae": 0,
    "ankus.rl.kl": 0, "ankus.rl.estimators": 0, "ankus.recipes": 0,
    # 1: models and the machinery around a training step
    "ankus.models": 1, "ankus.distributed": 1, "ankus.checkpoint": 1, "ankus.runs": 1, "ankus.allocator": 1,
    # 2: sampling
    "ankus.generation": 2,
    # 3: tasks and rewards (may sample)
    "ankus.rewards": 3,
    # 4: datasets built with models, tokenizers or tasks
    "ankus.data": 4,
    # 5: pieces of a training loop that run models (rollouts, held-out evaluation), chat backends
    "ankus.rl": 5, "ankus.chat": 5,
    # 5: evaluation tasks (may sample, score, or ask a chat backend)
    "ankus.evals": 5,
    # 6: trainers; 7: pipelines over trainers, the server; 8: the command line and the top-level API
    # audits may train the models they audit (a reverse LM, checkpoints); search serves a web page
    "ankus.trainers": 6, "ankus.pipelines": 7, "ankus.serve": 7, "ankus.audits": 7, "ankus.search": 7,
    "ankus.cli": 8, "ankus": 8,
}

# edges the layers allow but the design forbids: trainers do not import each other; the reference
# model and the shared-prompt forward are independent
FORBIDDEN = [("ankus.trainers.", "ankus.trainers."), ("ankus.models.reference", "ankus.models.prefix"),
             ("ankus.models.prefix", "ankus.models.reference")]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "ankus").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the ankus modules it imports (``from pkg import mod`` resolves to the module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ankus"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("ankus"))
        graph[name] = {t for t in targets if t != name}
    return graph


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")
    return LAYERS[best]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_graph_is_read(graph):
    # the reader sees both module-level and function-level imports
    assert "ankus.models.loading" in graph["ankus.trainers.pretrain"]
    assert "ankus.generation.engine" in graph["ankus.cli"]  # imported inside cmd_generate
    assert "ankus.generation.engine" not in graph["ankus.generation.sampling"]  # TYPE_CHECKING only


def test_no_cycles(graph):
    assert cycles(graph) == []


def test_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_upward_imports(graph):
    upward = [f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
              for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_forbidden_edges(graph):
    bad = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
           for src, dst in FORBIDDEN if a.startswith(src) and b.startswith(dst) and a != b]
    assert bad == []


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer(module)
