"""One stream of forwards: a batch of sequences, its KV cache and attention mask.

A :class:`Branch` is what the sampling loop extends one token at a time (the conditional batch,
or classifier-free guidance's unconditional one). :func:`prefill` runs the prompts, :func:`decode`
feeds one token per row, :func:`keep_rows` drops finished rows (or repeats rows, for a prefill
shared by equal prompts: :func:`prefill_once_per_prompt`).

Caches are transformers' own, so any causal LM works: a ``StaticCache`` for the CUDA-graph path
(:mod:`ankus.generation.cuda_graphs`), otherwise a ``DynamicCache`` whose full-attention layers
write into a buffer allocated once per call (:func:`new_cache`): the ``torch.cat`` of every
layer's keys and values each step was 5-10% of a CPU decode step. Without padded rows no
attention mask is passed at all (plain causal attention). This module keeps no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ankus.generation.cuda_graphs import GraphSlot


@dataclass
class Branch:
    """The state of one batch of sequences being extended (the conditional or CFG's unconditional
    branch): a KV cache, a preallocated (B, P + N) attention mask of which ``length`` columns are
    in use, and the position id of each row's next token."""

    cache: object
    mask: Tensor  # (B, P + N) long
    length: int
    positions: Tensor  # (B, 1) long
    static: bool  # a StaticCache: the model sees the full-width mask every step
    padded: bool  # some row is left-padded; without padding the mask is plain causal and is not passed


def _growing_layer_class():
    """A ``DynamicLayer`` (attention sees exactly the tokens so far, rows can be dropped) that
    writes into a buffer allocated once for the whole generation instead of concatenating: the
    ``torch.cat`` of every layer's keys and values each step was ~10% of a CPU decode step."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = max_len
            self.length = 0

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            B, H, _, _ = key_states.shape
            self.device = key_states.device
            self.key_buf = key_states.new_zeros((B, H, self.max_len, key_states.shape[-1]))
            self.value_buf = value_states.new_zeros((B, H, self.max_len, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.max_len:
                raise RuntimeError(f"KV buffer of {self.max_len} positions overflowed")
            self.key_buf[:, :, self.length:end] = key_states
            self.value_buf[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.key_buf = self.key_buf.index_select(0, indices)
                self.value_buf = self.value_buf.index_select(0, indices)
                self.keys, self.values = self.key_buf[:, :, :self.length], self.value_buf[:, :, :self.length]

        def reset(self) -> None:
            self.length = 0
            self.is_initialized = False
            self.keys = self.values = None

    return PreallocatedLayer


def new_cache(model, static: bool, max_len: int):
    """A ``StaticCache`` (fixed shapes, for CUDA graphs), or a ``DynamicCache`` whose full-attention
    layers are preallocated; sliding-window and other special layers keep transformers' classes."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import DynamicLayer

    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    cache = DynamicCache(config=model.config)
    layer_cls = _growing_layer_class()
    cache.layers = [layer_cls(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def prefill(model, ids: Tensor, mask: Tensor, max_new: int, static: bool,
            slot: "GraphSlot | None" = None) -> tuple[Branch, Tensor]:
    """Run the prompts; returns the branch state and the (B, V) logits for the first new token.
    ``slot``: a kept static cache (and graph) to run in, reset first; its length may exceed P + N."""
    B, P = ids.shape
    width = slot.length if slot is not None else P + max_new
    full = torch.zeros((B, width), dtype=torch.long, device=ids.device)
    full[:, :P] = mask
    # Left padding: a row's first real token is position 0 (as transformers' generate does)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    if slot is not None:
        slot.cache.reset()  # in place: the captured graph keeps reading the same buffers
        cache = slot.cache
    else:
        cache = new_cache(model, static, P + max_new)
    # Without padding, no mask: attention is plain causal (sdpa's is_causal, or no mask at all for
    # one query), which skips building a (B, 1, q, kv) mask per step (transformers does the same)
    padded = bool((mask == 0).any())
    out = model(input_ids=ids, attention_mask=full if static else (mask if padded else None), position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1)
    branch = Branch(cache=cache, mask=full, length=P, positions=positions[:, -1:] + 1, static=static, padded=padded)
    return branch, out.logits[:, -1]


def prefill_once_per_prompt(model, ids: Tensor, mask: Tensor, max_new: int) -> tuple[Branch, Tensor]:
    """:func:`prefill` (dynamic cache) where equal prompt rows run once: k samples of one prompt
    (GRPO, RLOO, ``eval_samples``) share its prefill, whose cache rows are then repeated."""
    distinct, inverse = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return prefill(model, ids, mask, max_new, static=False)
    P = ids.shape[1]
    branch, logits = prefill(model, distinct[:, :P], distinct[:, P:], max_new, static=False)
    keep_rows(branch, inverse)  # (U, ...) -> (B, ...): row i gets its prompt's cache, mask and position
    return branch, logits[inverse]


def decode(model, branch: Branch, tokens: Tensor) -> Tensor:
    """Feed one token per row (B,); returns the (B, V) logits for the next."""
    branch.mask[:, branch.length] = 1
    branch.length += 1
    mask = branch.mask if branch.static else (branch.mask[:, :branch.length] if branch.padded else None)
    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=branch.positions,
                cache=branch.cache, use_cache=True, logits_to_keep=1)
    branch.positions = branch.positions + 1
    return out.logits[:, -1]


def keep_rows(branch: Branch, keep: Tensor) -> None:
    """Keep the rows ``keep`` of a (dynamic-cache) branch, in that order: its cache layers, mask and
    positions. Drops finished rows; with repeated indices it also repeats rows (a shared prefill)."""
    branch.cache.batch_select_indices(keep)
    branch.mask = branch.mask.index_select(0, keep)
    branch.positions = branch.positions.index_select(0, keep)
