"""Per-token KL estimators, the KL-penalised reward and the KL-coefficient controllers.

Direction. Tokens are sampled from the policy π, and r = log π(x) − log π_ref(x) is the
log-ratio at the sampled token. The estimators below (Schulman, "Approximating KL
Divergence", 2020) estimate KL(π ‖ π_ref) = E_{x~π}[r]:

    k1 = r                        unbiased, high variance, can be negative
    k2 = r² / 2                   biased (error O(KL^{3/2}) for close π, π_ref), ≥ 0, low variance
    k3 = (e^{−r} − 1) + r         unbiased (E_π[e^{−r}] = E_π[π_ref/π] = 1), ≥ 0 since e^y ≥ 1 + y

Note: trlX's logged KL uses exp(r) − 1 − r with the same r; that is k3 for the other
direction (it is unbiased for KL(π_ref ‖ π) only under samples from π_ref), so its
numbers are not comparable with ``kl_k3`` here.

Where the KL coefficient β enters, one function per advantage estimator of the PPO trainer:

    gae   per_token_rewards        rewards_t = −β·k1_t (+ the score at the last token)
    rloo  kl_penalised_scores      sequence reward R − β·Σ_t k1_t (Ahmadian et al. 2024)
    grpo  kl_loss                  β·mean_t k3_t added to the loss (Shao et al. 2024)
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import Tensor

from ankus.rl.stats import masked_mean


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log π − log π_ref per token. (B, T) -> (B, T)."""
    return logps - ref_logps


def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = ½·(log π − log π_ref)² per token. (B, T) -> (B, T)."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = exp(−r) − 1 + r with r = log π − log π_ref, per token. (B, T) -> (B, T).

    expm1 keeps precision for small r, where exp(−r) − 1 would cancel.
    """
    r = logps - ref_logps
    return torch.expm1(-r) + r


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def _last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a (B, T) mask -> (B,) long."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def per_token_rewards(
    scores: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: Literal["k1", "k2", "k3"] = "k1",
) -> tuple[Tensor, Tensor]:
    """KL-penalised per-token rewards (Ziegler et al., 2019,
    R = r − β·log(π/π_ref); trlX's per-token layout):

        rewards_t = −β·kl_t                    on every response token
        rewards_T += score                      at the last response token (scalar score)
     or rewards_t += score_t                   position-wise (dense (B, T) score)

    scores: (B,) sequence scores or (B, T) dense scores; logps, ref_logps, mask: (B, T)
    log-probs of the sampled response tokens under the policy and the reference.
    kl_t defaults to k1 = logp − logp_ref (what the reward of Ziegler et al. uses).
    Returns (rewards, kl), both (B, T), 0 on padding. Raises if a row has no response
    token, since its score would otherwise be silently dropped.
    """
    keep = mask.bool()  # (B, T)
    kl = torch.where(keep, KL_ESTIMATORS[estimator](logps, ref_logps), 0)  # (B, T)
    rewards = -kl_coef * kl
    scores = scores.to(rewards.dtype)
    if scores.dim() == 1:
        last = _last_token_index(mask)  # (B,)
        if bool((last < 0).any()):
            raise ValueError("a row of mask has no response token to carry its score")
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None])
    elif scores.shape == rewards.shape:
        rewards = rewards + torch.where(keep, scores, 0)
    else:
        raise ValueError(f"scores must be (B,) or (B, T); got {tuple(scores.shape)} for mask {tuple(mask.shape)}")
    return rewards, kl


def response_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """k1 per response token, 0 on padding. (B, N) x 3 -> (B, N); ``.sum(1)`` is a sequence's KL."""
    return (logps - ref_logps) * mask


def kl_penalised_scores(scores: Tensor, kl: Tensor, kl_coef: float | Tensor) -> Tensor:
    """RLOO's KL-shaped sequence reward R − β·Σ_t kl_t. scores (B,), kl (B, N) -> (B,)."""
    return scores - kl_coef * kl.sum(1)


def kl_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float | Tensor) -> tuple[Tensor, Tensor]:
    """GRPO's KL term: (β·L, L) with L = the mean of k3 over response tokens (scalars).

    logps (B, N) with grad, ref_logps (B, N), mask (B, N). The gradient flows through ``logps``.
    """
    loss = masked_mean(kl_k3(logps, ref_logps), mask)  # ()
    return kl_coef * loss, loss


class FixedKLController:
    """A constant KL coefficient β (trlX's choice when no KL target is set)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op; present so trainers call both controllers the same way."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target``
    (Ziegler et al., 2019,
    "Fine-Tuning Language Models from Human Preferences"):

        e = clip(KL / target − 1, −0.2, 0.2)
        β ← β·(1 + e·n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def kl_controller(init_kl_coef: float, target: float | None = None,
                  horizon: float = 10000) -> FixedKLController | AdaptiveKLController:
    """β's controller: adaptive towards ``target`` when one is given, else fixed at ``init_kl_coef``."""
    return FixedKLController(init_kl_coef) if target is None else AdaptiveKLController(init_kl_coef, target, horizon)
