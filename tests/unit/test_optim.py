"""Learning-rate schedules against values computed by hand."""

import math

import pytest
import torch

from ankus.config import ConfigError, TrainerConfig
from ankus.optim import jagged, lr_multiplier, make_optimizer


def test_warmup_then_constant():
    # warmup 4: steps 0..3 run at 1/4, 2/4, 3/4, 4/4 of lr, then 1
    got = [lr_multiplier(s, warmup_steps=4, total_steps=10) for s in range(6)]
    assert got == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_to_min_ratio():
    f = lambda s: lr_multiplier(s, warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert f(0) == 0.5 and f(1) == 1.0
    assert f(2) == pytest.approx(1.0)                      # progress 0
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)          # progress 4/8 = 1/2: cos(pi/2) = 0
    assert f(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 2/8
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)


def test_warmup_stable_decay():
    f = lambda s: lr_multiplier(s, warmup_steps=1, total_steps=10, schedule="wsd", min_lr_ratio=0.0, decay_steps=4)
    # stable up to step 6 = total - decay, then linear 1 -> 0 at step 10 = total
    assert [f(s) for s in range(11)] == pytest.approx([1, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    # decay_steps 0 = the last 20%: total 10 -> 2 steps
    g = lambda s: lr_multiplier(s, warmup_steps=0, total_steps=10, schedule="wsd", min_lr_ratio=0.5)
    assert [g(s) for s in (7, 8, 9, 10)] == pytest.approx([1.0, 1.0, 0.75, 0.5])


def test_jagged_rewarms_after_each_reset():
    base = lambda s: 1.0 - s / 100
    f = jagged(base, restart_every=10, restart_warmup=4)
    assert [f(s) for s in range(4)] == [base(s) for s in range(4)]  # no re-warm before the first reset
    assert f(10) == pytest.approx(base(10) * 1 / 4)
    assert f(12) == pytest.approx(base(12) * 3 / 4)
    assert f(14) == base(14) and f(20) == pytest.approx(base(20) / 4)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown lr_schedule 'linear'"):
        lr_multiplier(0, warmup_steps=0, total_steps=1, schedule="linear")


def test_make_optimizer_follows_the_schedule():
    w = torch.nn.Parameter(torch.zeros(3))
    tc = TrainerConfig(lr=0.1, warmup_steps=2, total_steps=4, lr_schedule="cosine", min_lr_ratio=0.0)
    opt, sched = make_optimizer([w], tc)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05])
    assert (w != 0).all()
