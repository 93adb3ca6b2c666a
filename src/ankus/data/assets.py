"""Loaders for the data shipped inside the package (``src/ankus/assets/``).

``review_openings.jsonl`` -- 164 openings of movie reviews, the first few words only
("The cinematography in this one"), written for ankus. They are prompts for the
positive-review recipe: neutral on purpose (VADER compound exactly 0 for all but three, and
within [-0.08, 0.11] for those), so that the sentiment of a continuation is the model's doing.
A fixed ``split`` field holds out every sixth line: 137 ``train``, 27 ``eval``.

``pink_elephants.jsonl`` -- 350 (X, Y) pairs over 19 domains for Direct Principle Feedback
("don't mention X, discuss Y instead"), written for ankus (the DPF paper's ~2,500 GPT-4 pairs
are not public). X and Y are real competitors or alternatives in one domain. Each line::

    {"domain": "cities", "x": "New York City", "x_aliases": ["NYC", "New York", "the Big Apple"],
     "y": "Chicago", "y_aliases": ["Chi-Town", "the Windy City"], "split": "train"}

Split: within each domain, pairs sorted by sha256("domain|x|y") and the first
round(0.15 * n) (at least 1) marked ``eval`` -- 57 of 350, three per domain; the field is
stored, so the split never moves.

Alias policy (the mention detector, :mod:`ankus.rewards.mentions`, is case-insensitive and
has no word-sense disambiguation, so an alias that is an ordinary word would flag ordinary
text as a mention):

* No alias is a common English word. Left out on purpose: "Delta"/"United"/"Spirit"/
  "Frontier"/"American" for airlines (full names only), "X" and "Threads" for social
  networks, "Max" for HBO Max, "Switch" for the Nintendo Switch, "Prime" alone, "Caddy"
  (Cadillac), "draughts" (checkers; also British "drafts"), "flapjack" (a UK oat bar),
  team nicknames like "Cowboys", "Bears", "Giants", "Eagles", "Cubs", "Cardinals", "Warriors"
  (full team names only), "Columbia" and "Duke" alone, "LA" (use "L.A."), "DC" (use "D.C.").
* Entities whose canonical name is itself an ordinary word were avoided where the ordinary
  sense is frequent (Apple, Amazon, Subway, Target, Shell, Edge, Safari, Opera, Go, R, C,
  Monopoly, Risk, Clue, Pandemic, Discord, Signal, Slack, Audible, Tidal, Wingspan, Queen,
  Oasis, Nirvana, Emirates -- "United Arab Emirates"). Kept, because the sense in a
  conversation about the domain is clear and rarely otherwise: Python, Ruby, Rust, Swift,
  Dart, Elixir, Julia, Java, Puma, Ford, Tesla, Mercedes, Mastodon, Sprite, Coke, cricket,
  surfing, checkers, Scythe, Azul, Charlotte, Austin, Dallas, Chile, "hockey" (for ice
  hockey; also matches field hockey), "ANA" (All Nippon Airways; also a first name).
* Names inside one pair never match each other (tested): no X alias occurs in a Y name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from ankus.data.io import DataError

__all__ = ["PinkElephantPair", "pink_elephant_pairs", "review_openings", "asset_path"]

Split = Literal["train", "eval"]


def asset_path(name: str):
    """Path (a Traversable) of a shipped asset file, e.g. ``asset_path("pink_elephants.jsonl")``."""
    return resources.files("ankus").joinpath("assets", name)


def _read_rows(name: str) -> list[dict]:
    rows = []
    text = asset_path(name).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"asset {name}, line {lineno}: not valid JSON ({e.msg})") from None
    return rows


def _check_split(split: str | None, allow_none: bool) -> None:
    valid = ("train", "eval")
    if (split is None and not allow_none) or (split is not None and split not in valid):
        raise ValueError(f"split must be one of {valid}{' or None' if allow_none else ''}, got {split!r}")


def review_openings(split: Split = "train") -> list[str]:
    """Neutral movie-review openings (prompts for the positive-review recipe), in file order."""
    _check_split(split, allow_none=False)
    return [r["text"] for r in _read_rows("review_openings.jsonl") if r["split"] == split]


@dataclass(frozen=True)
class PinkElephantPair:
    """One DPF topic: avoid ``x`` (the pink elephant), discuss ``y`` (the grey elephant)."""

    domain: str
    x: str
    y: str
    x_aliases: tuple[str, ...] = field(default=())
    y_aliases: tuple[str, ...] = field(default=())
    split: str = "train"

    @property
    def x_names(self) -> list[str]:
        """Canonical name and aliases of X: what :func:`ankus.rewards.mentions.mentions` takes."""
        return [self.x, *self.x_aliases]

    @property
    def y_names(self) -> list[str]:
        return [self.y, *self.y_aliases]


def pink_elephant_pairs(split: Split | None = None) -> list[PinkElephantPair]:
    """The shipped (X, Y) pairs, in file order (grouped by domain); ``split=None`` gives all."""
    _check_split(split, allow_none=True)
    pairs = [PinkElephantPair(domain=r["domain"], x=r["x"], y=r["y"], x_aliases=tuple(r["x_aliases"]),
                              y_aliases=tuple(r["y_aliases"]), split=r["split"])
             for r in _read_rows("pink_elephants.jsonl")]
    return pairs if split is None else [p for p in pairs if p.split == split]
