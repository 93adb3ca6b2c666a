"""Masked statistics for RL: mean, variance, whitening and running moments.

All masks are (B, T) float or bool tensors with 1 = a response token that counts.
Unlike trlX's `whiten`, which normalises over every position of the padded batch
(so the zeros that pad short responses pull the mean towards 0 and shrink the
variance), everything here uses **only masked positions**; padded positions of a
whitened tensor come back as exactly 0.

Cross-process statistics: functions take an optional ``reduce`` callable that sums a
tensor over all ranks and returns the sum (e.g. a wrapper around
``torch.distributed.all_reduce(t, op=SUM)`` that returns ``t``). Only sums and counts
travel, so a 2-rank run gives the same global mean/variance as 1 rank on all data.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Accumulating a large sum in bf16/fp16 loses most of its digits; use at least fp32.
    return torch.promote_types(x.dtype, torch.float32)


def masked_sum_count(x: Tensor, mask: Tensor, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Global (sum of x over the mask, number of masked elements) as 0-d tensors.

    x, mask: same shape (any). With ``reduce`` both are summed over ranks in one call.
    """
    dtype = _stat_dtype(x)
    keep = mask.bool()
    # where, not x·mask: padding may hold inf/NaN (e.g. log-probs of pad tokens), and 0·inf = NaN.
    stats = torch.stack([torch.where(keep, x.to(dtype), 0).sum(), keep.to(dtype).sum()])  # (2,)
    if reduce is not None:
        stats = reduce(stats)
    return stats[0], stats[1]


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, reduce: Reduce | None = None
) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1: sum(x·m) / sum(m).

    x: (B, T); mask: (B, T). ``dim=None`` gives a scalar; ``dim=1`` a per-row (B,) mean.
    An all-zero mask (or row) gives 0 rather than NaN, so an empty micro-batch adds no
    NaN gradient. ``reduce`` (global mean over ranks) is only meaningful with dim=None.
    """
    if dim is None:
        total, count = masked_sum_count(x, mask, reduce)
        return (total / count.clamp(min=1)).to(x.dtype)
    if reduce is not None:
        raise ValueError("reduce is only supported with dim=None")
    keep = mask.bool()
    return torch.where(keep, x, 0).sum(dim) / keep.to(x.dtype).sum(dim).clamp(min=1)


def masked_var(
    x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None
) -> Tensor:
    """Variance of ``x`` over masked positions (scalar).

    Two passes (global mean first, then the sum of squared deviations) rather than
    E[x²] − E[x]², which cancels catastrophically in fp32 when |mean| ≫ std.
    ``unbiased=True`` applies Bessel's correction n/(n−1), like ``torch.var``; with a
    single masked element the unbiased variance is reported as 0 (not inf/NaN).
    """
    dtype = _stat_dtype(x)
    mean = masked_mean(x.to(dtype), mask, reduce=reduce)
    sq_dev, count = masked_sum_count((x.to(dtype) - mean) ** 2, mask, reduce)
    denom = (count - 1) if unbiased else count
    return (sq_dev / denom.clamp(min=1)).to(x.dtype)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    unbiased: bool = False,
    eps: float = 1e-8,
    reduce: Reduce | None = None,
) -> Tensor:
    """Normalise ``x`` to zero mean, unit variance over the masked positions.

        x̂ = (x − μ) / sqrt(σ² + eps)        (μ, σ² over mask only; global with reduce)

    x, mask: (B, T) -> (B, T). With ``shift_mean=False`` the mean is added back (only
    the scale changes), as PPO implementations do for rewards. Padded positions are 0
    and their input values never influence the result. The default population variance
    (``unbiased=False``) makes the output's population variance over the mask exactly 1
    (up to eps).
    """
    dtype = _stat_dtype(x)
    xf = x.to(dtype)
    mean = masked_mean(xf, mask, reduce=reduce)
    var = masked_var(xf, mask, unbiased=unbiased, reduce=reduce)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0).to(x.dtype)


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars.

    Merges each batch into the running totals with Chan, Golub & LeVeque's parallel
    update (1979): for counts n_a, n_b, means μ_a, μ_b and M2 = n·var,
        δ = μ_b − μ_a,  n = n_a + n_b,  μ = μ_a + δ·n_b/n,
        M2 = M2_a + M2_b + δ²·n_a·n_b/n.
    The totals are Python floats (float64), so ``state_dict`` is a plain dict that can be
    saved with a checkpoint. ``std`` is the sample (Bessel-corrected) std of everything
    seen; before two values have been seen it is 1.0 so that dividing by it is a no-op.
    ``reduce`` (a sum over ranks) makes every rank see the global batch.
    """

    def __init__(self, reduce: Reduce | None = None) -> None:
        self.reduce = reduce
        self.mean = 0.0
        self.var = 0.0  # population variance (M2 / count) of everything seen
        self.count = 0.0

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    @torch.no_grad()
    def update(self, xs: Tensor) -> tuple[float, float]:
        """Add the batch ``xs`` (any shape, all elements count) and return the batch's
        (mean, sample std) — global over ranks with ``reduce``."""
        xs = xs.detach().to(torch.float64).flatten()
        ones = torch.ones_like(xs)
        total, count = masked_sum_count(xs, ones, self.reduce)
        n_b = float(count)
        if n_b == 0:
            return 0.0, 1.0
        mean_b = float(total) / n_b
        # Second pass over the same data: sum of squared deviations from the global batch mean.
        sq_dev, _ = masked_sum_count((xs - mean_b) ** 2, ones, self.reduce)
        m2_b = float(sq_dev)

        n_a, mean_a, m2_a = self.count, self.mean, self.var * self.count
        n = n_a + n_b
        delta = mean_b - mean_a
        self.mean = mean_a + delta * n_b / n
        self.var = (m2_a + m2_b + delta * delta * n_a * n_b / n) / n
        self.count = n

        batch_std = math.sqrt(m2_b / (n_b - 1)) if n_b > 1 else 1.0
        return mean_b, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = float(state["count"])


def scale_scores(scores: Tensor, mode: str, running: RunningMoments,
                 ref_std: float | None) -> tuple[Tensor, float | None]:
    """Reward scaling (trlX's ``scale_reward``) -> (scaled scores, ``ref_std``).

    scores: (B,) sequence scores or (B, T) per-token scores (a row's sum is its sequence score).
    ``"none"``: as they are; ``"running"``: divided by the running std of sequence scores, after
    ``running`` takes this batch; ``"ref"``: divided by ``ref_std``, set from the first batch's std.
    """
    seq = scores if scores.dim() == 1 else scores.sum(1)  # (B,)
    if mode == "running":
        running.update(seq)
        return scores / max(running.std, 1e-8), ref_std
    if mode == "ref":
        ref_std = ref_std or max(float(seq.std()), 1e-8)
        return scores / ref_std, ref_std
    if mode != "none":
        raise ValueError(f"unknown scale_reward '{mode}'; expected none, running or ref")
    return scores, ref_std
