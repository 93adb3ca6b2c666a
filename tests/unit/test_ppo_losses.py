"""PPO policy/value losses, log-probs and entropy: hand numbers and naive references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ankus.losses.ppo import (
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    token_entropy,
    value_loss,
)


def test_policy_loss_clipping_cases_by_hand():
    # cliprange 0.2, so ρ is clipped to [0.8, 1.2]. Per token: max(−A·ρ, −A·clip(ρ)):
    #   ρ=1.5, A=+1: max(−1.5, −1.2) = −1.2   clipped (no gradient)
    #   ρ=1.5, A=−1: max( 1.5,  1.2) =  1.5   unclipped
    #   ρ=0.5, A=+1: max(−0.5, −0.8) = −0.5   unclipped
    #   ρ=0.5, A=−1: max( 0.5,  0.8) =  0.8   clipped (no gradient)
    #   ρ=1.1, A=+2: max(−2.2, −2.2) = −2.2   inside the range
    #   6th token is padding with an extreme ratio: ignored.
    # pg_loss = (−1.2 + 1.5 − 0.5 + 0.8 − 2.2)/5 = −1.6/5 = −0.32; clipfrac = 2/5
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 50.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old_logps = torch.full_like(ratios, -2.0)
    logps = (old_logps + ratios.log()).requires_grad_()
    pg_loss, stats = policy_loss(logps, old_logps, advantages, mask, cliprange=0.2)
    assert pg_loss.item() == pytest.approx(-0.32)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    # approx_kl = mean of (ρ − 1) − ln ρ
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.5, 0.5, 0.5, 1.1)]  # 0.0945, 0.0945, 0.1931, 0.1931, 0.0047
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 5)
    assert not stats["clipfrac"].requires_grad
    # d/dlogp of −A·ρ is −A·ρ on unclipped tokens and 0 on clipped ones; /5 for the mean:
    #   [0, 1.5/5, −0.5/5, 0, −2.2/5, 0]
    pg_loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([0.0, 0.3, -0.1, 0.0, -0.44, 0.0])


def test_policy_loss_on_policy_is_minus_mean_advantage():
    # First PPO epoch: logps == old_logps, ρ = 1, so the loss is −mean(A) and nothing is clipped.
    advantages = torch.tensor([[0.3, -1.2, 2.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logps = torch.randn(2, 3)
    pg_loss, stats = policy_loss(logps, logps.clone(), advantages, mask, 0.2)
    assert pg_loss.item() == pytest.approx(-(0.3 - 1.2 + 2.0 + 0.5) / 4)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_value_loss_clipping_by_hand():
    # c = 0.2. V_clip = old + clip(V − old, ±0.2).
    #   V=1.0, old=0.5, R=1.2 : V_clip=0.7, (V−R)²=0.04, (V_clip−R)²=0.25 -> 0.25 clipped
    #   V=1.0, old=0.5, R=0.0 : V_clip=0.7, 1.0 vs 0.49                   -> 1.0
    #   V=0.0, old=0.1, R=0.05: V−old=−0.1 inside, both 0.0025            -> 0.0025
    #   V=−1,  old=0,   R=−1  : V_clip=−0.2, 0 vs 0.64                    -> 0.64 clipped
    #   5th: padding.
    # vf_loss = 0.5·(0.25 + 1.0 + 0.0025 + 0.64)/4 = 0.2365625; vf_clipfrac = 2/4
    values = torch.tensor([[1.0, 1.0, 0.0, -1.0, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.2, 0.0, 0.05, -1.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    vf_loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    assert vf_loss.item() == pytest.approx(0.2365625)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    assert stats["value_error"].item() == pytest.approx((0.04 + 1.0 + 0.0025 + 0.0) / 4)
    # Gradient (V − R)/4 where the unclipped error wins or V_clip = V; 0 where the clip saturates.
    vf_loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.25, -0.0125, 0.0, 0.0])


def test_logprobs_from_logits_equals_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    naive = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels), naive, atol=1e-6)
    # Explicit loop for one position: z[label] − log Σ exp z.
    z = logits[1, 2].tolist()
    manual = z[labels[1, 2]] - math.log(sum(math.exp(v) for v in z))
    assert logprobs_from_logits(logits, labels)[1, 2].item() == pytest.approx(manual, abs=1e-5)
    # bf16 logits: computed in fp32 row by row, equals fp32 log-softmax of the same bf16 values.
    lb = logits.to(torch.bfloat16)
    out = logprobs_from_logits(lb, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(lb.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-5)
    # Gradients match log_softmax's too.
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    logprobs_from_logits(a, labels).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels[..., None]).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_entropy_by_hand():
    # [0, 0] -> uniform over 2: ln 2. [0, ln 3] -> p = [1/4, 3/4]: −(¼ln¼ + ¾ln¾) = 0.5623351.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [100.0, -100.0]]])
    h = token_entropy(logits)
    assert h[0].tolist() == pytest.approx([math.log(2), 0.5623351, 0.0], abs=1e-6)
    mask = torch.tensor([[1, 1, 0]])
    assert entropy_from_logits(logits, mask).item() == pytest.approx((math.log(2) + 0.5623351) / 2, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    cliprange=st.floats(0.05, 0.5),
    seed=st.integers(0, 10_000),
)
def test_losses_match_naive_loops(B, T, cliprange, seed):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old_logps = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])

    pg_terms, vf_terms, clipped = [], [], 0
    for b in range(B):
        for t in range(lengths[b]):
            rho = math.exp(logps[b, t].item() - old_logps[b, t].item())
            a = advantages[b, t].item()
            u, c = -a * rho, -a * min(max(rho, 1 - cliprange), 1 + cliprange)
            pg_terms.append(max(u, c))
            clipped += c > u
            v, vo, r = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            vc = vo + min(max(v - vo, -cliprange), cliprange)
            vf_terms.append(max((v - r) ** 2, (vc - r) ** 2))
    n = len(pg_terms)
    pg_loss, stats = policy_loss(logps, old_logps, advantages, mask, cliprange)
    vf_loss, _ = value_loss(values, old_values, returns, mask, cliprange)
    assert pg_loss.item() == pytest.approx(sum(pg_terms) / n)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n)
    assert vf_loss.item() == pytest.approx(0.5 * sum(vf_terms) / n)
