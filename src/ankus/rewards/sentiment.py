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

__all__ = ["sentiment_reward", "compound_scores"]


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
