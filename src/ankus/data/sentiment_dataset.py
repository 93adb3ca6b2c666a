"""The offline sentiment dataset of the ``ilql_sentiment`` recipe: samples of a model on review
openings, each scored by VADER (trlX's ``ilql_sentiments`` trains on IMDB reviews labelled by a
classifier; here the samples come from the model itself, so the set is offline but on-policy for
the base model).

Cost: 137 openings x 4 samples x 40 tokens = 22k generated tokens, ~2.5 min at ~150 tok/s
(SmolLM2 at batch 16 on an idle 2-core CPU, an estimate); measured: 17 min at 20 tok/s on a
heavily shared 2-core machine.

    build_sentiment_dataset("runs/datasets/sentiment_offline.jsonl")   # 548 rows of <= 40 tokens
    ankus make-sentiment-dataset --out runs/datasets/sentiment_offline.jsonl

Each JSONL row is ``{"prompt": opening, "completion": text, "reward": vader_compound}``. The
prompt is the *raw* opening: the trainer applies the same ``template`` (and chat template) when
it tokenizes, so :data:`DEFAULT_TEMPLATE` here and ``data.template`` in the recipe must agree.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_TEMPLATE", "build_sentiment_dataset", "cmd_make_sentiment_dataset"]

DEFAULT_TEMPLATE = 'Continue this movie review in two sentences: "{prompt}"'
"""The instruction the samples answer (the PPO sentiment recipe's)."""


def build_sentiment_dataset(out: str | Path, *, model: str = "smollm2-135m-instruct", split: str = "train",
                            samples_per_prompt: int = 4, max_new_tokens: int = 40,
                            template: str = DEFAULT_TEMPLATE, chat_template: bool | None = None,
                            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                            batch_size: int = 16, num_prompts: int = 0) -> dict[str, Any]:
    """Sample ``samples_per_prompt`` continuations of each review opening of ``split``, score each
    with VADER, and write the JSONL to ``out`` (atomically). ``num_prompts`` > 0 keeps only the
    first that many openings. Returns stats: rows, mean/min/max reward, seconds, tokens/s."""
    import torch

    from ankus.data.assets import review_openings
    from ankus.data.io import write_jsonl
    from ankus.generation.engine import GenerationConfig, generate
    from ankus.models.loading import load_model
    from ankus.rewards.sentiment import compound_scores

    openings = review_openings(split)
    if num_prompts:
        openings = openings[:num_prompts]
    lm, tok = load_model(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              chat_template=chat_template)
    raw = [p for p in openings for _ in range(samples_per_prompt)]
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    result = generate(lm, tok, [template.format(prompt=p) for p in raw], config, generator=gen,
                      batch_size=batch_size)
    seconds = time.perf_counter() - t0
    rewards = compound_scores(result.texts)
    rows = [{"prompt": p, "completion": c, "reward": r} for p, c, r in zip(raw, result.texts, rewards)]
    out = write_jsonl(out, rows)
    n_tokens = int(result.response_mask.sum())
    return {"path": str(out), "rows": len(rows), "reward_mean": sum(rewards) / len(rewards),
            "reward_min": min(rewards), "reward_max": max(rewards), "seconds": seconds,
            "tokens_per_s": n_tokens / max(seconds, 1e-9)}


def cmd_make_sentiment_dataset(args) -> int:
    """CLI entry: ``ankus make-sentiment-dataset --out PATH [...]``."""
    stats = build_sentiment_dataset(args.out, model=args.model, samples_per_prompt=args.samples_per_prompt,
                                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    seed=args.seed, batch_size=args.batch_size, num_prompts=args.num_prompts)
    print(f"wrote {stats['rows']} samples to {stats['path']}: mean VADER {stats['reward_mean']:+.3f} "
          f"(min {stats['reward_min']:+.2f}, max {stats['reward_max']:+.2f}), "
          f"{stats['seconds']:.0f} s at {stats['tokens_per_s']:.0f} tok/s")
    return 0
