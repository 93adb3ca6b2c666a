"""The shipped data: movie-review openings and pink-elephant (X, Y) pairs."""

import collections
import json

import pytest

from ankus.data.assets import PinkElephantPair, asset_path, pink_elephant_pairs, review_openings
from ankus.rewards.mentions import mentions, normalize
from ankus.rewards.sentiment import compound_scores


# ---------------------------------------------------------------- review openings
def test_review_openings_counts_and_disjoint_splits():
    train, held_out = review_openings("train"), review_openings("eval")
    assert len(train) >= 100 and len(held_out) >= 20
    assert len(train) + len(held_out) >= 130
    everything = train + held_out
    assert len(set(everything)) == len(everything), "duplicate openings"
    assert not set(train) & set(held_out)


def test_review_openings_are_openings_and_neutral():
    texts = review_openings("train") + review_openings("eval")
    for t in texts:
        assert t == t.strip() and 1 <= len(t.split()) <= 12, t
        assert not t.endswith("."), f"an opening, not a sentence: {t!r}"
    scores = compound_scores(texts)
    assert max(abs(s) for s in scores) <= 0.15, max(zip(map(abs, scores), texts))
    assert sum(s != 0 for s in scores) <= 5  # nearly all exactly neutral for VADER
    # Varied: no single first word dominates (many begin with "The", but not most).
    first = collections.Counter(t.split()[0] for t in texts)
    assert first.most_common(1)[0][1] < 0.6 * len(texts)


def test_review_openings_split_is_stored_in_the_file():
    rows = [json.loads(line) for line in asset_path("review_openings.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}
    assert [r["text"] for r in rows if r["split"] == "eval"] == review_openings("eval")


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        review_openings("test")
    with pytest.raises(ValueError, match="split"):
        review_openings(None)
    with pytest.raises(ValueError, match="split"):
        pink_elephant_pairs("validation")


# ---------------------------------------------------------------- pink elephants
PAIRS = pink_elephant_pairs()


def test_pair_counts_domains_and_split():
    assert len(PAIRS) >= 300
    domains = collections.Counter(p.domain for p in PAIRS)
    assert len(domains) >= 15 and min(domains.values()) >= 10
    held_out = pink_elephant_pairs("eval")
    train = pink_elephant_pairs("train")
    assert len(held_out) + len(train) == len(PAIRS)
    assert 0.10 <= len(held_out) / len(PAIRS) <= 0.20
    eval_domains = {p.domain for p in held_out}
    assert eval_domains == set(domains), f"no eval pairs in {set(domains) - eval_domains}"
    assert all(isinstance(p, PinkElephantPair) for p in PAIRS)


def test_no_duplicate_pairs_and_x_differs_from_y():
    seen = set()
    for p in PAIRS:
        assert normalize(p.x).lower() != normalize(p.y).lower(), p
        key = frozenset((p.x.lower(), p.y.lower()))
        assert key not in seen, f"duplicate pair (either order): {p.x} / {p.y}"
        seen.add(key)


def test_names_properties():
    p = next(p for p in PAIRS if p.x == "New York City")
    assert p.x_names[0] == "New York City" and "NYC" in p.x_names
    assert p.y_names[0] == p.y


def test_each_entity_has_one_alias_list_everywhere():
    aliases = {}
    for p in PAIRS:
        for name, al in ((p.x, p.x_aliases), (p.y, p.y_aliases)):
            assert aliases.setdefault(name, al) == al, f"{name} has different aliases in different pairs"


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p.x}|{p.y}")
def test_every_name_is_detected_and_never_confused_with_the_other_side(pair):
    for names, other in ((pair.x_names, pair.y_names), (pair.y_names, pair.x_names)):
        for alias in names:
            assert mentions(f"I love {alias}.", names), alias
            assert mentions(f"{alias}", names), alias
            assert not mentions(f"I love {alias}.", other), f"{alias!r} matches the other side {other}"


# Aliases/names deliberately kept out of the data: ordinary English words (or letters) that
# would turn ordinary text into a "mention" under case-insensitive matching.
COMMON_WORDS = {
    "apple", "amazon", "delta", "united", "spirit", "frontier", "american", "southwest", "alaska",
    "max", "edge", "safari", "opera", "brave", "x", "threads", "line", "signal", "slack", "discord",
    "subway", "target", "shell", "gap", "coach", "corona", "mercury", "dodge", "ram", "mini", "genesis",
    "queen", "oasis", "blur", "nirvana", "risk", "clue", "sorry", "pandemic", "monopoly", "go", "c", "r",
    "us", "it", "la", "dc", "caddy", "draughts", "flapjack", "audible", "tidal", "wingspan", "emirates",
    "cowboys", "bears", "giants", "eagles", "jets", "heat", "kings", "bulls", "warriors", "cubs",
    "cardinals", "switch", "pixel", "galaxy", "prime", "monster", "oracle", "snowflake", "windows",
    "indigo", "sonic", "duke", "brown", "columbia", "arsenal", "the", "one", "plus",
}


def test_no_name_or_alias_is_a_common_word():
    for p in PAIRS:
        for name in p.x_names + p.y_names:
            assert normalize(name).lower() not in COMMON_WORDS, f"{name!r} ({p.domain})"
            assert len(name) >= 2, name
