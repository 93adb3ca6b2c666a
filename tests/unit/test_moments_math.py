"""The moments audits' math: n-gram statistics and KL by hand, max-entropy samplers, the Gaussian OT map."""

import numpy as np
import pytest
import torch

from ankus.audits import moments_math as mm


def test_unigram_and_bigram_add_k_by_hand():
    tokens = np.array([0, 1, 1, 2])
    # counts [1, 2, 1, 0] + 1 over 4 + 4
    np.testing.assert_allclose(mm.unigram_probs(tokens, 4, 1.0), np.array([2, 3, 2, 1]) / 8)
    np.testing.assert_allclose(mm.unigram_probs(tokens, 4, 0.0), np.array([1, 2, 1, 0]) / 4)
    counts = mm.bigram_counts(tokens, 4)  # pairs (0,1) (1,1) (1,2)
    assert counts.toarray().tolist() == [[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    rows = mm.bigram_probs(counts, np.array([1, 0, 3]), 1.0)
    np.testing.assert_allclose(rows[0], np.array([1, 2, 2, 1]) / 6)
    np.testing.assert_allclose(rows[1], np.array([1, 2, 1, 1]) / 5)
    np.testing.assert_allclose(rows[2], np.full(4, 0.25))  # an unseen context: k alone, uniform
    fallback = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(mm.bigram_probs(counts, np.array([3, 1]), 0.0, fallback),
                               [fallback, [0, 0.5, 0.5, 0]])


def test_kl_by_hand_and_model_ngram_kl():
    logp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert float(mm.kl_rows(logp, logq)[0]) == pytest.approx(0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0))
    assert float(mm.kl_rows(logp, logp)[0]) == 0.0
    # a model that predicts exactly the unigram / the bigram row has KL 0 to it
    tokens = np.array([0, 1, 1, 2, 0, 1])
    uni = mm.unigram_probs(tokens, 3, 1.0)
    counts = mm.bigram_counts(tokens, 3)
    prev = np.array([1, 0])
    logits = torch.from_numpy(np.log(np.stack([uni, uni])))
    padded = torch.cat([logits, torch.full((2, 2), -1e9, dtype=torch.float64)], dim=1)  # a padded vocabulary
    kl_u, kl_b, kl_bu = mm.model_ngram_kl(padded, prev, uni, counts, 1.0)
    np.testing.assert_allclose(kl_u.numpy(), 0.0, atol=1e-6)
    b = mm.bigram_probs(counts, prev, 1.0)
    want = (uni[None] * (np.log(uni[None]) - np.log(b))).sum(1)
    np.testing.assert_allclose(kl_b.numpy(), want, rtol=1e-5)
    _, kl_b2, _ = mm.model_ngram_kl(torch.from_numpy(np.log(b)), prev, uni, counts, 1.0)
    np.testing.assert_allclose(kl_b2.numpy(), 0.0, atol=1e-6)
    # smoothing toward the unigram: pseudo-counts k V u(w); row 1 = [0, 1, 1] + 3 u, row 0 = [0, 2, 0] + 3 u
    bu = mm.bigram_probs(counts, prev, 1.0, toward=uni)
    np.testing.assert_allclose(bu[0], (np.array([0, 1, 1]) + 3 * uni) / (2 + 3))
    np.testing.assert_allclose(bu[1], (np.array([0, 2, 0]) + 3 * uni) / (2 + 3))
    want_u = (uni[None] * (np.log(uni[None]) - np.log(bu))).sum(1)
    np.testing.assert_allclose(kl_bu.numpy(), want_u, rtol=1e-5)
    _, _, kl_bu2 = mm.model_ngram_kl(torch.from_numpy(np.log(bu)), prev, uni, counts, 1.0)
    np.testing.assert_allclose(kl_bu2.numpy(), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="k must be > 0"):
        mm.model_ngram_kl(padded, prev, uni, counts, 0.0)


def test_ngram_samplers_follow_their_models():
    rng = np.random.default_rng(0)
    probs = np.array([0.5, 0.3, 0.2, 0.0])
    s = mm.sample_unigram(probs, 200, 50, rng)
    np.testing.assert_allclose(np.bincount(s.ravel(), minlength=4) / s.size, probs, atol=0.01)
    # a deterministic cycle 0 -> 1 -> 2 -> 0: with k = 0 every chain follows it
    counts = mm.bigram_counts(np.array([0, 1, 2, 0, 1, 2, 0]), 3)
    chains = mm.sample_bigram(counts, np.array([1.0, 0.0, 0.0]), 0.0, 5, 7, rng)
    assert chains.tolist() == [[0, 1, 2, 0, 1, 2, 0]] * 5
    assert mm.ngram_nll(chains, np.array([1.0, 0.0, 0.0]), counts, 0.0) == 0.0
    assert mm.unigram_entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(np.log(2))
    assert mm.ngram_nll(np.array([[0, 1, 1]]), np.array([0.5, 0.25, 0.25]), None, 0.0) == pytest.approx(np.log(4))


def test_maxent_box_matches_the_mean_and_is_the_truncated_exponential():
    assert mm.maxent_box_mean(np.array([0.0]))[0] == 0.5
    lam = np.array([2.0])  # by hand: 1 / (1 - e^-2) - 1/2
    assert mm.maxent_box_mean(lam)[0] == pytest.approx(1 / (1 - np.exp(-2)) - 0.5)
    assert mm.maxent_box_mean(-lam)[0] == pytest.approx(1 - (1 / (1 - np.exp(-2)) - 0.5))
    means = np.array([0.02, 0.2, 0.5, 0.7, 0.97])
    np.testing.assert_allclose(mm.maxent_box_mean(mm.maxent_box_lambda(means)), means, atol=1e-9)
    x = mm.sample_maxent_box(means, 20000, np.random.default_rng(1))
    assert x.min() >= 0 and x.max() <= 1
    np.testing.assert_allclose(x.mean(0), means, atol=0.01)
    # the uniform coordinate (mean 1/2) has variance 1/12
    assert x[:, 2].var() == pytest.approx(1 / 12, abs=0.003)


def test_gaussian_ot_map_moves_the_moments_onto_the_target():
    rng = np.random.default_rng(2)
    x1 = rng.standard_normal((400, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 2.0]]) + 1.0
    x2 = rng.standard_normal((300, 3)) @ np.array([[0.4, 0.0, 0.0], [0.7, 1.5, 0.0], [0.1, 0.0, 0.3]]) - 2.0
    m1, s1 = mm.gaussian_fit(x1)
    m2, s2 = mm.gaussian_fit(x2)
    a, b = mm.gaussian_ot_map(m1, s1, m2, s2)
    np.testing.assert_allclose(a, a.T, atol=1e-12)
    assert np.linalg.eigvalsh(a).min() > 0  # a gradient of a convex function
    np.testing.assert_allclose(a @ s1 @ a, s2, atol=1e-9)
    moved = mm.apply_map(x1, a, b)
    mm_, ms = mm.gaussian_fit(moved)
    np.testing.assert_allclose(mm_, m2, atol=1e-9)
    np.testing.assert_allclose(ms, s2, atol=1e-9)
    # 1-D: affine with slope sigma2 / sigma1
    a1, b1 = mm.gaussian_ot_map(np.array([1.0]), np.array([[4.0]]), np.array([-3.0]), np.array([[9.0]]))
    assert a1[0, 0] == pytest.approx(1.5) and b1[0] == pytest.approx(-3.0 - 1.5)
    # the same map as scipy's sqrtm
    from scipy.linalg import sqrtm

    r = np.real(sqrtm(s1))
    ri = np.linalg.inv(r)
    np.testing.assert_allclose(a, ri @ np.real(sqrtm(r @ s2 @ r)) @ ri, atol=1e-8)
    g = mm.sample_gaussian(m2, s2, 50000, rng)
    np.testing.assert_allclose(np.cov(g.T, bias=True), s2, atol=0.05)
    with pytest.raises(ValueError, match="ridge"):
        mm.gaussian_ot_map(m1, np.zeros((3, 3)), m2, s2)
