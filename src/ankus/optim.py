"""The optimizer and learning-rate schedule every trainer builds the same way.

A schedule is a pure function ``step -> multiplier of trainer.lr``; :func:`make_optimizer` wraps
AdamW and a ``LambdaLR`` over it. Step ``s`` is the optimizer step about to be taken (the first
is 0), so with ``warmup_steps = W`` the first step runs at ``lr / W``.

* ``constant``: 1 after warm-up.
* ``cosine``: half a cosine from 1 at the end of warm-up to ``min_lr_ratio`` at ``total_steps``,
  then flat.
* ``wsd`` (warmup-stable-decay): 1 until the last ``decay_steps`` steps, then a straight line
  to ``min_lr_ratio`` at ``total_steps``.

Re-warming for continued pre-training (Gupta et al. 2023) is no separate schedule: a new run
from the old checkpoint's weights with its own ``warmup_steps``, ``lr`` (the new maximum) and
decay. The jagged cosine of ReLoRA (Lialin et al. 2023) is :func:`jagged`: any schedule times a
short re-warm-up from zero after every adapter reset.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ankus.config import ConfigError, TrainerConfig

__all__ = ["lr_multiplier", "jagged", "schedule_fn", "make_optimizer"]

SCHEDULES = ("constant", "cosine", "wsd")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "constant",
                  min_lr_ratio: float = 0.1, decay_steps: int = 0) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown lr_schedule '{schedule}'; expected one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay = decay_steps if decay_steps > 0 else max(round(0.2 * total_steps), 1)
    start = total_steps - decay
    if step < start:
        return 1.0
    progress = min((step - start) / decay, 1.0)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def jagged(base: Callable[[int], float], restart_every: int, restart_warmup: int) -> Callable[[int], float]:
    """``base`` with a linear re-warm-up over ``restart_warmup`` steps after every reset at
    steps ``restart_every, 2·restart_every, ...`` (ReLoRA's jagged schedule): at a reset the
    multiplier drops to ``base(s) / restart_warmup`` and climbs back to ``base(s)``."""
    if restart_every <= 0 or restart_warmup <= 0:
        return base

    def multiplier(step: int) -> float:
        since = step % restart_every
        if step >= restart_every and since < restart_warmup:
            return base(step) * (since + 1) / restart_warmup
        return base(step)

    return multiplier


def schedule_fn(tc: TrainerConfig) -> Callable[[int], float]:
    """``trainer.*``'s schedule as a function of the optimizer step."""
    if tc.lr_schedule not in SCHEDULES:
        raise ConfigError(f"trainer.lr_schedule: unknown schedule '{tc.lr_schedule}'; "
                          f"expected one of {', '.join(SCHEDULES)}")
    return lambda s: lr_multiplier(s, warmup_steps=tc.warmup_steps, total_steps=tc.total_steps,
                                   schedule=tc.lr_schedule, min_lr_ratio=tc.min_lr_ratio,
                                   decay_steps=tc.decay_steps)


def make_optimizer(params: Iterable, tc: TrainerConfig, *, multiplier: Callable[[int], float] | None = None,
                   fused: bool = False) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``trainer.*``'s lr, betas, eps and weight decay over ``params`` (tensors or
    param-group dicts), and a ``LambdaLR`` following ``multiplier`` (default: :func:`schedule_fn`).
    ``fused=True`` updates every tensor in one kernel (CPU and CUDA; a few times less optimizer
    time, rounding differs from the default loop in the last bits)."""
    params = list(params)
    if fused:
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = all(p.device.type in ("cpu", "cuda") for p in tensors)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay,
                            **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier or schedule_fn(tc))
    return opt, sched
