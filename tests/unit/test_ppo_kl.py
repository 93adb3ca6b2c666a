"""KL estimators, KL-penalised rewards and the KL controllers."""

import math

import pytest
import torch

from ankus.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_controller,
    kl_k3,
    kl_loss,
    kl_penalised_scores,
    per_token_rewards,
    response_kl,
)


def test_kl_estimators_by_hand():
    logps = torch.tensor([-1.0, -2.0, -0.3])
    ref_logps = torch.tensor([-1.5, -1.0, -0.3])
    # r = logp − logp_ref = [0.5, -1.0, 0.0]
    assert kl_k1(logps, ref_logps).tolist() == pytest.approx([0.5, -1.0, 0.0])
    # k2 = r²/2 = [0.125, 0.5, 0]
    assert kl_k2(logps, ref_logps).tolist() == pytest.approx([0.125, 0.5, 0.0])
    # k3 = e^{-r} − 1 + r: e^{-0.5} = 0.60653066 -> 0.10653066; e^{1} − 1 − 1 = 0.71828183; 0
    assert kl_k3(logps, ref_logps).tolist() == pytest.approx([0.10653066, 0.71828183, 0.0], abs=1e-7)


def test_kl_direction_exact_expectation_over_a_categorical():
    # Exact expectations under x ~ π over a 3-token vocabulary.
    p = [0.5, 0.3, 0.2]  # π
    q = [0.2, 0.5, 0.3]  # π_ref
    kl_p_q = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(π‖π_ref) = 0.2319...
    kl_q_p = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    logps = torch.tensor(p, dtype=torch.float64).log()
    ref_logps = torch.tensor(q, dtype=torch.float64).log()
    probs = torch.tensor(p, dtype=torch.float64)
    assert (probs * kl_k1(logps, ref_logps)).sum().item() == pytest.approx(kl_p_q, rel=1e-12)
    assert (probs * kl_k3(logps, ref_logps)).sum().item() == pytest.approx(kl_p_q, rel=1e-12)
    # k2 is biased; exp(r) − 1 − r (trlX's logged form) is not an estimate of this KL either.
    assert (probs * kl_k2(logps, ref_logps)).sum().item() != pytest.approx(kl_p_q, rel=1e-3)
    r = logps - ref_logps
    assert (probs * (torch.expm1(r) - r)).sum().item() != pytest.approx(kl_p_q, rel=1e-2)
    # ...that form is k3 for the reverse direction, with samples from π_ref.
    ref_probs = torch.tensor(q, dtype=torch.float64)
    assert (ref_probs * (torch.expm1(r) - r)).sum().item() == pytest.approx(kl_q_p, rel=1e-12)
    # k3 is non-negative per sample, k1 is not.
    assert torch.all(kl_k3(logps, ref_logps) >= 0) and torch.any(kl_k1(logps, ref_logps) < 0)


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LOGPS = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -1.5, -3.0, -9.0], [-2.0, -1.0, -7.0, -7.0]])
# r = logp − ref = [[0.5, -0.5, 0, (5)], [1, 0, (6), (6)]]; bracketed values are padding.


def test_per_token_rewards_scalar_score_by_hand():
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), LOGPS, REF, MASK, kl_coef=0.1)
    assert kl.tolist() == [[0.5, -0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    # Row 0: −0.1·r = [-0.05, 0.05, 0, -], plus score 2 at the last response token (t=2).
    # Row 1: −0.1·r = [-0.1, 0, -, -], plus score −1 at t=1.
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.05, 2.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([-0.1, -1.0, 0.0, 0.0])


def test_per_token_rewards_dense_scores_and_k3():
    dense = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    rewards, _ = per_token_rewards(dense, LOGPS, REF, MASK, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([1 - 0.05, 2 + 0.05, 3.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([5 - 0.1, 6.0, 0.0, 0.0])
    # k3 of r = 0.5 is e^{-0.5} − 0.5 = 0.10653066; with β = 1 and no score the reward is −k3.
    rewards, kl = per_token_rewards(torch.zeros(2), LOGPS, REF, MASK, kl_coef=1.0, estimator="k3")
    assert kl[0, 0].item() == pytest.approx(0.10653066, abs=1e-7)
    assert rewards[0, 0].item() == pytest.approx(-0.10653066, abs=1e-7)


def test_per_token_rewards_rejects_empty_response():
    with pytest.raises(ValueError):
        per_token_rewards(torch.tensor([1.0, 1.0]), LOGPS, REF, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 0.1)


def test_adaptive_kl_controller_by_hand():
    # KL 9 vs target 6: error 0.5 is clipped to 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.100512
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512)
    # KL 3: error −0.5 clipped to −0.2; β = 0.1·(1 − 0.00512) = 0.099488
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(torch.tensor(3.0), n_steps=256)
    assert ctl.value == pytest.approx(0.099488)
    # KL 6.6: error 0.1 (inside the clip); β = 0.1·(1 + 0.1·100/10000) = 0.1001
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(6.6, n_steps=100)
    assert ctl.value == pytest.approx(0.1001)
    # Checkpoint round trip.
    other = AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
    other.update(12.0, 10)
    ctl.update(12.0, 10)
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05


def test_response_kl_is_k1_on_response_tokens_only():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.7, -0.4, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # r = [[0.5, -1, 8.5], [0.5, 0, -2]]; the first row's last position is padding, so 0 there
    kl = response_kl(logps, ref, mask)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, 0.0, -2.0]]))
    assert kl.sum(1).tolist() == pytest.approx([-0.5, -1.5])


def test_rloo_kl_penalised_scores_by_hand():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, -1.0, 0.0], [0.5, 0.0, -2.0]])  # sums -0.5, -1.5
    # R − β·Σ kl with β = 0.1: 1 + 0.05 = 1.05; 0 + 0.15 = 0.15
    torch.testing.assert_close(kl_penalised_scores(scores, kl, 0.1), torch.tensor([1.05, 0.15]))
    torch.testing.assert_close(kl_penalised_scores(scores, kl, 0.0), torch.tensor([1.0, 0.0]))


def test_grpo_kl_loss_is_beta_times_the_token_mean_of_k3():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: its huge r must not count
    weighted, loss = kl_loss(logps, ref, mask, 0.2)
    # k3 of r = 0.5, -1: 0.10653066, 0.71828183; mean 0.41240624
    assert loss.item() == pytest.approx(0.41240624, abs=1e-7)
    assert weighted.item() == pytest.approx(0.2 * 0.41240624, abs=1e-7)
    weighted.backward()
    # d k3 / d logp = 1 − e^{−r}: 1 − e^{−0.5} = 0.39346934, 1 − e = −1.71828183; × β / 2 tokens
    assert logps.grad.tolist()[0] == pytest.approx([0.2 * 0.39346934 / 2, 0.2 * -1.71828183 / 2, 0.0], abs=1e-7)


def test_kl_controller_is_fixed_without_a_target():
    assert isinstance(kl_controller(0.05), FixedKLController)
    ctl = kl_controller(0.05, target=6.0, horizon=100)
    assert isinstance(ctl, AdaptiveKLController) and ctl.target == 6.0 and ctl.horizon == 100.0
