"""Generalised Advantage Estimation over response tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al., 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation") per token, computed backwards in time:

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}
        returns_t = A_t + V_t          (the value-function target)

    rewards, values, mask: (B, T) over the response tokens; mask is 1 on real tokens.
    Responses are right-padded to a common length T. Each response ends at its last
    masked token: V and A after it are 0 (the episode is over, nothing to bootstrap),
    so a short response never sees the padding's values or rewards. Any contiguous
    block of 1s works (left padding too); a hole inside a row is treated as an episode
    end. Returns (advantages, returns), both (B, T) and 0 at padded positions; the
    caller whitens advantages (``masked_whiten``) if it wants to.

    Inputs should be detached (rollout-time values): the loop would otherwise build a
    T-step autograd graph.
    """
    keep = mask.bool()  # (B, T)
    m = keep.to(values.dtype)
    # Zero the padding (where, so inf/NaN there cannot leak) so V_{t+1} past the end is 0.
    values = torch.where(keep, values, 0)
    rewards = torch.where(keep, rewards, 0)
    B, T = values.shape
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = values.new_zeros(B)  # V_{T} = 0 past the window
    next_adv = values.new_zeros(B)  # A_{T} = 0
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        # Multiplying by m_t zeroes A on padding, which is what resets the recursion
        # at each response's end when the loop walks back into it.
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * m
    return advantages, returns
