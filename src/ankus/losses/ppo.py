"""PPO losses and the log-prob / entropy helpers they need.

Pure functions; the trainer assembles ``pg_loss + vf_coef·vf_loss`` (and any entropy
bonus). Returned stats are detached 0-d tensors so logging them costs no device sync
until the trainer asks for ``.item()``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ankus.rl.stats import masked_mean

LOGITS_CHUNK_ELEMENTS = 1 << 23
"""Vocabulary-wide logits are made at most this many elements at a time (32 MiB in fp32) where a
whole batch's would be large: :func:`rows_per_chunk`, :func:`head_logprobs`."""


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per position: (B, T, V), (B, T) -> (B, T).

    Computed as logit[label] − logsumexp(logits) so no (B, T, V) log-softmax tensor is
    created and kept for backward (logsumexp saves only its (B, T) result; the logits
    are already held by the model's graph). Half-precision logits are upcast one batch
    row at a time: logsumexp over a 50k vocabulary in bf16 is off by ~1e-2, while
    upcasting the whole tensor would double its memory. The result is fp32 then.
    """
    labels = labels.unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # (T, V), (T, 1)
        row = row_logits.float()
        rows.append(row.gather(-1, row_labels).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution per position: (B, T, V) -> (B, T).

    H = logsumexp(z) − Σ_v softmax(z)_v·z_v   (= −Σ p·log p, without forming log p).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token entropy over the masked (response) positions: (B, T, V), (B, T) -> ()."""
    return masked_mean(token_entropy(logits), mask)


def rows_per_chunk(positions: int, vocab: int, budget: int = LOGITS_CHUNK_ELEMENTS) -> int:
    """Batch rows whose (rows, positions, vocab) logits hold at most ``budget`` elements (at least 1)."""
    return max(1, budget // max(positions * vocab, 1))


def _logprobs_and_entropy(head: nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(b, N, H), (b, N) -> log-probs (b, N), with grad, and next-token entropies (b, N), without."""
    logits = head(hidden)  # (b, N, V)
    with torch.no_grad():
        entropy = token_entropy(logits)
    return logprobs_from_logits(logits, labels), entropy


def head_logprobs(hidden: Tensor, head: nn.Module, labels: Tensor,
                  budget: int = LOGITS_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Log-probs of ``labels`` and next-token entropies under the output head ``head`` applied to
    the final hidden states ``hidden``: (B, N, H), (B, N) -> (B, N), (B, N).

    The same numbers as ``logprobs_from_logits(head(hidden), labels)`` and
    ``token_entropy(head(hidden))``, gradients included (each row's logits are the same products:
    bit for bit for SmolLM2 in fp32 on the CPU, at most float rounding apart elsewhere), without a
    (B, N, V) logits tensor: the head runs on :func:`rows_per_chunk` rows at a time, and where a
    gradient is needed each chunk's logits are recomputed in the backward pass (activation
    checkpointing) instead of kept, which costs one more head matmul. The entropies carry no
    gradient.
    """
    rows = rows_per_chunk(hidden.shape[1], head.weight.shape[0], budget)  # weight: (V, H)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = [checkpoint(_logprobs_and_entropy, head, h, y, use_reentrant=False) if grad
             else _logprobs_and_entropy(head, h, y)
             for h, y in zip(hidden.split(rows), labels.split(rows))]  # (rows, N, H), (rows, N) each
    return torch.cat([lp for lp, _ in parts]), torch.cat([e for _, e in parts])


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al., 2017, eq. 7), as a loss to minimise:

        ρ_t = exp(logp_t − old_logp_t)
        pg_loss = masked_mean( max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)) )

    logps: (B, T) under the current policy (with grad); old_logps, advantages: (B, T)
    from the rollout (detached); mask: (B, T).
    Stats: ``clipfrac`` — share of tokens where the clipped term is the larger one (its
    gradient is zero there); ``approx_kl`` — k3 estimate of KL(π_old ‖ π_θ) from tokens
    sampled by π_old: mean of (ρ − 1) − log ρ, ≥ 0 and unbiased (E_old[ρ] = 1);
    ``ratio_mean`` and ``ratio_max`` over the mask.
    """
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            # ρ > 0, so filling padding with 0 never wins the max (an empty mask gives 0).
            "ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return pg_loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO as in OpenAI baselines and trlX):

        V_clip = old_V + clip(V − old_V, −c, c)
        vf_loss = ½·masked_mean( max((V − R)², (V_clip − R)²) )

    values: (B, T) current value head output (with grad); old_values, returns: (B, T)
    from the rollout; mask: (B, T). Stats: ``vf_clipfrac`` — share of tokens where the
    clipped error is the larger one; ``values_mean``; ``value_error`` = masked mean of
    (V − R)².
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2  # (B, T)
    err_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask),
            "values_mean": masked_mean(values, mask),
            "value_error": masked_mean(err, mask),
        }
    return vf_loss, stats
