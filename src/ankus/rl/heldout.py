"""Held-out evaluation of a policy before and after RL training: k scored samples per held-out
prompt with the same seed both times (common random numbers), their standard errors over
prompts, a paired difference, and a before/after table (printed and saved as CSV)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from ankus.data.prompts import load_prompts
from ankus.generation.engine import GenerationConfig, generate
from ankus.rl.rollouts import call_reward, scalar

__all__ = ["train_and_eval_prompts", "evaluate", "eval_summary", "write_eval"]


def train_and_eval_prompts(prompts: str, eval_prompts: str = "", num_eval: int = 20,
                           walks_seed: int = 1000) -> tuple[list[str], list[str]]:
    """Training prompts and the first ``num_eval`` held-out prompts (``ankus.data.prompts`` forms).
    Without ``eval_prompts``: the built-in set's eval split for review_openings, else the training
    prompts themselves (tasks like randomwalks evaluate on their few start nodes)."""
    train = load_prompts(prompts, "train", walks_seed=walks_seed)
    if eval_prompts:
        return train, load_prompts(eval_prompts, "eval", walks_seed=walks_seed)[:num_eval]
    if prompts == "review_openings":
        from ankus.data.assets import review_openings

        return train, review_openings("eval")[:num_eval]
    return train, train[:num_eval]


@torch.no_grad()
def evaluate(model, tok, prompts: list[str], gen_cfg: GenerationConfig, reward_fn: Callable, seed: int, *,
             template: str = "{prompt}", samples: int = 1, batch_size: int = 16) -> list[dict]:
    """``samples`` scored responses per held-out prompt -> one row per response, a prompt's
    samples side by side (``sample`` 0..k-1). The same ``seed`` before and after training
    (common random numbers: the before/after difference is less noisy than either score)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p for p in prompts for _ in range(samples)]
    templated = [template.format(prompt=p) for p in prompts]
    out = generate(model, tok, templated, gen_cfg, generator=gen, batch_size=batch_size)
    scores = call_reward(reward_fn, templated, out.texts, batch="eval")
    return [{"prompt": p, "sample": i % samples, "output": o, "score": scalar(s)}
            for i, (p, o, s) in enumerate(zip(prompts, out.texts, scores))]


def eval_summary(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Mean held-out score before and after, their standard errors and the paired difference's.

    A prompt's ``eval_samples`` responses are not independent draws of the held-out mean, so each
    prompt's mean score is one observation: s.e. = std over prompts / sqrt(prompts). The
    difference is paired by prompt (after − before per prompt), which removes the prompts' own
    spread from its error."""
    def per_prompt(rows: list[dict]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r["prompt"], []).append(r["score"])
        return {p: sum(v) / len(v) for p, v in groups.items()}

    def mean_se(xs: list[float]) -> tuple[float, float]:
        n = len(xs)
        mean = sum(xs) / max(n, 1)
        var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
        return mean, math.sqrt(var / n) if n > 1 else float("nan")

    b, a = per_prompt(before), per_prompt(after)
    mb, seb = mean_se(list(b.values()))
    ma, sea = mean_se(list(a.values()))
    diff, sed = mean_se([a[p] - b[p] for p in b if p in a])
    return {"score_before": mb, "score_after": ma, "se_before": seb, "se_after": sea, "diff": diff, "se_diff": sed,
            "eval_prompts": len(b), "eval_samples": len(before) // max(len(b), 1)}


def write_eval(run_dir: Path, before: list[dict], after: list[dict]) -> dict[str, Any]:
    """A before/after table of held-out samples and scores (printed, and saved as CSV)."""
    import csv

    with open(run_dir / "eval_before_after.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "sample", "before", "score_before", "after", "score_after"])
        for b, a in zip(before, after):
            w.writerow([b["prompt"], b.get("sample", 0), b["output"], f"{b['score']:.4f}", a["output"],
                        f"{a['score']:.4f}"])
    summary = eval_summary(before, after)

    def short(s: str, n: int = 60) -> str:
        s = " ".join(s.split())
        return s if len(s) <= n else s[: n - 1] + "…"

    print(f"\n{'prompt':32s} | {'before':60s} | score | {'after':60s} | score")
    firsts = [(b, a) for b, a in zip(before, after) if b.get("sample", 0) == 0]  # one sample per prompt
    for b, a in firsts[:10]:
        print(f"{short(b['prompt'], 32):32s} | {short(b['output']):60s} | {b['score']:+.2f} | "
              f"{short(a['output']):60s} | {a['score']:+.2f}")
    s = summary
    print(f"\nmean held-out score: {s['score_before']:+.3f} -> {s['score_after']:+.3f}   "
          f"({s['eval_prompts']} prompts x {s['eval_samples']} samples; s.e. {s['se_before']:.3f} -> "
          f"{s['se_after']:.3f}; change {s['diff']:+.3f} +- {s['se_diff']:.3f} paired s.e.)   run: {run_dir}")
    return summary
