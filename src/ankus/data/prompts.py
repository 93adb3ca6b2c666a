"""Prompt sets for the RL trainers and evaluations: built-in names or a file of prompts."""

from __future__ import annotations

from pathlib import Path

from ankus.data.io import DataError

__all__ = ["load_prompts", "BUILTIN_PROMPTS"]

BUILTIN_PROMPTS = ("review_openings", "randomwalks")


def load_prompts(source: str, split: str = "train", *, walks_seed: int = 1000) -> list[str]:
    """Prompts from a built-in set or a file.

    ``review_openings`` (its ``split``: train or eval), ``randomwalks`` (the start nodes of the
    random-walks task built with ``walks_seed``), a ``.jsonl`` file of ``{"prompt": ...}`` rows,
    or any other text file with one prompt per non-empty line.
    """
    if source == "review_openings":
        from ankus.data.assets import review_openings

        return review_openings(split)
    if source == "randomwalks":
        from ankus.rewards.randomwalks import generate_random_walks

        return list(generate_random_walks(seed=walks_seed).prompts)
    path = Path(source)
    if not path.exists():
        raise DataError(f"prompt file not found: {source} (or use a built-in: {', '.join(BUILTIN_PROMPTS)})")
    if path.suffix == ".jsonl":
        from ankus.data.io import read_jsonl

        return [row["prompt"] for row in read_jsonl(path, required=("prompt",))]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
