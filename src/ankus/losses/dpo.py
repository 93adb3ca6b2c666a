"""Direct Preference Optimization (DPO) and Identity Preference Optimization (IPO).

Pure functions: no model, no trainer state. The caller runs one forward pass over
chosen and rejected sequences (policy and reference), turns logits into per-sequence
log-probabilities with :func:`sequence_logps`, and hands the four vectors to
:func:`dpo_loss`.

References
----------
* Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model", eq. 7:
  ``L = -log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])``.
* Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (IPO), sampled loss ``(h − 1/(2τ))²`` with ``h`` the same
  log-ratio difference as in DPO and ``τ`` (here ``beta``) the regularisation strength.
* Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO): with
  ``label_smoothing = ε`` the sigmoid loss becomes
  ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``.

Normalisation of log-probs for IPO
----------------------------------
``dpo_loss`` does not normalise: it uses whatever log-probs it is given. Azar et al.
write ``h`` with sequence log-likelihoods (sums over tokens); TRL's IPO
implementation instead uses the *average* log-prob per completion token, which keeps
``h`` on the same scale as the target ``1/(2β)`` whatever the completion length.
ankus follows TRL's choice by default in its trainer: call
``sequence_logps(..., average=True)`` for IPO and ``average=False`` (sums) for the
sigmoid loss. Either normalisation is accepted here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sequence_logps", "dpo_loss", "dpo_sigmoid_losses", "ipo_losses"]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs of ``labels`` over masked positions.

    Convention: **no shift here**. ``logits[:, t]`` is the distribution the model
    assigns to ``labels[:, t]``; a causal-LM caller passes ``logits[:, :-1]`` with
    ``labels = input_ids[:, 1:]`` and ``mask = completion_mask[:, 1:]``.

    Args:
        logits: (B, T, V) unnormalised scores.
        labels: (B, T) token ids; any value (e.g. -100) is allowed where ``mask`` is 0.
        mask: (B, T) 1 for tokens that count (completion tokens), 0 elsewhere.
        average: divide by the number of masked tokens (per sequence) instead of summing.

    Returns:
        (B,) log-probabilities (float32 or the logits' dtype if wider).
    """
    mask = mask.to(torch.bool)  # (B, T)
    # Masked positions may hold ignore_index (-100); gather needs a valid index there.
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))  # (B, T)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # log p(label) = logit[label] − logsumexp(logits): avoids materialising a second
    # (B, T, V) log_softmax tensor.
    label_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_logps = label_logits - torch.logsumexp(logits, dim=-1)  # (B, T)
    token_logps = token_logps * mask  # (B, T)
    logps = token_logps.sum(-1)  # (B,)
    if average:
        logps = logps / mask.sum(-1).clamp(min=1)
    return logps


def dpo_sigmoid_losses(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss −log σ(β·h) (Rafailov et al. 2023 eq. 7), optionally label-smoothed.

    Args:
        h: (B,) log-ratio difference (logπ_c − logπ_ref_c) − (logπ_r − logπ_ref_r).
    Returns:
        (B,) losses.
    """
    # logsigmoid is the numerically stable form of log(1/(1+exp(-x))).
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_losses(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss (h − 1/(2β))² (Azar et al. 2023, sampled IPO; β plays the role of τ).

    Args:
        h: (B,) log-ratio difference, as in :func:`dpo_sigmoid_losses`.
    Returns:
        (B,) losses.
    """
    return (h - 1.0 / (2.0 * beta)) ** 2


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO (``loss_type="sigmoid"``) or IPO (``loss_type="ipo"``) loss over a batch.

    Args:
        chosen_logps, rejected_logps: (B,) policy log-probs of the preferred / dispreferred
            completions (see module docstring for sum vs. average).
        ref_chosen_logps, ref_rejected_logps: (B,) same under the frozen reference model;
            they receive no gradient.
        beta: DPO's β (KL strength); for IPO, Azar et al.'s τ.
        loss_type: "sigmoid" or "ipo".
        label_smoothing: ε of conservative DPO, sigmoid only.

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars ``rewards/chosen``,
        ``rewards/rejected`` (means of the implicit rewards β·(logπ − logπ_ref)),
        ``rewards/margins`` (mean chosen − rejected), ``rewards/accuracy`` (fraction of
        pairs with chosen reward > rejected reward).
    """
    ref_chosen_logps = ref_chosen_logps.detach()
    ref_rejected_logps = ref_rejected_logps.detach()
    chosen_logratios = chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = dpo_sigmoid_losses(h, beta, label_smoothing)
    elif loss_type == "ipo":
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing is defined for the sigmoid loss only")
        losses = ipo_losses(h, beta)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")

    # Implicit rewards of the DPO paper: r(x, y) = β·log(π(y|x)/π_ref(y|x)).
    chosen_rewards = (beta * chosen_logratios).detach()  # (B,)
    rejected_rewards = (beta * rejected_logratios).detach()  # (B,)
    stats = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), stats
