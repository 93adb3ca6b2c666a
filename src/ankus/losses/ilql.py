"""Implicit Language Q-Learning (ILQL) loss and sampling scores.

Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language
Q Learning", in trlX's formulation (``trlx/models/modeling_ilql.py::ILQLConfig.loss``):

    L = Σ_i L_Q(Q_i) + L_V + cql_scale·Σ_i L_CQL(Q_i) + awac_scale·L_AWAC

* L_Q: masked mean of (Q_i(s_t, a_t) − y_t)², y_t = r_t + γ·V(s_{t+1})·(1 − done_t),
  V(s_{t+1}) without gradient (the Bellman target of the paper).
* L_V: expectile regression (IQL, Kostrikov et al. 2021) of V(s_t) toward
  Q̂(s_t, a_t) = min_i Q̂_i(s_t, a_t) over the Polyak target heads, no gradient through Q̂:
  L_τ(u) = |τ − 1(u < 0)|·u² with u = Q̂ − V. τ > 0.5 pushes V toward an upper expectile
  of Q, i.e. toward the value of the better actions in the data.
* L_CQL: cross-entropy of each Q head's values, read as logits over the vocabulary,
  against the taken token: log Σ_a exp Q(s, a) − Q(s, a_t) (the paper's conservative
  regulariser, which pushes down Q on tokens absent from the data).
* L_AWAC: cross-entropy of the LM logits on the taken tokens. trlX weights it by
  exp(β_awac·(Q̂ − V)) with β_awac defaulting to 0, i.e. plain masked CE; ``awac_beta``
  exposes the same weight (detached), default 0.

Step convention (all (B, T) tensors aligned, **no shift inside**): step t is the state
s_t (the prefix up to and excluding the action) and the action a_t = ``actions[:, t]``
(the next token). For a decoder-only LM run on ``input_ids`` (B, L): T = L − 1, and the
hidden states at positions 0..L−2 give ``logits``, ``qs``, ``target_qs``;
``actions = input_ids[:, 1:]``; ``vs`` are the V-head outputs at positions 0..L−2, or
0..L−1 to include the state after the last token (shape (B, T + 1)).
Every mean is over steps with ``mask`` = 1 (trlX: sum / max(1, count)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["expectile_loss", "ilql_loss", "ilql_sample_scores", "topk_mask"]


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """Elementwise asymmetric square L_τ(u) = |τ − 1(u < 0)|·u² (Kostrikov et al. 2021, IQL)."""
    weight = torch.abs(tau - (u < 0).to(u.dtype))  # τ where u ≥ 0, 1 − τ where u < 0
    return weight * u**2


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # where() instead of x * mask: a huge or inf value at a masked step must not turn into nan.
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n


def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32 (regression targets and log-softmax need the digits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _token_ce(scores: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy −log softmax(scores)[a]: (B, T, V), (B, T) -> (B, T)."""
    flat = _up(scores.reshape(-1, scores.shape[-1]))
    return F.cross_entropy(flat, actions.reshape(-1), reduction="none").view_as(actions)


def ilql_loss(
    logits: torch.Tensor,
    qs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    target_qs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    vs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.99,
    tau: float = 0.7,
    cql_scale: float = 0.1,
    awac_scale: float = 1.0,
    awac_beta: float = 0.0,
    lm_ce: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ILQL loss (see module docstring for the equations and the step convention).

    Args:
        logits: (B, T, V) LM logits at each state.
        qs: one or two (B, T, V) online Q-head outputs, or (B, T) values at the taken tokens
            only (then the CQL term, which needs every token, must be off: ``cql_scale`` 0).
        target_qs: same number of (B, T, V) target Q-head outputs (treated as constants), or
            (B, T) values at the taken tokens (all the loss reads of them).
        vs: (B, T) V(s_t), or (B, T + 1) with V of the state after the last action. With
            (B, T), the bootstrap value after the last step is 0, so that step must be
            terminal or masked out.
        actions: (B, T) long, the token taken at each step.
        rewards: (B, T) per-step reward (typically the standardized return on the last
            action, 0 elsewhere; data prep does that).
        dones: (B, T) 1 where the action ends the episode (no bootstrap). Note trlX's
            ``dones`` is the opposite (1 = not terminal).
        mask: (B, T) 1 on steps that are trained (response actions; 0 on prompt and pad).
        gamma: discount. tau: expectile. cql_scale, awac_scale: term weights.
        awac_beta: temperature of the advantage weight exp(β(Q̂ − V)) on the AWAC term.
        lm_ce: optional (B, T) −log softmax(logits)[a_t], precomputed (a frozen LM's, cached by
            the trainer); given, it replaces ``logits`` in the AWAC term and ``logits`` may be
            None. It carries no gradient to the LM, which a frozen LM would not get anyway.

    Returns:
        ``(loss, stats)``; stats are detached scalars: ``loss``, ``loss/q``, ``loss/v``,
        ``loss/cql`` (absent when the qs are given at the taken tokens only), ``loss/awac``,
        ``values/q`` (mean Q_i(s,a) over heads), ``values/target_q`` (Q̂), ``values/v``, ``values/advantage`` (Q̂ − V).
    """
    B, T = actions.shape
    mask = mask.to(torch.bool)  # (B, T)
    n = mask.sum().clamp(min=1)
    actions = actions.long()
    # Masked steps may carry pad or ignore ids; give gather a valid index there.
    safe_actions = torch.where(mask, actions, torch.zeros_like(actions))  # (B, T)
    idx = safe_actions.unsqueeze(-1)  # (B, T, 1)

    if vs.shape[1] == T + 1:
        v = vs[:, :-1]  # (B, T)
        v_next = vs[:, 1:]  # (B, T)
    elif vs.shape[1] == T:
        v = vs
        v_next = torch.cat([vs[:, 1:], vs.new_zeros(B, 1)], dim=1)  # (B, T)
    else:
        raise ValueError(f"vs has {vs.shape[1]} steps; expected T={T} or T+1")
    v, v_next = _up(v), _up(v_next)
    not_done = 1.0 - dones.to(v.dtype)  # (B, T)

    # Q loss: regress each online head on r + γ V(s') (the target carries no gradient).
    q_target = rewards.to(v.dtype) + gamma * v_next.detach() * not_done  # (B, T)
    def taken(q: torch.Tensor) -> torch.Tensor:  # (B, T, V) or already (B, T) -> (B, T)
        return q if q.dim() == 2 else q.gather(-1, idx).squeeze(-1)

    full_qs = all(q.dim() == 3 for q in qs)
    if not full_qs and cql_scale != 0:
        raise ValueError("the CQL term needs the Q heads over the whole vocabulary: pass (B, T, V) qs or cql_scale=0")
    q_taken = [_up(taken(q)) for q in qs]  # each (B, T)
    loss_q = sum(_masked_mean((qa - q_target) ** 2, mask, n) for qa in q_taken)

    # V loss: expectile of min over target heads (clipped double-Q), constant target.
    target_q_taken = torch.stack([taken(q) for q in target_qs]).min(0).values
    target_q_taken = _up(target_q_taken.detach())  # (B, T)
    loss_v = _masked_mean(expectile_loss(target_q_taken - v, tau), mask, n)

    # CQL: each Q head as logits over the vocabulary, cross-entropy against the data token.
    if full_qs:
        loss_cql = sum(_masked_mean(_token_ce(q, safe_actions), mask, n) for q in qs)
    else:
        loss_cql = torch.zeros((), device=v.device)

    # AWAC: (advantage-weighted) CE of the LM on the data tokens.
    awac_weight = torch.exp(awac_beta * (target_q_taken - v.detach()))  # (B, T)
    ce = _token_ce(logits, safe_actions) if lm_ce is None else _up(lm_ce)  # (B, T)
    loss_awac = _masked_mean(ce * awac_weight, mask, n)

    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "loss/q": loss_q.detach(),
            "loss/v": loss_v.detach(),
            "loss/awac": loss_awac.detach(),
            "values/q": sum(_masked_mean(qa, mask, n) for qa in q_taken) / len(q_taken),
            "values/target_q": _masked_mean(target_q_taken, mask, n),
            "values/v": _masked_mean(v, mask, n),
            "values/advantage": _masked_mean(target_q_taken - v, mask, n),
        }
        if full_qs:
            stats["loss/cql"] = loss_cql.detach()
    return loss, stats


def ilql_sample_scores(
    logits: torch.Tensor, qs_min: torch.Tensor, vs: torch.Tensor, beta: float
) -> torch.Tensor:
    """Sampling scores of ILQL: log_softmax(logits) + β·(Q − V) (Snell et al. 2022).

    The policy is π(a|s) ∝ π_LM(a|s)·exp(β·(Q(s,a) − V(s))); these are its unnormalised
    log-probabilities. trlX passes as ``qs_min`` the min over the *target* Q heads.
    β = 0 recovers the LM.

    Args:
        logits: (..., V) LM logits. qs_min: (..., V). vs: (...) state values.
    Returns:
        (..., V) scores (half precision upcast to float32); sample with softmax(scores / temperature), after an
        optional :func:`topk_mask`.
    """
    logps = torch.log_softmax(_up(logits), dim=-1)  # (..., V)
    return logps + beta * (_up(qs_min) - _up(vs).unsqueeze(-1))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Set every entry below the k-th largest of its row (last dim) to −inf.

    Ties with the k-th value are all kept. ``k <= 0`` or ``k >= V`` leaves ``scores``
    unchanged (k = 0 means "no top-k", as in HF generation).
    """
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, float("-inf"))
