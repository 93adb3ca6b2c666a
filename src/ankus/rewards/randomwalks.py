"""The random-walks task: trlX's CPU-sized regression benchmark, re-implemented.

A random directed graph over ``n_nodes`` nodes named ``a, b, c, ...``; node 0 (``a``) is the
goal. A model is prompted with a start node and must write a path to the goal; the reward is
how close the path is to a shortest one:

    optimality = (max_length - path_len) / (max_length - shortest_len)

where ``path_len`` counts the nodes up to and including the first visit to the goal, and
``shortest_len`` counts the nodes on a shortest path (capped at ``max_length``). A shortest
path scores 1. An invalid path -- an unknown node, a step along a missing edge, or never
reaching the goal -- is treated as ``path_len = max_length`` and scores 0.

    task = generate_random_walks(seed=1000)
    task.prompts                 # ['b', 'c', ...]   sorted unique start letters of the walks
    task.optimality("bha")       # 1.0 when b -> h -> a is a shortest path
    task.reward_fn(samples=["bha"], prompts=["b"], outputs=["ha"])   # [1.0]

Differences from trlX's ``examples/randomwalks`` (from the description, not its code):

* Randomness comes from one ``numpy.random.Generator`` (``numpy.random.default_rng(seed)``)
  used for the graph and then the walks, so the same seed gives the same task on any machine,
  but not trlX's exact graph.
* A valid path that reaches the goal after more than ``max_length`` nodes would score below 0
  in trlX's formula; it is clamped to 0, the score of an invalid path.
* When the goal is unreachable from the start node (or only in ``max_length`` nodes or more)
  the formula's denominator is 0; every path from such a start scores 0. Walks may start
  there, as in trlX, and simply never reach the goal.
* Shortest paths come from a breadth-first search written here (no networkx).
"""

from __future__ import annotations

import string
from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RandomWalksTask", "generate_random_walks", "shortest_path_lengths", "path_optimality", "spaced_walk",
           "randomwalk_rows", "walk_is_legal", "randomwalk_eval", "WarmStart", "warm_start"]

_LETTERS = string.ascii_lowercase
_DELIMITERS = "| \t\n"  # "|" separates nodes when a tokenizer needs it (trlX's GPT-2 variant)


def shortest_path_lengths(adjacency: np.ndarray, goal: int = 0) -> list[int | None]:
    """For every node, the number of nodes on a shortest directed path to ``goal`` (the node
    itself and the goal included; 1 for the goal), or ``None`` when the goal is unreachable.

    One BFS from the goal over reversed edges: ``adjacency[i, j]`` is the edge i -> j.
    """
    n = adjacency.shape[0]
    lengths: list[int | None] = [None] * n
    lengths[goal] = 1
    queue = deque([goal])
    while queue:
        node = queue.popleft()
        for pred in np.flatnonzero(adjacency[:, node]):  # every pred -> node edge
            if lengths[pred] is None:
                lengths[pred] = lengths[node] + 1
                queue.append(int(pred))
    return lengths


def path_optimality(path: str, adjacency: np.ndarray, max_length: int, goal: int = 0,
                    shortest: list[int | None] | None = None) -> float:
    """Optimality in [0, 1] of ``path`` (node letters, delimiters ``|`` and whitespace
    ignored). See the module docstring for the formula."""
    n = adjacency.shape[0]
    nodes = [c for c in path if c not in _DELIMITERS]
    if not nodes:
        return 0.0
    shortest = shortest if shortest is not None else shortest_path_lengths(adjacency, goal)
    path_len = None
    prev = None
    for i, ch in enumerate(nodes):
        node = _LETTERS.find(ch)
        if node < 0 or node >= n:
            return 0.0  # unknown node
        if prev is not None and not adjacency[prev, node]:
            return 0.0  # missing edge
        if node == goal:
            path_len = i + 1
            break  # whatever follows the goal is ignored
        prev = node
    if path_len is None:
        return 0.0  # never reached the goal
    start_short = shortest[_LETTERS.find(nodes[0])]
    if start_short is None:
        return 0.0  # unreachable goal: cannot happen for a valid path, kept for clarity
    optimal_len = min(start_short, max_length)
    if optimal_len >= max_length:
        return 0.0  # the formula's denominator is 0: no path within the budget
    score = (max_length - min(path_len, max_length)) / (max_length - optimal_len)
    return float(score)


@dataclass
class RandomWalksTask:
    """A generated graph, its sample walks, and the metric/reward built on it."""

    adjacency: np.ndarray
    """(n_nodes, n_nodes) bool; ``adjacency[i, j]`` is the directed edge i -> j."""
    walks: list[str]
    """Sample random walks, one string of node letters each."""
    max_length: int
    """Longest walk, in nodes; also the bound in the optimality formula."""
    goal: int = 0
    shortest: list[int | None] = field(default_factory=list)
    """Nodes on a shortest path to the goal, per start node (None: unreachable)."""

    def __post_init__(self):
        if not self.shortest:
            self.shortest = shortest_path_lengths(self.adjacency, self.goal)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def prompts(self) -> list[str]:
        """Sorted unique start letters of the walks (trlX's prompts)."""
        return sorted({w[0] for w in self.walks})

    def optimality(self, path: str) -> float:
        return path_optimality(path, self.adjacency, self.max_length, self.goal, self.shortest)

    def reward_fn(self, samples: list[str], prompts: list[str] | None = None,
                  outputs: list[str] | None = None, **metadata) -> list[float]:
        """Reward = optimality of each full sample (prompt + continuation)."""
        return [self.optimality(s) for s in samples]

    def metric_fn(self, samples: list[str], **metadata) -> dict[str, list[float]]:
        return {"optimality": self.reward_fn(samples)}


def generate_random_walks(n_nodes: int = 21, max_length: int = 10, n_walks: int = 1000,
                          p_edge: float = 0.1, seed: int = 1000, goal: int = 0) -> RandomWalksTask:
    """Build the task (defaults: trlX's, with the example's ``seed=config.train.seed=1000``).

    Graph: each off-diagonal edge is present with probability ``p_edge``, resampled until every
    node has an outgoing edge; then the goal's out-edges are replaced by a single self-loop.
    Walks: start uniformly among the non-goal nodes, step to a uniformly chosen out-neighbour,
    stop at the goal or after ``max_length`` nodes.
    """
    if not 2 <= n_nodes <= len(_LETTERS):
        raise ValueError(f"n_nodes must be in [2, {len(_LETTERS)}] (one letter per node), got {n_nodes}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    rng = np.random.default_rng(seed)
    while True:
        adjacency = rng.random((n_nodes, n_nodes)) > 1.0 - p_edge
        np.fill_diagonal(adjacency, False)
        if adjacency.any(axis=1).all():
            break
    adjacency[goal, :] = False
    adjacency[goal, goal] = True  # the goal is absorbing

    starts = [i for i in range(n_nodes) if i != goal]
    walks = []
    for _ in range(n_walks):
        node = starts[rng.integers(len(starts))]
        walk = [node]
        while len(walk) < max_length and node != goal:
            node = int(rng.choice(np.flatnonzero(adjacency[node])))
            walk.append(node)
        walks.append("".join(_LETTERS[i] for i in walk))
    return RandomWalksTask(adjacency=adjacency, walks=walks, max_length=max_length, goal=goal)


# ---------------------------------------------------------------------------------------------
# the task as supervised data, and a sampling eval of a model on it


def spaced_walk(walk: str) -> str:
    """``"bha"`` -> ``"b h a"``. SmolLM2's tokenizer merges runs of letters ("dfa" -> "df", "a");
    with spaces every node is one token (" h", " a"), as trlX's character-level vocabulary has it.
    The random-walks metric ignores spaces, so scored text needs no undoing."""
    return " ".join(walk)


def randomwalk_rows(**task_kwargs) -> list[dict]:
    """The random-walks demonstrations as prompt/completion rows: the start node is the prompt,
    the rest of the walk (space-separated) the completion: ``{"prompt": "b", "completion": " h a"}``."""
    task = generate_random_walks(**task_kwargs)
    return [{"prompt": w[0], "completion": spaced_walk(w)[1:]} for w in task.walks]


def walk_is_legal(task: "RandomWalksTask", text: str) -> bool:
    """A legal walk: known nodes, every step along an edge of the graph, at most max_length nodes."""
    nodes = [c for c in text if c not in "| \t\n"]
    if not nodes or len(nodes) > task.max_length:
        return False
    ix = [string.ascii_lowercase.find(c) for c in nodes]
    if any(i < 0 or i >= task.n_nodes for i in ix):
        return False
    return all(bool(task.adjacency[a, b]) for a, b in zip(ix, ix[1:]))


def randomwalk_eval(model, tok, task_kwargs: dict, samples_per_prompt: int, gen, batch_size: int = 64,
                    seed: int = 0) -> dict:
    """Sample ``samples_per_prompt`` walks from every start node (``gen``: an
    ``ankus.generation.GenerationConfig``): the fraction of legal walks, of legal walks that
    reach the goal, and the mean optimality (trlX's metric), plus ``_examples``."""
    import torch

    from ankus.generation import generate

    task = generate_random_walks(**task_kwargs)
    prompts = [p for p in task.prompts for _ in range(samples_per_prompt)]
    with torch.no_grad():
        outs = generate(model, tok, prompts, gen, generator=torch.Generator().manual_seed(seed),
                        batch_size=batch_size).texts
    samples = [p + o for p, o in zip(prompts, outs)]
    legal = [walk_is_legal(task, s) for s in samples]
    opt = task.reward_fn(samples)
    goal = string.ascii_lowercase[task.goal]
    return {"legal_fraction": sum(legal) / len(samples),
            "reach_goal_fraction": sum(1 for s, ok in zip(samples, legal) if ok and goal in s) / len(samples),
            "optimality": sum(opt) / len(opt), "_examples": samples[:8]}


@dataclass
class WarmStart:
    steps: int = 0
    """Supervised steps on the task's walks before PPO (:func:`warm_start`); 0 = none."""
    lr: float = 1e-3
    """Learning rate of the warm start."""
    batch_size: int = 32
    """Batch size of the warm start."""


def warm_start(model, tok, *, steps: int, lr: float, batch_size: int, seed: int, walks_seed: int = 1000,
               progress: bool = True) -> float:
    """A short supervised fit of ``model`` on the task's walks (trlX's random-walks model is
    pretrained on walks; this fits one in a few seconds): ``steps`` AdamW steps on batches drawn
    by ``random.Random(seed)``, each walk followed by EOS. Returns the last loss."""
    import random

    import torch
    from tqdm.auto import tqdm

    from ankus.losses.sft import sft_loss

    walks = generate_random_walks(seed=walks_seed).walks
    # one token per node: a letter tokenizer takes "bha" as is; SmolLM2's would merge it into "bh"+"a"
    spaced = len(tok(walks[0], add_special_tokens=False).input_ids) != len(walks[0])
    texts = [spaced_walk(w) if spaced else w for w in walks]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="warm start", disable=not progress):
        batch = rng.sample(texts, min(batch_size, len(texts)))
        enc = tok([t + tok.eos_token for t in batch], return_tensors="pt", padding=True, padding_side="right")
        enc = enc.to(next(model.parameters()).device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        loss, _ = sft_loss(logits, enc.input_ids, enc.attention_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())
