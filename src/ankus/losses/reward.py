"""Pairwise reward-model loss (Bradley–Terry)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean of −log σ(r_c − r_r − m) over preference pairs.

    Bradley & Terry 1952 model P(chosen ≻ rejected) = σ(r_c − r_r); its negative
    log-likelihood is the reward-model loss of Ouyang et al. 2022 (InstructGPT, eq. 1).
    The optional ``margin`` m (Touvron et al. 2023, Llama 2 §3.2.2) asks the chosen
    reward to exceed the rejected one by at least about m for pairs rated far apart.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards.
        margin: None, a float, or (B,) per-pair margins.

    Returns:
        ``(loss, stats)`` with detached ``loss/rm``, ``reward/accuracy`` (fraction with
        r_c > r_r, margin ignored), ``reward/chosen``, ``reward/rejected``, ``reward/margin``
        (mean r_c − r_r).
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin  # (B,)
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "loss/rm": loss.detach(),
        "reward/accuracy": (diff > 0).float().mean().detach(),
        "reward/chosen": chosen_rewards.mean().detach(),
        "reward/rejected": rejected_rewards.mean().detach(),
        "reward/margin": diff.mean().detach(),
    }
    return loss, stats
