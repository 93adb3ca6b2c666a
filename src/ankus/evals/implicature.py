"""Binary conversational implicatures (after Ruis et al. 2023, "The Goldilocks of Pragmatic
Understanding: Fine-Tuning Strategy Matters for Implicature Resolution by LLMs").

Each item is a yes/no question and an indirect answer that implies yes or no without saying it
("Can you lend me twenty dollars?" -- "My wallet got stolen this morning." -> no). The items in
``data/implicature.jsonl`` were written for ankus (168: 156 ``test``, 12 ``shots`` for the k-shot
examples; each question appears twice, once answered each way, so a model that ignores the
answer scores 50%).

The paper's ranking metric: an item is resolved when the prompt completed with the correct word
scores a higher log-likelihood than the same prompt completed with the flipped word. Reported
for each prompt template and each k (examples from the ``shots`` split, the same k examples for
every test item of a template, so the prompt prefix is shared), then per k: the mean over
templates, their spread (std over templates) and the standard error of the mean (over items,
each item's accuracy averaged over templates).
"""

from __future__ import annotations

import random
import statistics
from typing import Sequence

from ankus.evals.common import mean_se, read_task
from ankus.evals.lm import EvalLM

__all__ = ["TEMPLATES", "FIELDS", "load_items", "build_prompt", "evaluate", "summarize"]

FIELDS = {"id": str, "question": str, "answer": str, "implicature": ("yes", "no"), "split": ("test", "shots")}

# Each template: (prompt with {q} and {a}, the words for yes and no as continuations).
TEMPLATES: list[tuple[str, tuple[str, str]]] = [
    ('Esther asked "{q}" and Juan responded "{a}", which means', (" yes", " no")),
    ("Question: {q}\nReply: {a}\nDoes the reply mean yes or no? Answer:", (" yes", " no")),
    ("The following is a short conversation.\nA: {q}\nB: {a}\nBy saying this, B means", (" yes", " no")),
    ('Finish the sentence with yes or no.\nWhen asked "{q}", Sam replied "{a}". Sam\'s answer is', (" yes", " no")),
    ("A: {q}\nB: {a}\nQ: Did B say yes or no?\nA:", (" yes", " no")),
    ('Read the exchange and say whether the reply implies yes or no.\n"{q}" -- "{a}"\nImplied answer:', (" yes", " no")),
]


def load_items(path: str = "implicature.jsonl") -> tuple[list[dict], list[dict]]:
    """(test items, shot items) of a task file."""
    rows = read_task(path, FIELDS)
    return [r for r in rows if r["split"] == "test"], [r for r in rows if r["split"] == "shots"]


def _words(template: int, label: str) -> tuple[str, str]:
    """(correct, flipped) continuation for an item's label under a template."""
    yes, no = TEMPLATES[template][1]
    return (yes, no) if label == "yes" else (no, yes)


def build_prompt(item: dict, template: int, shots: Sequence[dict]) -> str:
    """The k-shot prompt for an item: each shot completed with its correct word, then the item."""
    text, _ = TEMPLATES[template]
    parts = [text.format(q=s["question"], a=s["answer"]) + _words(template, s["implicature"])[0] for s in shots]
    parts.append(text.format(q=item["question"], a=item["answer"]))
    return "\n\n".join(parts)


def _shots(pool: Sequence[dict], k: int, seed: int, template: int) -> list[dict]:
    if k > len(pool):
        raise ValueError(f"k={k} shots asked for, the shots split has {len(pool)}")
    return random.Random(f"{seed}-{template}-{k}").sample(list(pool), k)


def evaluate(lm: EvalLM, items: Sequence[dict], pool: Sequence[dict], templates: Sequence[int],
             ks: Sequence[int], seed: int = 0) -> list[dict]:
    """One row per (k, template, item): both log-likelihoods and whether the correct one is higher."""
    plan = []
    for k in ks:
        for t in templates:
            shots = _shots(pool, k, seed, t)
            for item in items:
                good, bad = _words(t, item["implicature"])
                plan.append((k, t, item, build_prompt(item, t, shots), good, bad))
    contexts = [p[3] for p in plan for _ in range(2)]
    conts = [w for p in plan for w in (p[4], p[5])]
    scores = lm.loglikelihood(contexts, conts)
    rows = []
    for n, (k, t, item, _, _, _) in enumerate(plan):
        lp_good, lp_bad = scores[2 * n], scores[2 * n + 1]
        rows.append({"k": k, "template": t, "id": item["id"], "implicature": item["implicature"],
                     "logp_correct": lp_good, "logp_flipped": lp_bad, "correct": int(lp_good > lp_bad)})
    return rows


def _yes_rate(rows: Sequence[dict]) -> float:
    """Fraction of rows where "yes" out-scored "no" (1 or 0: the model ignores the answer)."""
    return sum((r["logp_correct"] > r["logp_flipped"]) == (r["implicature"] == "yes") for r in rows) / len(rows)


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (k, template): accuracy and its binomial standard error; per k: the mean over
    templates, the std over templates, and the standard error over items. ``prefers_yes``: how
    often "yes" wins whatever the answer (near 0 or 1 with accuracy near 0.5: a fixed answer)."""
    table = []
    for k in sorted({r["k"] for r in rows}):
        at_k = [r for r in rows if r["k"] == k]
        accs = []
        for t in sorted({r["template"] for r in at_k}):
            at_t = [r for r in at_k if r["template"] == t]
            acc = sum(r["correct"] for r in at_t) / len(at_t)
            accs.append(acc)
            table.append({"k": k, "template": str(t), "accuracy": acc, "se": (acc * (1 - acc) / len(at_t)) ** 0.5,
                          "template_std": "", "prefers_yes": _yes_rate(at_t), "n": len(at_t)})
        per_item: dict[str, list[int]] = {}
        for r in at_k:
            per_item.setdefault(r["id"], []).append(r["correct"])
        mean, se = mean_se([sum(v) / len(v) for v in per_item.values()])
        table.append({"k": k, "template": "mean", "accuracy": mean, "se": se,
                      "template_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "prefers_yes": _yes_rate(at_k),
                      "n": len(per_item)})
    return table
