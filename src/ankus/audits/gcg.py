"""Greedy Coordinate Gradient (GCG, Zou et al. 2023) prefix search, written for ankus.

The suffix loss of a prefix x (P tokens) is ``L(x) = -log p(s | x)`` under the forward model.
Writing x as one-hot rows E (P, V), the model reads ``E @ W`` (W the input embeddings, V x d), so

    dL/dE[i, v] = W[v] . dL/d(embedding i)                                 (1)

a linear estimate of how much swapping position i to token v changes the loss. Each step:
one forward + backward for (1) at the current best prefix; for each candidate, a random position
and a random one of that position's top-k tokens by ``-dL/dE`` (restricted to ``allowed``); the
batch of single-token swaps scored by the forward model; the best prefix so far kept. Every
forward row counts against the :class:`~ankus.audits.prefix_search.Budget` (the gradient row
once, plus once as a backward), so GCG spends exactly what the other searches do.
"""

from __future__ import annotations

import torch

from ankus.audits.prefix_search import Budget, score_prefixes

__all__ = ["suffix_loss_from_onehot", "onehot_grad", "sample_swaps", "gcg_search"]


def suffix_loss_from_onehot(model, onehot: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """``L = -sum_j log p(s_j | prefix, s_<j)`` with the prefix given as rows ``onehot`` (P, V)
    (differentiable in ``onehot``); ``suffix`` (S,). Returns a scalar."""
    emb = model.get_input_embeddings().weight  # (V, d)
    p = onehot.shape[0]
    x = torch.cat([onehot.to(emb.dtype) @ emb, emb[suffix]], dim=0)[None]  # (1, P+S, d)
    logits = model(inputs_embeds=x).logits[0, p - 1:-1]  # (S, V): predictions of s_1..s_S
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -torch.log_softmax(logits, dim=-1).gather(-1, suffix[:, None]).sum()


def onehot_grad(model, prefix: torch.Tensor, suffix: torch.Tensor, budget: Budget | None = None) -> torch.Tensor:
    """``dL/dE`` (P, V) at the one-hot of ``prefix`` (P,): equation (1). Charges one row (and
    one backward) to ``budget``; the model's parameters get no gradient."""
    if budget is not None:
        budget.charge(1, backward=True)
    device = next(model.parameters()).device
    emb = model.get_input_embeddings().weight
    onehot = torch.nn.functional.one_hot(prefix.to(device), emb.shape[0]).to(emb.dtype).requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.requires_grad_(False)
    try:
        loss = suffix_loss_from_onehot(model, onehot, suffix.to(device))
        (grad,) = torch.autograd.grad(loss, onehot)
    finally:
        for q in params:
            q.requires_grad_(True)
    return grad.detach().cpu()  # (P, V)


def sample_swaps(prefix: torch.Tensor, grad: torch.Tensor, n: int, topk: int, allowed: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` candidates (n, P): ``prefix`` with one random position set to one of its ``topk``
    tokens by ``-grad`` (P, V), among ``allowed`` (K,) token ids when given."""
    score = -grad.clone()  # (P, V): larger = the loss falls more (to first order)
    if allowed is not None:
        keep = torch.full((grad.shape[1],), float("-inf"))
        keep[allowed] = 0.0
        score = score + keep
    topk = min(topk, len(allowed) if allowed is not None else grad.shape[1])
    top = score.topk(topk, dim=-1).indices  # (P, k)
    pos = torch.randint(prefix.shape[0], (n,), generator=generator)  # (n,)
    pick = torch.randint(topk, (n,), generator=generator)  # (n,)
    cands = prefix[None].repeat(n, 1)  # (n, P)
    cands[torch.arange(n), pos] = top[pos, pick]
    return cands


def gcg_search(model, suffix: torch.Tensor, init: torch.Tensor, budget: Budget, *, batch: int = 15, topk: int = 64,
               allowed: torch.Tensor | None = None, generator: torch.Generator | None = None,
               batch_size: int = 64) -> dict:
    """GCG from ``init`` (P,) until ``budget`` is spent: scores ``init`` (1 row), then steps of one
    gradient row + up to ``batch`` candidate rows. Returns the best prefix, its ``suffix_logprob``,
    ``steps`` and the best score after each step (``trace``)."""
    best = init.clone()
    best_lp = float(score_prefixes(model, best[None], suffix, budget=budget)["suffix_logprob"][0])
    trace, steps = [best_lp], 0
    while budget.left >= 2:
        grad = onehot_grad(model, best, suffix, budget)
        cands = sample_swaps(best, grad, min(batch, budget.left), topk, allowed, generator)
        lp = score_prefixes(model, cands, suffix, batch_size=batch_size, budget=budget)["suffix_logprob"]
        i = int(lp.argmax())
        if float(lp[i]) > best_lp:
            best, best_lp = cands[i], float(lp[i])
        steps += 1
        trace.append(best_lp)
    return {"prefix": best, "suffix_logprob": best_lp, "steps": steps, "trace": trace}
