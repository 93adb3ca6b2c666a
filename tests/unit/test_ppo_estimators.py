"""Critic-free advantages: RLOO and GRPO."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ankus.rl.estimators import grpo_advantages, rloo_advantages, sequence_to_token_advantages


def test_rloo_by_hand():
    # Scores [1, 2, 3, 6], sum 12; baseline = mean of the other three = (12 − s)/3.
    # 1 − 11/3 = −8/3;  2 − 10/3 = −4/3;  3 − 9/3 = 0;  6 − 6/3 = 4
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0, 6.0]]))
    assert adv.shape == (1, 4)
    assert adv[0].tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    # Flat layout with k: the second prompt's [0, 0, 1, 1] (sum 2):
    # 0 − 2/3, 0 − 2/3, 1 − 1/3, 1 − 1/3
    flat = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0]), k=4)
    assert flat.shape == (8,)
    assert flat.tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3])


def test_grpo_by_hand():
    # [1, 2, 3, 6]: mean 3, deviations [−2, −1, 0, 3], Σdev² = 14.
    # Sample std sqrt(14/3) = 2.1602469; population std sqrt(14/4) = 1.8708287.
    s = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    std = math.sqrt(14 / 3)
    assert grpo_advantages(s)[0].tolist() == pytest.approx([d / (std + 1e-4) for d in (-2, -1, 0, 3)])
    pop = math.sqrt(3.5)
    assert grpo_advantages(s, unbiased=False, eps=0.0)[0].tolist() == pytest.approx([d / pop for d in (-2, -1, 0, 3)])
    assert grpo_advantages(s, scale=False)[0].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    # [0, 0, 1, 1]: mean 0.5, sample std sqrt(4·0.25/3) = 0.5773503 -> ±0.5/0.5774503
    flat = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0]), k=4)
    assert flat[4:].tolist() == pytest.approx([-0.865876, -0.865876, 0.865876, 0.865876], abs=1e-6)
    # A group with identical scores carries no signal: advantage 0, not NaN.
    assert grpo_advantages(torch.tensor([[2.0, 2.0, 2.0]])).tolist() == [[0.0, 0.0, 0.0]]


def test_estimator_shape_errors():
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(6), k=4)
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(6))
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(2, 3), k=4)


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 5), k=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_group_advantages_properties(P, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(P, k, generator=g, dtype=torch.float64)
    rloo = rloo_advantages(scores)
    # Leave-one-out advantages sum to zero and equal k/(k−1)·(s − mean).
    assert torch.allclose(rloo.sum(1), torch.zeros(P, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rloo, k / (k - 1) * (scores - scores.mean(1, keepdim=True)))
    # Flat and (P, k) layouts agree.
    assert torch.allclose(rloo_advantages(scores.flatten(), k=k), rloo.flatten())
    grpo = grpo_advantages(scores, eps=0.0)
    assert torch.allclose(grpo.mean(1), torch.zeros(P, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(grpo.std(1), torch.ones(P, dtype=torch.float64))
    assert torch.allclose(grpo_advantages(scores.flatten(), k=k, eps=0.0), grpo.flatten())


def test_sequence_to_token_advantages():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_to_token_advantages(adv, mask).tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
