"""Reward registry, reward-value checks, the VADER sentiment reward and the mention detector."""

import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from ankus.rewards import REWARD_FNS, RewardError, check_rewards, get_reward_fn
from ankus.rewards.mentions import find_mentions, mention_rate, mentions
from ankus.rewards.sentiment import sentiment_reward


# ---------------------------------------------------------------- registry
def test_builtin_names_resolve():
    assert set(REWARD_FNS) == {"sentiment", "randomwalks"}
    assert get_reward_fn("sentiment") is sentiment_reward
    rw = get_reward_fn("randomwalks", seed=3, n_walks=20)
    assert callable(rw)
    assert rw(samples=["a"], prompts=["a"], outputs=[""]) == [1.0]  # the goal itself is a shortest path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_scoring.py").write_text(textwrap.dedent("""
        LIMIT = 3
        def length_reward(samples, prompts, outputs, scale=1.0, **metadata):
            return [scale * len(o) for o in outputs]
        class Holder:
            @staticmethod
            def const(samples, **kw):
                return [0.5] * len(samples)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scoring"
    sys.modules.pop("my_scoring", None)


def test_module_path_resolves_and_binds_kwargs(user_module):
    fn = get_reward_fn(f"{user_module}:length_reward")
    assert fn(["ab", "cde"], ["", ""], ["ab", "cde"]) == [2, 3]
    scaled = get_reward_fn(f"{user_module}:length_reward", scale=0.5)
    assert scaled(["ab"], [""], ["ab"]) == [1.0]
    assert get_reward_fn(f"{user_module}:Holder.const")(["x", "y"]) == [0.5, 0.5]


@pytest.mark.parametrize("spec, needle", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    ("no_such_pkg.scoring:fn", "cannot import module 'no_such_pkg.scoring'"),
    ("my_scoring:missing", "has no attribute 'missing'"),
    ("my_scoring:LIMIT", "'LIMIT' is a int, not callable"),
    ("my_scoring:", "expected 'package.module:function'"),
    ("", "expected a name"),
])
def test_resolution_errors_are_clear(user_module, spec, needle):
    with pytest.raises(RewardError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        get_reward_fn(spec)


def test_sentiment_takes_no_options():
    with pytest.raises(RewardError, match="no options"):
        get_reward_fn("sentiment", model="x")


# ---------------------------------------------------------------- check_rewards
def test_check_rewards_accepts_and_normalises():
    assert check_rewards([1, 0.5, -2.0], 3, 0) == [1.0, 0.5, -2.0]
    assert check_rewards(np.array([0.25, 0.75], dtype=np.float32), 2, 0) == [0.25, 0.75]
    out = check_rewards(torch.tensor([1.5, -1.0]), 2, 0)
    assert out == [1.5, -1.0] and all(type(v) is float for v in out)
    dense = check_rewards([[0.0, 1.0], (2,), []], 3, 0)  # an empty output may have no tokens
    assert dense == [[0.0, 1.0], [2.0], []]
    assert check_rewards([np.float64(0.5)], 1, 0) == [0.5]
    assert check_rewards([], 0, 0) == []


@pytest.mark.parametrize("scores, needles", [
    ([1.0, float("nan"), 2.0], ["batch 4", "index 1", "nan", "not finite"]),
    ([1.0, 2.0, float("-inf")], ["batch 4", "index 2", "-inf"]),
    ([1.0, 2.0], ["batch 4", "expected 3 scores", "got 2"]),
    ([1.0, 2.0, 3.0, 4.0], ["expected 3 scores", "got 4"]),
    ([1.0, "0.5", 2.0], ["batch 4", "index 1", "str", "'0.5'"]),
    ([1.0, None, 2.0], ["index 1", "NoneType"]),
    ([True, 1.0, 2.0], ["index 0", "bool"]),
    ([[1.0], 2.0, [3.0]], ["index 1", "expected a list of floats"]),
    ([1.0, [2.0], 3.0], ["index 1", "expected a float"]),
    ([[1.0], [2.0, float("nan")], [3.0]], ["index 1", "token 1", "nan"]),
    ("1.0", ["batch 4", "expected a list of 3 scores", "str"]),
    (None, ["batch 4", "NoneType"]),
])
def test_check_rewards_rejects(scores, needles):
    with pytest.raises(RewardError) as info:
        check_rewards(scores, 3, batch_index=4)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# ---------------------------------------------------------------- sentiment
def _vader(valence_sum: float) -> float:
    # VADER's normalisation: x / sqrt(x^2 + alpha) with alpha = 15, rounded to 4 places.
    return round(valence_sum / math.sqrt(valence_sum ** 2 + 15), 4)


def test_sentiment_scores_outputs_not_prompts():
    # Lexicon valences: "good" 1.9, "terrible" -2.1 (vader_lexicon.txt).
    samples = ["This was terrible. good", "Plain prompt."]
    prompts = ["This was terrible. ", "Plain prompt."]
    outputs = ["good", ""]
    scores = sentiment_reward(samples, prompts, outputs)
    assert scores == pytest.approx([_vader(1.9), 0.0], abs=1e-4)
    assert scores[0] == pytest.approx(0.4404, abs=1e-4)
    assert sentiment_reward(["x"], ["x"], ["terrible"]) == pytest.approx([_vader(-2.1)], abs=1e-4)
    assert all(-1.0 <= s <= 1.0 for s in sentiment_reward(["a"] * 3, ["a"] * 3,
                                                          ["best best best!!!", "worst awful horrible", "a table"]))
    # Without outputs the full samples are scored.
    assert sentiment_reward(["good"]) == pytest.approx([0.4404], abs=1e-4)


def test_sentiment_analyzer_is_cached():
    from ankus.rewards import sentiment

    assert sentiment._analyzer() is sentiment._analyzer()


# ---------------------------------------------------------------- mentions
NYC = ["New York City", "NYC", "New York", "the Big Apple"]


@pytest.mark.parametrize("text, names, expected", [
    ("We moved to NYC last spring.", NYC, True),
    ("we moved to nyc", NYC, True),                       # case-insensitive
    ("Greetings from the big apple!", NYC, True),
    ("An apple a day.", NYC, False),
    ("A new yorker cartoon", NYC, False),                 # "New York" must end at a boundary
    ("I bought new Nikes yesterday.", ["Nike"], True),    # plural counts (documented decision)
    ("Nike's new logo", ["Nike"], True),                  # possessive
    ("Nike\u2019s new logo", ["Nike"], True),             # curly apostrophe
    ("Nikeland is a game", ["Nike"], False),
    ("anti-Nike protests", ["Nike"], True),               # hyphen is a boundary
    ("I write JavaScript daily.", ["Java"], False),
    ("I write Java daily.", ["Java"], True),
    ("I like C++.", ["C++"], True),
    ("Templates in c++ are hard", ["C++"], True),
    ("I like C++.", ["C"], False),                        # "C" never matches inside "C++" or "C#"
    ("Unity uses C#", ["C"], False),
    ("Unity uses C#, not C++.", ["C#"], True),
    ("I got a C on the exam.", ["C"], True),              # the documented ambiguity of one-letter names
    ("We landed in St. Louis at noon.", ["St. Louis"], True),
    ("We landed in St Louis at noon.", ["St. Louis"], False),   # literal dot; give "St Louis" as an alias
    ("We landed in St Louis at noon.", ["St. Louis", "St Louis"], True),
    ("A Coca Cola, please", ["Coca-Cola"], True),         # space/hyphen interchangeable
    ("Rolls Royce and Bentley", ["Rolls-Royce"], True),
    ("Catching Pokemon", ["Pokémon"], True),               # accents stripped on both sides
    ("Beyoncé sang", ["Beyonce"], True),
    ("Disney+ has it", ["Disney+"], True),
    ("Disney has it", ["Disney+"], False),
    ("Dinner at P.F. Chang's tonight", ["P.F. Chang's"], True),
    ("the text mentions nothing", ["Nike", "Adidas"], False),
])
def test_mentions(text, names, expected):
    assert mentions(text, names) is expected


def test_mentions_accepts_a_single_name_and_rejects_no_names():
    assert mentions("I love Nike", "Nike")
    with pytest.raises(ValueError):
        mentions("text", [])
    with pytest.raises(ValueError):
        mentions("text", ["", "  "])


def test_find_mentions_reports_names_in_order():
    text = "NYC is not the Big Apple, or is New York City?"
    assert find_mentions(text, NYC) == ["NYC", "the Big Apple", "New York City"]
    assert find_mentions("nothing here", NYC) == []


def test_mention_rate_hand_counted():
    texts = ["I love NYC", "Chicago is windy", "Nike's shoes", "Adidas only"]
    names = [NYC, NYC, ["Nike"], ["Nike"]]
    assert mention_rate(texts, names) == 2 / 4
    assert mention_rate(["C++ rocks"], [["C"]]) == 0.0
    with pytest.raises(ValueError, match="2 texts but 1"):
        mention_rate(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        mention_rate([], [])
    with pytest.raises(TypeError):
        mention_rate("a text", [["a"]])


def test_model_reward_spec_points_to_a_reward_model_run(tmp_path):
    from ankus import ModelLoadError
    from ankus.rewards import get_reward_fn

    with pytest.raises(ModelLoadError, match="no trained reward model.*rm_synthetic"):
        get_reward_fn(f"model:{tmp_path}")
