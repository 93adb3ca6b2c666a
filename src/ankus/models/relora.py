"""ReLoRA (Lialin et al. 2023): high-rank training through a sequence of low-rank updates.

peft has no ReLoRA; this module adds the three operations it needs on top of a peft LoRA model
(``ankus.models.lora.apply_lora``):

* :func:`merge_and_reinit` — every ``reset_every`` steps, fold each adapter into its frozen
  weight, ``W += B·A·alpha/r`` (peft's ``get_delta_weight``, so GPT-2's transposed Conv1D is
  handled), then restart it: A from a Kaiming-uniform draw (as ``nn.Linear`` initialises, and as
  peft does), B = 0. The model's function is unchanged by a reset; the sum of the merged updates
  can have rank up to (number of resets + 1)·r.
* :func:`reset_optimizer_state` — Adam's moments of the adapter parameters only: zeroed
  (``full``), or pruned to a fraction ``ratio`` of entries set to zero at random (``random``) or
  the smallest by magnitude (``magnitude``; the paper's choice, ratio 0.99). Without it the
  stale moments of the old A and B push the fresh ones along the old direction.
* :func:`update_rank` — the numerical rank of an accumulated weight update.

The learning rate re-warms after each reset: ``ankus.optim.jagged``. With ``train_embeddings``
the embeddings, output head and norms (:func:`full_parameters`) train in full beside the
adapters, as in the paper; a restart leaves them and their moments alone.

The pretrain trainer's ``relora:`` section (:class:`ReLoRAConfig`) runs them through three calls:
:func:`apply_relora` once (wrap, freeze, the optimizer's parameters and LR multiplier),
:func:`relora_phase` after a resume, and :func:`relora_step` before every optimizer step. What
happens at a step is a function of the step only (the reset index seeds the new A matrices and
the random pruning), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn

from ankus.config import ConfigError, LoRAConfig, TrainerConfig, reject_unused

__all__ = ["lora_layers", "lora_parameters", "full_parameters", "relora_trainable", "merge_and_reinit",
           "reset_optimizer_state", "update_rank",
           "ReLoRAConfig", "check_relora", "relora_multiplier", "apply_relora", "relora_phase", "relora_step"]

PruneMode = Literal["full", "random", "magnitude"]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) for every adapted layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices (what ReLoRA trains and resets)."""
    return [p for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for m in d.values()
            for p in m.parameters()]


def full_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What ``relora.train_embeddings`` trains in full next to the adapters: the input embeddings,
    the output head (once when tied) and every norm layer's weights, less anything inside an
    adapted layer. They are plain parameters of the base model, so merging and saving need nothing
    more, and a restart leaves them (and their Adam moments) alone."""
    adapted = {id(p) for _, layer in lora_layers(model) for p in layer.parameters()}
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    modules += [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    out: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters() if m is not None else ():
            if id(p) not in adapted:
                out.setdefault(id(p), p)
    return list(out.values())


def relora_trainable(model: nn.Module, rc: ReLoRAConfig) -> list[nn.Parameter]:
    """The parameters trained after the warm start: the adapters, plus the embeddings, head and
    norms with ``relora.train_embeddings``."""
    return lora_parameters(model) + (full_parameters(model) if rc.train_embeddings else [])


@torch.no_grad()
def merge_and_reinit(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Fold every adapter into its base weight and restart it (A Kaiming-uniform, B zero).

    ``generator`` draws the new A matrices (seed it from the run seed and the reset index so
    that processes, resumed runs and reruns agree). Returns the number of layers merged.
    """
    n = 0
    for _, layer in lora_layers(model):
        base = layer.get_base_layer()
        for adapter in list(layer.lora_A):
            base.weight += layer.get_delta_weight(adapter).to(base.weight.dtype)
            a = layer.lora_A[adapter].weight
            # nn.Linear's own init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32).to(a) * 2 * bound - bound)
            layer.lora_B[adapter].weight.zero_()
        n += 1
    return n


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: list[Tensor], mode: PruneMode = "magnitude",
                          ratio: float = 0.99, generator: torch.Generator | None = None) -> None:
    """Zero (``full``) or prune (``random``, ``magnitude``: a fraction ``ratio`` of the entries set
    to 0) every moment tensor the optimizer keeps for ``params``; other parameters are untouched.

    One mask per parameter, applied to all of its moments: random, or the smallest entries of the
    first moment (``exp_avg``, else the first moment-shaped tensor) by magnitude. Pruning the first
    and second moments apart would keep some ``exp_avg`` entries whose ``exp_avg_sq`` is gone, and
    Adam's next step there, m / sqrt(v) with v rebuilt from one gradient, is many times too large
    (a loss spike at the reset). The step count is kept, so Adam's bias correction does not
    re-inflate the fresh moments."""
    if mode not in ("full", "random", "magnitude"):
        raise ValueError(f"unknown optimizer reset '{mode}'; expected full, random or magnitude")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    for p in params:
        state = optimizer.state.get(p, {})
        moments = {k: v for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.shape == p.shape}
        if not moments:
            continue
        if mode == "full" or ratio >= 1.0:
            keep = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        elif mode == "random":
            keep = torch.rand(p.shape, generator=generator, dtype=torch.float32).to(p.device) >= ratio
        else:
            first = moments.get("exp_avg", next(iter(moments.values()))).abs()
            k = int(round(ratio * first.numel()))  # entries pruned
            keep = first > first.flatten().kthvalue(k).values if k > 0 else torch.ones_like(first, dtype=torch.bool)
        for value in moments.values():
            value.mul_(keep.to(value.dtype))


def update_rank(delta: Tensor, rtol: float = 1e-4) -> int:
    """Numerical rank of a weight update: singular values above ``rtol`` × the largest."""
    s = torch.linalg.svdvals(delta.double())
    return int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0


# ---------------------------------------------------------------------------------------------
# ReLoRA in a training loop


@dataclass
class ReLoRAConfig:
    enabled: bool = False
    """Train through ReLoRA: LoRA adapters merged into their weights and restarted every reset_every steps."""
    r: int = 128
    """Adapter rank (the paper's 128)."""
    alpha: float = 32.0
    """The update is scaled by alpha / r (the paper's 32)."""
    dropout: float = 0.0
    """Dropout on the adapters' input; the reference uses 0.1, 0 here as pretraining runs without dropout."""
    target: list[str] = field(default_factory=list)
    """Module names to adapt; empty = every linear layer of attention and MLP (not the output head)."""
    reset_every: int = 1000
    """Steps between merges-and-restarts, counted from the end of the warm start."""
    restart_warmup: int = 50
    """LR re-warm-up steps after each restart (linear from 0; the paper's 50-100)."""
    prune: Literal["full", "random", "magnitude"] = "magnitude"
    """Optimizer reset of the adapters' Adam moments at a restart (the reference recommends magnitude)."""
    prune_ratio: float = 0.9
    """Fraction of the moments' entries set to zero by random/magnitude pruning (README: 0.9)."""
    warm_start_steps: int = 0
    """Full-rank steps (every weight trains) before the adapters are put on."""
    train_embeddings: bool = False
    """Also train the input embeddings, the output head and the norms in full alongside the adapters
    (the paper's setup); their Adam moments are kept at a restart. False: the adapters alone train."""


def check_relora(rc: ReLoRAConfig, tc: TrainerConfig, trainer: str) -> None:
    """ConfigError naming the field for a ReLoRA setting that cannot run."""
    if not rc.enabled:
        reject_unused(rc, ["r", "alpha", "dropout", "target", "reset_every", "restart_warmup", "prune", "prune_ratio",
                           "warm_start_steps", "train_embeddings"], trainer, "unless relora.enabled is true", "relora")
        return
    if tc.fsdp:
        raise ConfigError(f"trainer.fsdp with relora.enabled is not supported by the {trainer} trainer: the merge "
                          "needs each adapted weight whole on every process; turn one of them off")
    for name in ("r", "reset_every"):
        if getattr(rc, name) <= 0:
            raise ConfigError(f"relora.{name} must be > 0 for the {trainer} trainer, got {getattr(rc, name)}")
    for name in ("restart_warmup", "warm_start_steps"):
        if getattr(rc, name) < 0:
            raise ConfigError(f"relora.{name} must be >= 0 for the {trainer} trainer, got {getattr(rc, name)}")
    if not 0.0 <= rc.prune_ratio <= 1.0:
        raise ConfigError(f"relora.prune_ratio must be in [0, 1] for the {trainer} trainer, got {rc.prune_ratio}")
    if rc.restart_warmup > rc.reset_every:
        raise ConfigError(f"relora.restart_warmup ({rc.restart_warmup}) exceeds relora.reset_every "
                          f"({rc.reset_every}) in the {trainer} trainer: the LR would never reach the schedule")


def relora_multiplier(base: Callable[[int], float], warm_start: int, reset_every: int,
                      restart_warmup: int) -> Callable[[int], float]:
    """The LR multiplier of a ReLoRA run: ``base`` during the warm start, then ``base`` re-warmed
    linearly over ``restart_warmup`` steps from every restart at ``warm_start + k·reset_every``
    (k >= 1), and from ``warm_start`` itself when there is a warm start (the adapters' optimizer
    starts empty there too). With no warm start this is ``ankus.optim.jagged(base, ...)``."""
    from ankus.optim import jagged

    shifted = jagged(lambda s: base(s + warm_start), reset_every, restart_warmup)

    def multiplier(step: int) -> float:
        if step < warm_start:
            return base(step)
        since = step - warm_start
        if warm_start > 0 and since < restart_warmup:
            return base(step) * (since + 1) / restart_warmup
        return shifted(since)

    return multiplier


def apply_relora(model: nn.Module, rc: ReLoRAConfig, tc: TrainerConfig) -> tuple[nn.Module, list[nn.Parameter],
                                                                                  Callable[[int], float]]:
    """``(peft model, the optimizer's parameters, LR multiplier)`` for a run starting at step 0.

    The optimizer holds the adapters only, or every parameter when there is a warm start (a
    parameter without a gradient is skipped by AdamW, and its moments are dropped at the switch).
    """
    from ankus.models.lora import apply_lora
    from ankus.optim import schedule_fn

    model = apply_lora(model, LoRAConfig(True, r=rc.r, alpha=rc.alpha, dropout=rc.dropout, target=list(rc.target)))
    relora_phase(model, rc, 0)
    params = list(model.parameters()) if rc.warm_start_steps > 0 else relora_trainable(model, rc)
    return model, params, relora_multiplier(schedule_fn(tc), rc.warm_start_steps, rc.reset_every, rc.restart_warmup)


def relora_phase(model: nn.Module, rc: ReLoRAConfig, step: int) -> None:
    """What trains at ``step``: every weight with the adapters off during the warm start, the
    adapters (and with ``train_embeddings`` the embeddings, head and norms) after it."""
    full_rank = step < rc.warm_start_steps
    adapters = {id(p) for p in lora_parameters(model)}
    trained = {id(p) for p in relora_trainable(model, rc)}
    if full_rank:
        model.base_model.disable_adapter_layers()
    else:
        model.base_model.enable_adapter_layers()
    for p in model.parameters():
        p.requires_grad_(id(p) not in adapters if full_rank else id(p) in trained)


def relora_step(model: nn.Module, optimizer: torch.optim.Optimizer, rc: ReLoRAConfig, step: int,
                seed: int) -> dict[str, float]:
    """Call before optimizer step ``step``: at the end of the warm start switch to the adapters
    (dropping the moments of the parameters that stop training), at every restart merge, re-draw A (a generator
    seeded by ``seed`` and the restart index), zero B and prune the adapters' moments.
    Returns ``{"relora/restart": k}`` at the k-th restart, else ``{}``."""
    w = rc.warm_start_steps
    if w > 0 and step == w:
        relora_phase(model, rc, step)
        lora = {id(p) for p in relora_trainable(model, rc)}
        for p in [p for p in optimizer.state if id(p) not in lora]:
            del optimizer.state[p]
        return {"relora/restart": 0}
    k, since = divmod(step - w, rc.reset_every)
    if step < w or k == 0 or since != 0:
        return {}
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    merge_and_reinit(model, g)
    reset_optimizer_state(optimizer, lora_parameters(model), rc.prune, rc.prune_ratio, g)
    return {"relora/restart": k}
