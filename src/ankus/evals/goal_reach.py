"""Does the model encode the goal of an agent's reach? (after Ruis et al., "Do LLMs selectively
encode the goal of an agent's reach?", a text version of Woodward's 1998 infant study).

A scene: two objects on a table; something goes to object A; the objects swap places; then the
same thing goes again, to ... the continuation is either A (the *object* was the goal: it is
now at the other place) or B (the *location* was the goal: B now stands where A was). Infants
expect the object goal for a purposeful human reach only, not for an inanimate mover or an
accidental touch. So the task has three conditions:

* ``purposeful``: the agent looks at A and picks it up;
* ``inanimate``: a mover (a toy train, a gust of wind) comes to rest against A;
* ``accidental``: the agent stretches and their hand accidentally brushes A;

each told in several paraphrases. Object-goal bias of one scene = log p(" A") - log p(" B"),
averaged over the mirrored scene (B as the first target), which cancels the two nouns' own
frequencies. Reported per condition: the mean bias with its standard error over items, the
fraction of items with a positive bias, the mean bias under each paraphrase, their spread, and
how often an item's bias keeps its sign over all paraphrases. Scenes in
``data/goal_reach.jsonl`` were written for ankus.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from ankus.evals.common import mean_se
from ankus.evals.lm import EvalLM

__all__ = ["CONDITIONS", "PARAPHRASES", "FIELDS", "scene", "evaluate", "summarize"]

FIELDS = {"id": str, "agent": str, "pronoun": ("she", "he", "they"), "object_a": str, "object_b": str,
          "place_a": str, "place_b": str, "thing": str}

# (first event with {x}: the first target, second event ending right before the target's name)
CONDITIONS: dict[str, tuple[str, str]] = {
    "purposeful": ("{Agent} looks at the {x}, reaches for it, picks it up and puts it back.",
                   "{Agent} reaches out again and picks up the"),
    "inanimate": ("The {thing} moves across the table and comes to rest against the {x}.",
                  "The {thing} moves across the table again and comes to rest against the"),
    "accidental": ("{Agent} stretches {poss} arms, and {poss} hand accidentally brushes against the {x}.",
                   "{Agent} stretches again, and {poss} hand accidentally brushes against the"),
}

# Scenes with {x} at {px} and {y} at {py}; {e1} and {e2} are the condition's events.
PARAPHRASES: list[str] = [
    "On a table, the {x} is on the {px} and the {y} is on the {py}. {e1} Then someone swaps them, so the {x} "
    "is now on the {py} and the {y} is on the {px}. {e2}",
    "There are two things on the table: the {x} on the {px} and the {y} on the {py}. {e1} Afterwards the two "
    "are switched: the {y} now sits on the {px}, and the {x} on the {py}. {e2}",
    "Picture a table with the {x} on the {px} and the {y} on the {py}. {e1} Next, the places of the {x} and "
    "the {y} are exchanged. {e2}",
]

_POSS = {"she": "her", "he": "his", "they": "their"}


def scene(item: dict, condition: str, paraphrase: int, mirrored: bool = False) -> tuple[str, str, str]:
    """(context, object-goal continuation, location-goal continuation). Mirrored: B is the first
    target (and so the object goal), A the location goal."""
    x, y = (item["object_b"], item["object_a"]) if mirrored else (item["object_a"], item["object_b"])
    px, py = (item["place_b"], item["place_a"]) if mirrored else (item["place_a"], item["place_b"])
    names = {"Agent": item["agent"], "poss": _POSS[item["pronoun"]], "thing": item["thing"], "x": x}
    e1, e2 = (e.format(**names) for e in CONDITIONS[condition])
    text = PARAPHRASES[paraphrase].format(x=x, y=y, px=px, py=py, e1=e1, e2=e2)
    return text, " " + x, " " + y


def evaluate(lm: EvalLM, items: Sequence[dict], conditions: Sequence[str] = tuple(CONDITIONS),
             paraphrases: Sequence[int] | None = None) -> list[dict]:
    """One row per (condition, paraphrase, item): the bias of the scene, of its mirror, and their mean."""
    paraphrases = range(len(PARAPHRASES)) if paraphrases is None else paraphrases
    plan = [(c, p, it) for c in conditions for p in paraphrases for it in items]
    contexts, conts = [], []
    for c, p, it in plan:
        for mirrored in (False, True):
            ctx, obj, loc = scene(it, c, p, mirrored)
            contexts += [ctx, ctx]
            conts += [obj, loc]
    lps = lm.loglikelihood(contexts, conts)
    rows = []
    for n, (c, p, it) in enumerate(plan):
        o1, l1, o2, l2 = lps[4 * n:4 * n + 4]
        rows.append({"condition": c, "paraphrase": p, "id": it["id"], "bias_a": o1 - l1, "bias_b": o2 - l2,
                     "bias": ((o1 - l1) + (o2 - l2)) / 2})
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per condition: mean object-goal bias (nats) and SE over items, the fraction of items
    preferring the object goal, per-paraphrase means, their std, and sign stability."""
    table = []
    for c in dict.fromkeys(r["condition"] for r in rows):
        at = [r for r in rows if r["condition"] == c]
        paras = sorted({r["paraphrase"] for r in at})
        by_item: dict[str, list[float]] = {}
        for r in at:
            by_item.setdefault(r["id"], []).append(r["bias"])
        mean, se = mean_se([sum(v) / len(v) for v in by_item.values()])
        para_means = [statistics.fmean(r["bias"] for r in at if r["paraphrase"] == p) for p in paras]
        stable = [all(b > 0 for b in v) or all(b < 0 for b in v) for v in by_item.values()]
        row = {"condition": c, "object_bias": mean, "se": se,
               "object_pref_rate": sum(sum(v) / len(v) > 0 for v in by_item.values()) / len(by_item),
               "paraphrase_std": statistics.stdev(para_means) if len(para_means) > 1 else 0.0,
               "sign_stable": sum(stable) / len(stable), "n_items": len(by_item), "n_paraphrases": len(paras)}
        row.update({f"bias_p{p}": m for p, m in zip(paras, para_means)})
        table.append(row)
    return table
