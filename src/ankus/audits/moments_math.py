"""The math of the moments audits (Belrose et al. 2024, "Neural networks learn statistics of increasing order").

Pure functions, numpy / scipy / torch, no model code.

Token statistics: add-k smoothed unigram and bigram models of a token stream,
``u(v) = (c(v) + k) / (N + kV)`` and ``b(w | v) = (c(v, w) + k) / (c(v, .) + kV)`` (bigram counts
as a sparse (V, V) matrix: a real vocabulary of 49,152 tokens does not fit densely), sampling
sequences from them, and the KL divergence of a model's next-token distributions from them.

Image statistics: maximum-entropy distributions that match a class's statistics.

* Means only, pixels in [0, 1]: the maximum-entropy density on the box with mean ``m`` is a
  product of independent truncated exponentials ``p(x_d) ∝ exp(λ_d x_d)`` on [0, 1], with
  ``λ_d`` solving ``E[x_d] = 1 / (1 - e^{-λ}) - 1 / λ = m_d`` (λ = 0 is the uniform, mean 1/2).
* Mean and covariance, on R^D: the Gaussian N(μ, Σ).
* Optimal transport between two Gaussians (squared Euclidean cost): ``T(x) = μ2 + A (x - μ1)``
  with ``A = Σ1^{-1/2} (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2} Σ1^{-1/2}``; ``A Σ1 A = Σ2`` and A is symmetric
  positive definite, so T moves a class's first two moments onto another's.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["unigram_probs", "bigram_counts", "bigram_probs", "kl_rows", "model_ngram_kl", "sample_unigram",
           "sample_bigram", "unigram_entropy", "ngram_nll", "maxent_box_lambda", "maxent_box_mean",
           "sample_maxent_box", "gaussian_fit", "sample_gaussian", "sqrtm_psd", "gaussian_ot_map", "apply_map"]


# ---------------------------------------------------------------------------------------------
# token statistics


def unigram_probs(tokens: np.ndarray, vocab: int, k: float) -> np.ndarray:
    """``(V,)`` add-k unigram probabilities of the token stream ``tokens (N,)``."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab)[:vocab].astype(np.float64)  # (V,)
    total = counts.sum() + k * vocab
    if total <= 0:
        raise ValueError("unigram_probs: no tokens and k = 0")
    return (counts + k) / total


def bigram_counts(tokens: np.ndarray, vocab: int) -> sp.csr_matrix:
    """``(V, V)`` sparse counts ``C[v, w]`` of ``w`` following ``v`` in ``tokens (N,)``."""
    t = np.asarray(tokens, dtype=np.int64)
    ones = np.ones(max(len(t) - 1, 0), dtype=np.float64)
    return sp.csr_matrix((ones, (t[:-1], t[1:])), shape=(vocab, vocab))  # duplicates are summed


def bigram_probs(counts: sp.csr_matrix, prev: np.ndarray, k: float, fallback: np.ndarray | None = None,
                 toward: np.ndarray | None = None) -> np.ndarray:
    """``(M, V)`` add-k rows ``b(. | prev[i])`` for ``prev (M,)``. A row with no counts and k = 0
    is ``fallback (V,)`` (the unigram, say); without one it is uniform. ``toward (V,)``: the
    pseudo-counts are ``k V toward(w)`` instead of ``k`` (smoothing toward the unigram, say)."""
    vocab = counts.shape[1]
    pseudo = k if toward is None else k * vocab * np.asarray(toward)[None, :]
    rows = counts[np.asarray(prev, dtype=np.int64)].toarray() + pseudo  # (M, V)
    sums = rows.sum(axis=1, keepdims=True)  # (M, 1)
    empty = sums[:, 0] <= 0
    if empty.any():
        rows[empty] = fallback if fallback is not None else 1.0 / vocab
        sums[empty] = rows[empty].sum(axis=1, keepdims=True)
    return rows / sums


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``(M,)`` KL(p || q) = sum_v p(v) (log p(v) - log q(v)) of rows of log-probabilities ``(M, V)``."""
    p = logp.exp()
    return (p * (logp - logq)).sum(-1)


def model_ngram_kl(logits: torch.Tensor, prev: np.ndarray, unigram: np.ndarray, counts: sp.csr_matrix,
                   k: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL(model || unigram), KL(model || bigram(. | prev)), KL(model || bigram toward the unigram))``,
    each ``(M,)``, for next-token ``logits (M, V)`` given the previous tokens ``prev (M,)`` (the
    model's vocabulary may be padded past V: extra columns are dropped and the model renormalised).
    The first bigram is add-k (``bigram_probs(counts, prev, k)``), the second adds ``k V u(w)``
    pseudo-counts instead (``toward=unigram``): a rare context then falls back on the unigram,
    not on the uniform distribution.

    Never builds dense bigram rows: with ``p`` summing to 1 and pseudo-counts ``a(w)``,
    ``sum_w p(w) log b(w | v) = sum_w p(w) log a(w) + sum_{w: C[v,w] > 0} p(w) log(1 + C[v,w] / a(w))
    - log(C[v,.] + sum_w a(w))``, a sum over the row's nonzero counts. Needs k > 0."""
    if k <= 0:
        raise ValueError("model_ngram_kl: the add-k smoothing k must be > 0 (a model puts mass on unseen bigrams)")
    vocab = len(unigram)
    logp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)  # (M, V) float32: 2.5x faster than float64 here
    p = logp.exp()
    neg_entropy = (p * logp).sum(-1).double()  # (M,)
    cross_u = (p @ torch.from_numpy(np.log(unigram)).float()).double()  # (M,)
    prev = np.asarray(prev, dtype=np.int64)
    rows = counts[prev].tocoo()  # (M, V) sparse
    pn = p.numpy()
    pv = pn[rows.row, rows.col].astype(np.float64)  # (nnz,) the model's probabilities of seen bigrams
    totals = np.asarray(counts.sum(axis=1)).ravel()[prev] + k * vocab  # (M,)

    def cross(pseudo: np.ndarray) -> torch.Tensor:  # sum_w p(w) log b(w | v) given sum_w p(w) log a(w)
        seen = np.bincount(rows.row, weights=pv * np.log1p(rows.data / pseudo), minlength=len(prev))  # (M,)
        return torch.from_numpy(seen - np.log(totals))

    cross_b = cross(np.full(len(rows.data), k)) + np.log(k)
    cross_bu = cross(k * vocab * unigram[rows.col]) + np.log(k * vocab) + cross_u
    return neg_entropy - cross_u, neg_entropy - cross_b, neg_entropy - cross_bu


def sample_unigram(probs: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, length)`` i.i.d. tokens from ``probs (V,)``."""
    return rng.choice(len(probs), size=(n, length), p=probs / probs.sum())


def sample_bigram(counts: sp.csr_matrix, unigram: np.ndarray, k: float, n: int, length: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``(n, length)`` Markov chains: the first token from ``unigram (V,)``, each next from ``b(. | previous)``."""
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = sample_unigram(unigram, n, 1, rng)[:, 0]
    for t in range(1, length):
        rows = bigram_probs(counts, out[:, t - 1], k, unigram)  # (n, V)
        cdf = np.cumsum(rows, axis=1)
        u = rng.random(n)[:, None] * cdf[:, -1:]
        out[:, t] = np.minimum((cdf < u).sum(axis=1), len(unigram) - 1)
    return out


def unigram_entropy(probs: np.ndarray) -> float:
    """H(u) in nats: the least expected loss on unigram samples of any predictor."""
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def ngram_nll(seqs: np.ndarray, unigram: np.ndarray, counts: sp.csr_matrix | None, k: float) -> float:
    """Mean -log q(x_t | x_{t-1}) over positions 1.. of ``seqs (n, L)`` under the bigram (``counts``)
    or, with ``counts`` None, the unigram: the n-gram model's own loss on those sequences."""
    prev, nxt = seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)  # (n (L-1),) each
    if counts is None:
        return float(-np.log(unigram[nxt]).mean())
    q = [bigram_probs(counts, prev[i:i + 256], k, unigram)[np.arange(len(prev[i:i + 256])), nxt[i:i + 256]]
         for i in range(0, len(prev), 256)]
    return float(-np.log(np.concatenate(q)).mean())


# ---------------------------------------------------------------------------------------------
# maximum entropy on the box [0, 1]^D given the mean


def maxent_box_mean(lam: np.ndarray) -> np.ndarray:
    """Mean of ``p(x) ∝ exp(λ x)`` on [0, 1], elementwise: ``1 / (1 - e^{-λ}) - 1 / λ`` (1/2 at 0)."""
    lam = np.asarray(lam, dtype=np.float64)
    a = np.abs(lam)
    small = a < 1e-4
    safe = np.where(small, 1.0, a)
    pos = -1.0 / np.expm1(-safe) - 1.0 / safe  # mean for +|λ|, = 1/(1 - e^{-a}) - 1/a
    pos = np.where(small, 0.5 + a / 12.0, pos)
    return np.where(lam >= 0, pos, 1.0 - pos)


def maxent_box_lambda(mean: np.ndarray, eps: float = 1e-3, iters: int = 100) -> np.ndarray:
    """``λ`` with ``maxent_box_mean(λ) = mean`` elementwise (bisection; means clipped to [eps, 1 - eps])."""
    m = np.clip(np.asarray(mean, dtype=np.float64), eps, 1.0 - eps)
    lo, hi = np.full_like(m, -2.0 / eps), np.full_like(m, 2.0 / eps)  # the mean at ±2/eps is beyond 1 ∓ eps
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = maxent_box_mean(mid) < m
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def sample_maxent_box(mean: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, D)`` samples of the maximum-entropy density on [0, 1]^D with mean ``mean (D,)``
    (inverse CDF of each truncated exponential)."""
    lam = maxent_box_lambda(mean)[None, :]  # (1, D)
    u = rng.random((n, lam.shape[1]))  # (n, D)
    neg = -np.abs(lam)  # sample with -|λ|, mirror where λ > 0: x -> 1 - x, u -> 1 - u
    uu = np.where(lam > 0, 1.0 - u, u)
    small = np.abs(neg) < 1e-8
    x = np.where(small, uu, np.log1p(uu * np.expm1(neg)) / np.where(small, -1.0, neg))
    return np.clip(np.where(lam > 0, 1.0 - x, x), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Gaussians and the optimal-transport map between two of them


def gaussian_fit(x: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (D,), covariance (D, D))`` of ``x (N, D)`` (maximum likelihood, /N), plus ``ridge * I``."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    c = x - mu
    return mu, c.T @ c / len(x) + ridge * np.eye(x.shape[1])


def sample_gaussian(mean: np.ndarray, cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, D)`` samples of N(mean, cov) (cov positive semi-definite: a symmetric square root)."""
    z = rng.standard_normal((n, len(mean)))
    return mean[None, :] + z @ sqrtm_psd(cov)


def sqrtm_psd(s: np.ndarray, power: float = 0.5) -> np.ndarray:
    """``S^power`` of a symmetric positive semi-definite ``s (D, D)`` by eigh (eigenvalues clipped at 0;
    a negative power needs them positive)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    w = np.clip(w, 0.0, None)
    if power < 0 and w.min() <= 0:
        raise ValueError("sqrtm_psd: a negative power of a singular matrix; add a ridge to the covariance")
    return (v * w ** power) @ v.T


def gaussian_ot_map(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray,
                    cov2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A (D, D), b (D,))`` of the optimal-transport map ``T(x) = A x + b`` from N(mean1, cov1) to
    N(mean2, cov2): ``A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}``, ``b = mean2 - A mean1``."""
    r = sqrtm_psd(cov1)
    r_inv = sqrtm_psd(cov1, -0.5)
    a = r_inv @ sqrtm_psd(r @ cov2 @ r) @ r_inv
    a = (a + a.T) / 2
    return a, mean2 - a @ mean1


def apply_map(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, D)``: ``A x + b`` for each row of ``x (N, D)``."""
    return x @ a.T + b[None, :]
