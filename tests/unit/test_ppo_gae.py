"""GAE: hand-worked examples and a naive-loop property test."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ankus.rl.gae import gae_advantages


def test_gae_1x3_by_hand():
    # γ = 0.9, λ = 0.8, so γλ = 0.72. No value after the last token.
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    # t=2: δ = 2 + 0.9·0   − 1.5 = 0.5    A = 0.5
    # t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35   A = 0.35 + 0.72·0.5  = 0.71
    # t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4    A = 1.4  + 0.72·0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([1.9112, 0.71, 0.5])
    assert ret[0].tolist() == pytest.approx([2.4112, 1.71, 2.0])


def test_gae_2x4_right_padded_by_hand():
    # γ = 1, λ = 0.5.
    # Row 0, length 4: r = [0, 0, 0, 1], V = [0.2, 0.4, 0.6, 0.8]
    #   t=3: δ = 1 + 0   − 0.8 = 0.2   A = 0.2
    #   t=2: δ = 0 + 0.8 − 0.6 = 0.2   A = 0.2 + 0.5·0.2  = 0.3
    #   t=1: δ = 0 + 0.6 − 0.4 = 0.2   A = 0.2 + 0.5·0.3  = 0.35
    #   t=0: δ = 0 + 0.4 − 0.2 = 0.2   A = 0.2 + 0.5·0.35 = 0.375
    #   returns = A + V = [0.575, 0.75, 0.9, 1.0]
    # Row 1, length 2 (positions 2, 3 are padding holding garbage that must not leak):
    #   r = [0.7, -1], V = [1.0, 2.0]
    #   t=1: δ = -1  + 0   − 2.0 = -3.0   A = -3.0
    #   t=0: δ = 0.7 + 2.0 − 1.0 = 1.7    A = 1.7 + 0.5·(-3.0) = 0.2
    #   returns = [1.2, -1.0, 0, 0]
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.7, -1.0, 99.0, -50.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 0.8], [1.0, 2.0, 50.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.375, 0.35, 0.3, 0.2])
    assert adv.tolist()[1] == pytest.approx([0.2, -3.0, 0.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.575, 0.75, 0.9, 1.0])
    assert ret.tolist()[1] == pytest.approx([1.2, -1.0, 0.0, 0.0])


def naive_gae(rewards, values, length, gamma, lam):
    """One response as Python lists, textbook definition A_t = Σ_l (γλ)^l δ_{t+l}."""
    v = list(values[:length]) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    adv = [sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, length)) for t in range(length)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


@settings(max_examples=50, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 8),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_gae_matches_naive_sum(B, T, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    assert adv.shape == ret.shape == (B, T)
    for b, n in enumerate(lengths):
        exp_adv, exp_ret = naive_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(exp_adv, abs=1e-9)
        assert ret[b, :n].tolist() == pytest.approx(exp_ret, abs=1e-9)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_gae_lambda1_gamma1_is_reward_to_go_minus_value(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_r = torch.where(mask, rewards, 0)
    to_go = masked_r.flip(1).cumsum(1).flip(1)  # Σ_{s ≥ t} r_s
    assert torch.allclose(adv, torch.where(mask, to_go - values, 0))
    assert torch.allclose(ret, torch.where(mask, to_go, 0))  # Monte-Carlo returns


def test_gae_left_padding_and_holes():
    # Left padding [0, 1, 1]: the valid tokens behave like a 2-token response and the
    # padded slot gets 0 even though V at t=1 would otherwise bootstrap into it.
    # γ = 1, λ = 1, r = [5, 1, 2], V = [9, 0.5, 1.0]:
    #   t=2: δ = 2 − 1.0 = 1.0          A = 1.0
    #   t=1: δ = 1 + 1.0 − 0.5 = 1.5    A = 1.5 + 1.0 = 2.5
    #   t=0: padding -> 0
    rewards = torch.tensor([[5.0, 1.0, 2.0], [1.0, 5.0, 2.0]])
    values = torch.tensor([[9.0, 0.5, 1.0], [0.5, 9.0, 1.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 1]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 2.5, 1.0])
    assert ret[0].tolist() == pytest.approx([0.0, 3.0, 2.0])
    # A hole [1, 0, 1] splits the row into two episodes: t=0 does not see t=2.
    #   t=2: A = 2 − 1.0 = 1.0;  t=0: A = 1 + 0 − 0.5 = 0.5
    assert adv[1].tolist() == pytest.approx([0.5, 0.0, 1.0])
