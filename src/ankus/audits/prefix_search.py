"""Prefix search with a reverse LM (Pfau et al. 2023), and the forward model's batched scoring.

Every search finds prefixes of a fixed length P for a target suffix s (S tokens) and ranks them by
the forward model's ``log p(s | prefix)``. Prefixes of one length batch without padding.

* :func:`reverse_beam_search`: the reverse LM reads ``reverse(s)`` and extends it P tokens by
  beam search over its own log-probabilities (width W); the W finished beams, flipped, are scored
  by the forward model and the best kept.
* :func:`reverse_best_of_n`: N prefixes sampled from the reverse LM (temperature 1), flipped,
  scored, the best kept.
* :func:`random_best_of_n`: N prefixes of tokens drawn uniformly from ``allowed``, the baseline.

:class:`Budget` counts what each search spends: ``forward`` = rows the forward model scores (the
budget that is held equal across methods; a gradient row counts one here and one in
``backward``), ``reverse`` = rows the reverse LM runs (not charged: a separate, cheap model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ankus.data.io import DataError

__all__ = ["Budget", "BudgetExceeded", "SuffixTooLongError", "check_context", "score_prefixes",
           "reverse_beam_search", "reverse_best_of_n", "random_best_of_n", "flip"]


class SuffixTooLongError(DataError):
    """A target suffix (plus the prefix) does not fit a model's context."""


class BudgetExceeded(RuntimeError):
    """A search asked for more forward rows than its budget holds (a bug in the search)."""


@dataclass
class Budget:
    """Forward-model rows a search may score (``limit``) and what it has spent."""

    limit: int
    forward: int = 0
    backward: int = 0
    reverse: int = 0

    @property
    def left(self) -> int:
        return self.limit - self.forward

    def charge(self, rows: int, backward: bool = False) -> None:
        if rows > self.left:
            raise BudgetExceeded(f"{rows} forward rows asked, {self.left} of {self.limit} left")
        self.forward += rows
        self.backward += rows if backward else 0


def context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)


def check_context(model, prefix_len: int, suffix_len: int, what: str = "model") -> None:
    """A prefix + suffix longer than ``model``'s context is a :class:`SuffixTooLongError`."""
    n = context_length(model)
    if prefix_len + suffix_len > n:
        raise SuffixTooLongError(f"target suffix of {suffix_len} tokens plus a {prefix_len}-token prefix is longer "
                                 f"than the {what}'s context of {n} tokens; use shorter suffixes "
                                 "(targets.suffix_len) or prefixes (search.prefix_len)")


def flip(ids: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` reversed along the last axis (reverse-LM order <-> forward order)."""
    return ids.flip(-1)


@torch.no_grad()
def score_prefixes(model, prefixes: torch.Tensor, suffix: torch.Tensor, *, batch_size: int = 64,
                   budget: Budget | None = None) -> dict[str, torch.Tensor]:
    """The forward model on ``[prefix | suffix]`` rows, ``prefixes`` (N, P), ``suffix`` (S,):
    ``suffix_logprob`` (N,) = sum_j log p(s_j | prefix, s_<j); ``prefix_nll`` (N,) = mean NLL of
    prefix tokens 2..P; ``elicited`` (N,) bool = the argmax at every suffix position is the suffix
    token (so greedy decoding from the prefix reproduces the suffix). Charges N rows to ``budget``."""
    n, p = prefixes.shape
    if budget is not None:
        budget.charge(n)
    device = next(model.parameters()).device
    suffix = suffix.to(device)
    out = {"suffix_logprob": [], "prefix_nll": [], "elicited": []}
    for s in range(0, n, batch_size):
        rows = prefixes[s:s + batch_size].to(device)
        ids = torch.cat([rows, suffix.expand(len(rows), -1)], dim=1)  # (b, P+S)
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[:, :-1], dim=-1)  # (b, P+S-1, V)
        tok_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (b, P+S-1): log p(ids[t+1] | ids[:t+1])
        out["suffix_logprob"].append(tok_lp[:, p - 1:].sum(-1))
        out["prefix_nll"].append(-tok_lp[:, :p - 1].mean(-1) if p > 1 else torch.zeros(len(rows), device=device))
        out["elicited"].append((logp[:, p - 1:].argmax(-1) == suffix).all(-1))
    return {k: torch.cat(v).cpu() for k, v in out.items()}


def _banned_mask(vocab: int, banned: list[int], device) -> torch.Tensor:
    mask = torch.zeros(vocab, device=device)
    if banned:
        mask[torch.tensor(banned, device=device)] = float("-inf")
    return mask  # (V,)


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``(B, V)`` float logits at the last position of ``ids`` (B, T); the output head runs on that
    position only where the model takes ``logits_to_keep`` (transformers' causal LMs)."""
    try:
        out = model(input_ids=ids, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids)
    return out.logits[:, -1].float()


@torch.no_grad()
def _next_logprobs(reverse_model, seqs: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """``(B, V)`` log-probs of the reverse LM's next token after each row of ``seqs`` (B, T)."""
    logits = last_logits(reverse_model, seqs)  # (B, V)
    return torch.log_softmax(logits + _banned_mask(logits.shape[-1], banned, logits.device), dim=-1)


@torch.no_grad()
def reverse_beam(reverse_model, suffix: torch.Tensor, prefix_len: int, width: int, *,
                 banned: list[int] = (), budget: Budget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search of ``prefix_len`` tokens after ``flip(suffix)`` in the reverse LM:
    ``(prefixes (W', P) in forward order, reverse log-probs (W',))``, best first."""
    device = next(reverse_model.parameters()).device
    start = flip(suffix.to(device))[None]  # (1, S)
    beams, scores = start, torch.zeros(1, device=device)  # (B, S+t), (B,)
    for _ in range(prefix_len):
        lp = _next_logprobs(reverse_model, beams, list(banned))  # (B, V)
        if budget is not None:
            budget.reverse += len(beams)
        total = (scores[:, None] + lp).flatten()  # (B*V,)
        top = total.topk(min(width, int(torch.isfinite(total).sum()))).indices
        beams = torch.cat([beams[top // lp.shape[1]], (top % lp.shape[1])[:, None]], dim=1)
        scores = total[top]
    return flip(beams[:, start.shape[1]:]).cpu(), scores.cpu()


@torch.no_grad()
def reverse_sample(reverse_model, suffix: torch.Tensor, prefix_len: int, n: int, *, banned: list[int] = (),
                   generator: torch.Generator | None = None, budget: Budget | None = None) -> torch.Tensor:
    """``n`` prefixes (n, P) in forward order sampled from the reverse LM after ``flip(suffix)``."""
    device = next(reverse_model.parameters()).device
    seqs = flip(suffix.to(device))[None].expand(n, -1)  # (n, S)
    s = seqs.shape[1]
    for _ in range(prefix_len):
        probs = _next_logprobs(reverse_model, seqs, list(banned)).exp().cpu()  # (n, V)
        if budget is not None:
            budget.reverse += n
        nxt = torch.multinomial(probs, 1, generator=generator).to(device)  # (n, 1)
        seqs = torch.cat([seqs, nxt], dim=1)
    return flip(seqs[:, s:]).cpu()


def _best(model, cands: torch.Tensor, suffix: torch.Tensor, budget: Budget, batch_size: int) -> dict:
    sc = score_prefixes(model, cands, suffix, batch_size=batch_size, budget=budget)
    i = int(sc["suffix_logprob"].argmax())
    return {"prefix": cands[i], "suffix_logprob": float(sc["suffix_logprob"][i]), "candidates": len(cands)}


def reverse_beam_search(model, reverse_model, suffix: torch.Tensor, prefix_len: int, budget: Budget, *,
                        banned: list[int] = (), batch_size: int = 64) -> dict:
    """Reverse-LM beam search of width = the budget left; every finished beam scored forward."""
    cands, _ = reverse_beam(reverse_model, suffix, prefix_len, budget.left, banned=banned, budget=budget)
    return _best(model, cands, suffix, budget, batch_size)


def reverse_best_of_n(model, reverse_model, suffix: torch.Tensor, prefix_len: int, budget: Budget, *,
                      banned: list[int] = (), generator: torch.Generator | None = None, batch_size: int = 64) -> dict:
    """Best of ``budget.left`` prefixes sampled from the reverse LM."""
    cands = reverse_sample(reverse_model, suffix, prefix_len, budget.left, banned=banned, generator=generator,
                           budget=budget)
    return _best(model, cands, suffix, budget, batch_size)


def random_best_of_n(model, suffix: torch.Tensor, prefix_len: int, budget: Budget, allowed: torch.Tensor, *,
                     generator: torch.Generator | None = None, batch_size: int = 64) -> dict:
    """Best of ``budget.left`` prefixes of tokens drawn uniformly from ``allowed`` (K,)."""
    ix = torch.randint(len(allowed), (budget.left, prefix_len), generator=generator)
    return _best(model, allowed[ix], suffix, budget, batch_size)
