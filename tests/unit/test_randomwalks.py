"""The random-walks task: hand-built graphs for the metric, invariants for the generator."""

import numpy as np
import pytest

from ankus.rewards.randomwalks import (RandomWalksTask, generate_random_walks, path_optimality,
                                       shortest_path_lengths)

# Hand-written graph, nodes a b c d e (0..4), goal a:
#   a -> a (self-loop)   b -> c, b -> d   c -> a   d -> c, d -> b   e -> e (cannot reach a)
EDGES = [("a", "a"), ("b", "c"), ("b", "d"), ("c", "a"), ("d", "c"), ("d", "b"), ("e", "e")]
MAX_LEN = 5


@pytest.fixture
def task():
    adj = np.zeros((5, 5), dtype=bool)
    for src, dst in EDGES:
        adj[ord(src) - 97, ord(dst) - 97] = True
    return RandomWalksTask(adjacency=adj, walks=["bca", "dca", "ee"], max_length=MAX_LEN)


def test_shortest_path_lengths_by_hand(task):
    # Nodes on a shortest path, both ends included: a:1 (a), b:3 (b c a), c:2 (c a), d:3 (d c a), e: none.
    assert shortest_path_lengths(task.adjacency) == [1, 3, 2, 3, None]
    assert task.shortest == [1, 3, 2, 3, None]


@pytest.mark.parametrize("path, expected", [
    ("bca", 1.0),              # shortest: 3 nodes, optimal 3
    ("ca", 1.0),
    ("a", 1.0),                # starting on the goal: length 1 = optimal 1
    ("dca", 1.0),
    ("bdca", 0.5),             # (5 - 4) / (5 - 3)
    ("dbca", 0.5),
    ("bdbca", 0.0),            # 5 nodes = max_length: (5 - 5) / 2
    ("bdbdca", 0.0),           # valid but 6 nodes > max_length: clamped to 0 (trlX's formula gives -0.5)
    ("b|c|a", 1.0),            # delimiters ignored
    ("b c a", 1.0),
    ("bcaxyz", 1.0),           # anything after the goal is ignored
    ("bcaaa", 1.0),
    ("ba", 0.0),               # missing edge b -> a
    ("cb", 0.0),               # missing edge c -> b
    ("bda", 0.0),              # missing edge d -> a
    ("bdb", 0.0),              # never reaches the goal
    ("b", 0.0),
    ("", 0.0),
    ("bxa", 0.0),              # unknown node
    ("bfa", 0.0),              # a letter beyond the graph's 5 nodes
    ("B", 0.0),                # upper case is not a node
    ("ee", 0.0),               # goal unreachable from e
])
def test_optimality_by_hand(task, path, expected):
    assert task.optimality(path) == pytest.approx(expected)
    assert path_optimality(path, task.adjacency, MAX_LEN) == pytest.approx(expected)


def test_reward_fn_scores_full_samples(task):
    samples = ["bca", "bdca", "bx"]
    assert task.reward_fn(samples, prompts=["b", "b", "b"], outputs=["ca", "dca", "x"]) == [1.0, 0.5, 0.0]
    assert task.metric_fn(samples) == {"optimality": [1.0, 0.5, 0.0]}
    assert task.prompts == ["b", "d", "e"]


def _naive_shortest(adj: np.ndarray, start: int, goal: int = 0):
    """Independent check: grow the set reachable in k steps until the goal appears."""
    frontier = {start}
    for steps in range(adj.shape[0] + 1):
        if goal in frontier:
            return steps + 1
        frontier = {j for i in frontier for j in range(adj.shape[0]) if adj[i, j]} | frontier
    return None


def _naive_optimality(path: str, adj: np.ndarray, max_len: int) -> float:
    nodes = [ord(c) - 97 for c in path]
    if any(not 0 <= n < adj.shape[0] for n in nodes) or 0 not in nodes:
        return 0.0
    upto = nodes[: nodes.index(0) + 1]
    if any(not adj[a, b] for a, b in zip(upto, upto[1:])):
        return 0.0
    opt = min(_naive_shortest(adj, nodes[0]), max_len)
    return max(0.0, (max_len - len(upto)) / (max_len - opt))


def test_generated_graph_invariants():
    task = generate_random_walks()  # trlX defaults: 21 nodes, max_length 10, 1000 walks, p 0.1, seed 1000
    adj = task.adjacency
    assert adj.shape == (21, 21) and adj.dtype == bool
    assert adj.any(axis=1).all(), "every node needs an outgoing edge"
    assert adj[0].tolist() == [True] + [False] * 20, "the goal's only out-edge is its self-loop"
    assert not np.diag(adj)[1:].any(), "no self-loops besides the goal's"
    assert len(task.walks) == 1000
    for walk in task.walks:
        nodes = [ord(c) - 97 for c in walk]
        assert all(0 <= n < 21 for n in nodes)
        assert nodes[0] != 0 and 2 <= len(nodes) <= 10
        assert all(adj[a, b] for a, b in zip(nodes, nodes[1:])), walk
        assert 0 not in nodes[:-1], "a walk stops at the goal"
        assert nodes[-1] == 0 or len(nodes) == 10
    assert task.prompts == sorted(set(w[0] for w in task.walks))
    assert all(len(p) == 1 for p in task.prompts)
    for start in range(21):
        assert task.shortest[start] == _naive_shortest(adj, start), start


def test_dataset_optimality_matches_naive_and_is_the_training_start():
    task = generate_random_walks()
    scores = task.reward_fn(task.walks)
    assert scores == pytest.approx([_naive_optimality(w, task.adjacency, 10) for w in task.walks])
    mean = float(np.mean(scores))
    # Random walks are far from optimal: this mean is what PPO/ILQL start from (0.317 at seed 1000).
    assert 0.05 < mean < 0.7
    print(f"mean optimality of the dataset's random walks: {mean:.4f}")


def test_seeded_determinism():
    a, b = generate_random_walks(seed=7, n_walks=200), generate_random_walks(seed=7, n_walks=200)
    assert np.array_equal(a.adjacency, b.adjacency) and a.walks == b.walks
    c = generate_random_walks(seed=8, n_walks=200)
    assert not np.array_equal(a.adjacency, c.adjacency) or a.walks != c.walks


def test_small_configurations_and_bad_arguments():
    t = generate_random_walks(n_nodes=4, max_length=4, n_walks=30, p_edge=0.5, seed=0)
    assert t.adjacency.shape == (4, 4) and set("".join(t.walks)) <= set("abcd")
    with pytest.raises(ValueError, match="n_nodes"):
        generate_random_walks(n_nodes=27)
    with pytest.raises(ValueError, match="max_length"):
        generate_random_walks(max_length=1)
