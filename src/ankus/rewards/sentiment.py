"""Sentiment reward: VADER's compound score of each generated continuation, in [-1, 1].

VADER (Hutto & Gilbert, ICWSM 2014) is a lexicon-and-rules scorer: no model download, runs in
microseconds on CPU, so it is the default reward for the positive-review recipe (trlX's
flagship example used a DistilBERT IMDB classifier instead; VADER keeps ankus offline).

    sentiment_reward(samples, prompts, outputs)   # -> [compound(o) for o in outputs]

Only the continuation is scored: the prompt is fixed, so scoring it would just add a constant
per prompt (and a neutral prompt set keeps that constant near 0 anyway).
"""

from __future__ import annotations

import functools

__all__ = ["sentiment_reward", "compound_scores", "sentiment_eval"]


@functools.lru_cache(maxsize=1)
def _analyzer():
    # One analyzer per process: building it parses the ~7,500-word lexicon file.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound_scores(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (0 for empty text)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def sentiment_reward(samples: list[str], prompts: list[str] | None = None,
                     outputs: list[str] | None = None, **metadata) -> list[float]:
    """Reward function (trlX protocol): the compound score of each ``outputs[i]``.

    Falls back to scoring ``samples`` when no ``outputs`` are given (e.g. a caller that only
    has full texts).
    """
    texts = outputs if outputs is not None else samples
    return compound_scores(list(texts))


def sentiment_eval(model, tok, template: str, samples_per_prompt: int, gen, batch_size: int = 64,
                   seed: int = 0) -> dict:
    """Mean VADER compound score of samples (``gen``: an ``ankus.generation.GenerationConfig``)
    on the held-out review openings, each formatted with ``template`` ({prompt} = the opening),
    plus ``_examples``."""
    import torch

    from ankus.data.assets import review_openings
    from ankus.generation import generate

    prompts = [template.format(prompt=p) for p in review_openings("eval") for _ in range(samples_per_prompt)]
    with torch.no_grad():
        texts = generate(model, tok, prompts, gen, generator=torch.Generator().manual_seed(seed),
                         batch_size=batch_size).texts
    scores = compound_scores(texts)
    return {"vader": sum(scores) / len(scores), "_examples": texts[:4]}
