"""Interventions along a direction and the metrics that judge them.

Pure functions (shapes in comments; ``d`` is a unit vector (D,)):

* directional mean ablation: ``h - (h.d - m) d`` -- the component along d replaced by its mean m;
* activation patching along d: ``h_base + ((h_src - h_base).d) d`` -- the base keeps everything but
  its coordinate along d, which it takes from the source;
* logit difference between the positive and negative label tokens, zero-shot accuracy (ld > 0 is
  "positive"), and the fraction of above-chance accuracy an ablation removes.

And the model-running side: last-position logit differences over a text set, optionally with a
residual-stream edit that may depend on the batch's token ids (comma-only ablation).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor

from ankus.data.tokens import pad_id, position_ids_from_mask
from ankus.generation.engine import left_pad
from ankus.generation.hooks import edit_residual, residual_stream

__all__ = ["mean_ablate", "patch_along", "logit_diff", "accuracy", "fraction_removed", "content_mask", "encode",
           "last_logit_diffs", "mean_projections", "ablation_edit"]


def mean_ablate(h: Tensor, d: Tensor, mean_proj: float | Tensor) -> Tensor:
    """(..., D) -> (..., D): the coordinate along unit d set to ``mean_proj``, the rest unchanged."""
    proj = h @ d  # (...)
    return h + (mean_proj - proj).unsqueeze(-1) * d


def patch_along(h_base: Tensor, h_src: Tensor, d: Tensor) -> Tensor:
    """(..., D), (..., D) -> (..., D): base with its coordinate along unit d taken from the source."""
    return h_base + ((h_src - h_base) @ d).unsqueeze(-1) * d


def logit_diff(logits: Tensor, pos_id: int, neg_id: int) -> Tensor:
    """(B, V) -> (B,) logit of the positive label token minus the negative one."""
    return logits[:, pos_id] - logits[:, neg_id]


def accuracy(ld: Tensor, labels: Tensor) -> float:
    """(B,), (B,) in {0, 1} -> share of rows where ld > 0 exactly when the label is 1."""
    return float(((ld > 0).long() == labels.long()).float().mean())


def fraction_removed(acc_clean: float, acc_ablated: float, chance: float = 0.5) -> float:
    """Share of the above-chance accuracy an intervention removes: (clean - ablated) / (clean - chance);
    NaN when the clean accuracy is not above chance (nothing to remove)."""
    if acc_clean <= chance:
        return math.nan
    return (acc_clean - acc_ablated) / (acc_clean - chance)


def content_mask(mask: Tensor) -> Tensor:
    """(b, T) attention mask -> (b, T) bool: real tokens but each row's first. The first token's
    residual stream is an attention sink many times the others' norm (SmolLM2: ~750 vs ~110 at
    layer 6); means and ablations leave it out."""
    return mask.bool() & (position_ids_from_mask(mask) > 0)


def encode(tokenizer, texts: list[str], batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Left-padded (ids, mask) batches, (b, T) each."""
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [left_pad(ids[s:s + batch_size], pad_id(tokenizer)) for s in range(0, len(ids), batch_size)]


def _forward_last(model, ids: Tensor, mask: Tensor) -> Tensor:
    """(b, T) -> (b, V) logits at the last position (left padding: the last real token)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def last_logit_diffs(model, batches: list[tuple[Tensor, Tensor]], label_ids: tuple[int, int],
                     edit: Callable[[Tensor, Tensor], list[tuple[int, Callable]]] | None = None) -> Tensor:
    """(N,) label logit difference at each text's last token. ``edit(ids, mask)`` -> [(layer, fn)]:
    the residual-stream edits to apply after those layers for this batch."""
    device = next(model.parameters()).device
    out = []
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        with contextlib.ExitStack() as stack:
            for layer, fn in (edit(ids, mask) if edit is not None else []):
                stack.enter_context(edit_residual(model, layer, fn))
            logits = _forward_last(model, ids, mask)
        out.append(logit_diff(logits, *label_ids))
    return torch.cat(out)


@torch.no_grad()
def mean_projections(model, batches: list[tuple[Tensor, Tensor]], d: Tensor, layers: list[int],
                     select: Callable[[Tensor, Tensor], Tensor]) -> dict[int, float]:
    """{layer: mean of h.d over the selected tokens} (``select(ids, mask)`` -> (b, T) bool)."""
    device = next(model.parameters()).device
    d = d.to(device)
    sums, count = {layer: 0.0 for layer in layers}, 0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        sel = select(ids, mask)
        with residual_stream(model, layers) as acts:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1)
        for layer in layers:
            sums[layer] += float((acts[layer][0].float() @ d)[sel].sum())
        count += int(sel.sum())
    return {layer: s / max(count, 1) for layer, s in sums.items()}


def ablation_edit(d: Tensor, means: dict[int, float], select: Callable[[Tensor, Tensor], Tensor]):
    """An ``edit`` for :func:`last_logit_diffs`: mean-ablate d at every layer of ``means``, on the
    tokens ``select`` picks (positions elsewhere unchanged)."""
    def edit(ids: Tensor, mask: Tensor) -> list[tuple[int, Callable]]:
        sel = select(ids, mask).unsqueeze(-1)  # (b, T, 1)

        def at(m: float) -> Callable:
            return lambda h: torch.where(sel, mean_ablate(h, d.to(h.device, h.dtype), m), h)
        return [(layer, at(m)) for layer, m in means.items()]
    return edit
