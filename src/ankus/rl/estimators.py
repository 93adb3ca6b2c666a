"""Critic-free advantage estimators from k sampled responses per prompt.

Layout: ``scores`` is either (P, k) — row p holds the k samples of prompt p — or flat
(B,) with B = P·k in prompt-major order (the k samples of a prompt are consecutive, as
``prompts.repeat_interleave(k)`` produces). The output has the shape of the input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(scores: Tensor, k: int | None) -> Tensor:
    """(P, k) or flat (B,) -> (P, k) view."""
    if scores.dim() == 2:
        if k is not None and k != scores.shape[1]:
            raise ValueError(f"k={k} but scores has {scores.shape[1]} samples per prompt")
        return scores
    if scores.dim() != 1 or k is None:
        raise ValueError("scores must be (P, k), or flat (B,) together with k")
    if scores.numel() % k != 0:
        raise ValueError(f"{scores.numel()} scores are not a multiple of k={k}")
    return scores.view(-1, k)


def rloo_advantages(scores: Tensor, k: int | None = None) -> Tensor:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024):

        A_i = s_i − 1/(k−1)·Σ_{j≠i} s_j  =  k/(k−1)·(s_i − mean(s))

    The baseline for each sample excludes that sample, so it stays unbiased. Needs k ≥ 2.
    """
    g = _grouped(scores, k)  # (P, k)
    kk = g.shape[1]
    if kk < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    baseline = (g.sum(dim=1, keepdim=True) - g) / (kk - 1)  # (P, k) mean of the others
    return (g - baseline).view_as(scores)


def grpo_advantages(
    scores: Tensor, k: int | None = None, eps: float = 1e-4, scale: bool = True, unbiased: bool = True
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024 "DeepSeekMath", §4.1.2):

        A_i = (s_i − mean(s)) / (std(s) + eps)      over the k samples of one prompt

    The paper writes std(r) without saying which; we default to the sample
    (Bessel-corrected) std, as ``torch.std`` and TRL's GRPOTrainer use (eps 1e-4 is
    TRL's too). ``unbiased=False`` gives the population std. ``scale=False`` only
    centres (the "Dr. GRPO" variant of Liu et al., 2025, which drops the std division).
    A group whose scores are all equal gets advantage 0.
    """
    g = _grouped(scores, k)  # (P, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        std = g.std(dim=1, keepdim=True, unbiased=unbiased) if g.shape[1] > 1 else g.new_zeros(g.shape[0], 1)
        centred = centred / (std + eps)
    return centred.view_as(scores)


def sequence_to_token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every response token its sequence's advantage: (B,), (B, T) -> (B, T), 0 on padding."""
    return torch.where(mask.bool(), advantages[:, None], 0)  # (B, 1) broadcast to (B, T)
