"""Masked statistics, whitening and running moments: hand numbers, invariants, 2 ranks."""

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ankus.rl.stats import RunningMoments, masked_mean, masked_var, masked_whiten


class ThreadSumReduce:
    """Simulates a sum all-reduce between n ranks running in n threads."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n)
        self.slots: list = [None] * n

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()  # nobody overwrites a slot before all have summed
            return total

        return reduce


def run_ranks(n: int, fn):
    """Run fn(rank, reduce) in n threads; return the results by rank."""
    sim = ThreadSumReduce(n)
    results: list = [None] * n
    errors: list = []

    def target(rank):
        try:
            results[rank] = fn(rank, sim.for_rank(rank))
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)
            sim.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]
    return results


X = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_masked_mean_and_var_by_hand():
    # Valid values 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5.
    assert masked_mean(X, MASK).item() == pytest.approx(2.5)
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(X, MASK, unbiased=True).item() == pytest.approx(5 / 3)
    # Per row: (1+2+3)/3 = 2 and 4/1 = 4.
    assert torch.allclose(masked_mean(X, MASK, dim=1), torch.tensor([2.0, 4.0]))
    # Float mask gives the same thing as bool.
    assert masked_mean(X, MASK.float()).item() == pytest.approx(2.5)


def test_masked_mean_empty_mask_is_zero_not_nan():
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0


def test_masked_whiten_by_hand():
    out = masked_whiten(X, MASK)
    s = math.sqrt(1.25 + 1e-8)
    expected = torch.tensor([[(1 - 2.5) / s, (2 - 2.5) / s, (3 - 2.5) / s, 0.0], [(4 - 2.5) / s, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    # shift_mean=False keeps the mean: x/σ-scaled deviations plus 2.5 on valid tokens.
    kept = masked_whiten(X, MASK, shift_mean=False)
    assert torch.allclose(kept, (expected + 2.5) * MASK, atol=1e-6)


def test_masked_whiten_ignores_padding_values():
    garbage = X.clone()
    garbage[~MASK] = torch.tensor([100.0, -7.0, 1e4, 3.0])
    assert torch.equal(masked_whiten(X, MASK), masked_whiten(garbage, MASK))
    out = masked_whiten(garbage, MASK)
    assert torch.all(out[~MASK] == 0)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_masked_whiten_moments_property(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + 5
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padded
    mask[0, :2] = True  # at least two valid values so the variance is not 0
    out = masked_whiten(x, mask)
    vals = out[mask].numpy()
    assert abs(vals.mean()) < 1e-9
    # population variance: exactly sigma^2 / (sigma^2 + eps), eps = 1e-8 (near 1 unless sigma is tiny)
    var = float(x[mask].var(unbiased=False))
    assert vals.var() == pytest.approx(var / (var + 1e-8), abs=1e-9)
    assert torch.all(out[~mask] == 0)
    # Independent of the padding's content.
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), generator=g, dtype=torch.float64) * 100
    assert torch.equal(out, masked_whiten(x2, mask))


def test_masked_stats_two_ranks_equal_one_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 2 + 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()

    def per_rank(rank, reduce):
        rows = slice(2 * rank, 2 * rank + 2)
        return (
            masked_mean(x[rows], mask[rows], reduce=reduce),
            masked_var(x[rows], mask[rows], reduce=reduce),
            masked_whiten(x[rows], mask[rows], reduce=reduce),
        )

    (m0, v0, w0), (m1, v1, w1) = run_ranks(2, per_rank)
    assert torch.allclose(m0, masked_mean(x, mask)) and torch.allclose(m1, m0)
    assert torch.allclose(v0, masked_var(x, mask)) and torch.allclose(v1, v0)
    assert torch.allclose(torch.cat([w0, w1]), masked_whiten(x, mask), atol=1e-6)
    # Sanity: a rank alone (no reduce) would get a different mean.
    assert not torch.allclose(masked_mean(x[:2], mask[:2]), masked_mean(x, mask))


BATCHES = [
    np.array([1.0, 2.0, 3.0]),
    np.array([10.0, -4.0, 0.5, 7.0, 2.0]),
    np.array([3.0]),
    np.array([0.1, 0.2, -0.3, 5.0, 9.0, -2.0, 1.0]),
]


def test_running_moments_matches_numpy():
    rm = RunningMoments()
    seen = []
    for b in BATCHES:
        batch_mean, batch_std = rm.update(torch.tensor(b, dtype=torch.float32))
        seen.append(b)
        allv = np.concatenate(seen)
        assert rm.mean == pytest.approx(allv.mean(), rel=1e-6)
        assert rm.std == pytest.approx(allv.std(ddof=1), rel=1e-6)
        assert batch_mean == pytest.approx(b.mean(), rel=1e-6)
        if len(b) > 1:
            assert batch_std == pytest.approx(b.std(ddof=1), rel=1e-6)
    assert rm.count == 16


def test_running_moments_by_hand_and_resume():
    rm = RunningMoments()
    assert rm.std == 1.0  # nothing seen: dividing by it changes nothing
    rm.update(torch.tensor([1.0, 3.0]))  # mean 2, M2 = 1 + 1 = 2
    rm.update(torch.tensor([5.0, 7.0]))  # all four: mean 4, M2 = 9 + 1 + 1 + 9 = 20, sample var 20/3
    assert rm.mean == pytest.approx(4.0)
    assert rm.std == pytest.approx(math.sqrt(20 / 3))
    # A checkpointed copy continues exactly like the original.
    state = rm.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    resumed = RunningMoments()
    resumed.load_state_dict(state)
    for r in (rm, resumed):
        r.update(torch.tensor([-2.0, 0.0, 11.0]))
    assert resumed.state_dict() == rm.state_dict()


def test_running_moments_two_ranks_equal_one_rank():
    single = RunningMoments()
    single_out = [single.update(torch.tensor(b)) for b in BATCHES if len(b) > 1]

    def per_rank(rank, reduce):
        rm = RunningMoments(reduce=reduce)
        outs = []
        for b in BATCHES:
            if len(b) < 2:
                continue
            half = len(b) // 2
            part = b[:half] if rank == 0 else b[half:]  # uneven halves on purpose
            outs.append(rm.update(torch.tensor(part)))
        return rm.state_dict(), outs

    (s0, o0), (s1, o1) = run_ranks(2, per_rank)
    assert s0 == pytest.approx(s1)
    assert s0 == pytest.approx(single.state_dict())
    flat = [v for pair in single_out for v in pair]
    assert [v for pair in o0 for v in pair] == pytest.approx(flat)
    assert [v for pair in o1 for v in pair] == pytest.approx(flat)
