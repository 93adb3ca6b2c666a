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

The learning rate re-warms after each reset: ``ankus.optim.jagged``.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

__all__ = ["lora_layers", "lora_parameters", "merge_and_reinit", "reset_optimizer_state", "update_rank"]

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
    The step count is kept, so Adam's bias correction does not re-inflate the fresh moments."""
    if mode not in ("full", "random", "magnitude"):
        raise ValueError(f"unknown optimizer reset '{mode}'; expected full, random or magnitude")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    for p in params:
        for key, value in optimizer.state.get(p, {}).items():
            if key == "step" or not torch.is_tensor(value) or value.shape != p.shape:
                continue
            if mode == "full" or ratio >= 1.0:
                value.zero_()
            elif mode == "random":
                keep = torch.rand(value.shape, generator=generator, dtype=torch.float32).to(value.device) >= ratio
                value.mul_(keep.to(value.dtype))
            else:
                k = int(round(ratio * value.numel()))  # entries pruned
                if k > 0:
                    threshold = value.abs().flatten().kthvalue(k).values
                    value.masked_fill_(value.abs() <= threshold, 0.0)


def update_rank(delta: Tensor, rtol: float = 1e-4) -> int:
    """Numerical rank of a weight update: singular values above ``rtol`` × the largest."""
    s = torch.linalg.svdvals(delta.double())
    return int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
