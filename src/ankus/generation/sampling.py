"""Sampling on plain (B, V) score tensors: top-k / top-p filtering, temperature, one draw per
row, and the log-probability of a token under the raw distribution. No logits-processor
objects, no state.

``torch.multinomial`` draws an exponential variate for every vocabulary entry (16 ms a step at
B=16, V=49k on one core); :func:`sample_inverse_cdf` draws one uniform per row against a float64
CDF instead (1 ms), the same distribution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ankus.generation.engine import GenerationConfig


def filter_scores(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then top-p (nucleus, Holtzman et al. 2020) filtering: dropped tokens get -inf.

    scores: (B, V) float. top-k keeps the k highest (ties at the k-th value all kept); top-p keeps,
    in decreasing-probability order, each token whose preceding mass is still below top_p, so the
    kept set is the smallest whose mass reaches top_p (the most likely token always stays).
    """
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_scores, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def sample_tokens(scores: Tensor, config: "GenerationConfig", generator: torch.Generator | None = None) -> Tensor:
    """Next token per row, (B,) long: argmax when greedy, else a draw from
    softmax(filter(scores / temperature))."""
    if not config.do_sample:
        return scores.argmax(dim=-1)
    scores = scores.float()
    if config.temperature != 1.0:
        scores = scores / config.temperature
    scores = filter_scores(scores, config.top_k, config.top_p)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return sample_inverse_cdf(probs, generator)


def sample_inverse_cdf(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of (B, V) probabilities, (B,) long: the first index whose cumulative
    probability exceeds u * total, u ~ U[0, 1). Exact, one random number per row, and ~15x faster
    than ``torch.multinomial`` on CPU at B=16, V=49k (1 ms vs 16 ms). The cumulative sum is in
    float64 so that rounding cannot move the bins of unlikely tokens; a zero-probability token
    adds an empty bin and is never drawn."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    # drawn where the generator lives (a CPU generator can drive CUDA sampling), then moved
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else probs.device).to(probs.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return idx.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def token_logps(logits: Tensor, tokens: Tensor) -> Tensor:
    """(B,) log softmax(logits)[token] under the raw distribution: logit - logsumexp."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
