"""CUDA: the decode step on a static KV cache, captured once as a CUDA graph and replayed.

On a GPU a small model's decode step is bound by launching its hundreds of small kernels one by
one (~20 ms a step in transformers' ``generate``). Here the step runs on a preallocated
``StaticCache`` with fixed-shape inputs and is captured as a CUDA graph, then replayed each step
(:func:`static_step`): one launch per step. On an H100 (benchmarks/generation.py) this is
4.6-5.4x transformers' ``generate`` for a 135M model at batch 64 and 3.0-3.5x for a 1B one.
The replayed graph is then most of a step, bound by its count of small kernels, so
``compile=True`` (opt-in) runs ``torch.compile`` on the forward before capture to fuse them:
7.5x at 135M, for ~30 s of compiling per shape.

Module-level caches (filled by ``generate`` on CUDA; both hold GPU memory or compiled code):

* ``_SLOTS``: (model id, branch tag, batch, cache length, dtype, device, compiled) ->
  :class:`GraphSlot` (static cache, input buffers, captured graph), at most ``_MAX_SLOTS``,
  least recently used first out (cache lengths are rounded up to a multiple of 64), so a steady
  stream of same-shaped batches, PPO's rollout chunks or a server's, captures once. A slot whose
  model is gone is dropped at the next lookup. Freed by :func:`release_graphs`.
* ``_COMPILED``: model -> ``torch.compile(model)`` for ``compile=True``; weakly keyed, but the
  compiled wrapper refers to its model, so an entry lives until :func:`release_compiled`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ankus.generation.kv_cache import Branch, new_cache


def _sharded(model) -> bool:
    """An FSDP-sharded model (its forward hooks gather parameters; see ankus.distributed)."""
    try:
        from ankus.distributed import is_sharded

        return is_sharded(model)
    except ImportError:  # a torch build without torch.distributed
        return False


def graph_safe(model) -> bool:
    """Full attention in every layer, through sdpa or eager attention: our own 4-D additive mask
    is then exactly the model's mask (flash-attention kernels want 2-D masks instead). Not a
    sharded model: its forward runs FSDP's hooks, which a graph replay would skip."""
    if _sharded(model):
        return False
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(cfg, "sliding_window", None) in (None, 0) and not getattr(cfg, "is_encoder_decoder", False)


def additive_mask(mask2d: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L) 0 / dtype-min: a one-query attention bias that sdpa and eager
    attention both accept. Causality is implicit: columns past the current token are still 0."""
    return torch.zeros(mask2d.shape, dtype=dtype, device=mask2d.device).masked_fill(
        mask2d == 0, torch.finfo(dtype).min)[:, None, None, :]


@dataclass(eq=False)
class GraphSlot:
    """What a captured decode step reads and writes, kept between calls: the static cache, the
    input buffers (token, position, 4-D additive mask) and the graph with its output."""

    model: "weakref.ref"
    weights: int  # data pointer of the first parameter: a model whose weights moved needs a new slot
    cache: object
    length: int  # the cache's positions
    tok_buf: Tensor  # (B, 1)
    pos_buf: Tensor  # (B, 1)
    mask_buf: Tensor  # (B, 1, 1, length)
    graph: object = None  # torch.cuda.CUDAGraph once captured; False if capture failed
    logits: Tensor | None = None  # the graph's output buffer
    warm: bool = False  # one eager step has run (kernels and allocator warmed up before capture)


_SLOTS: "dict[tuple, GraphSlot]" = {}  # insertion order = least recently used first
_MAX_SLOTS = 4


def graph_slot(model, tag: int, batch: int, length: int, dtype: torch.dtype, compiled: bool = False) -> GraphSlot:
    """The kept slot for (model, branch tag, batch size, cache length, dtype), made if missing.
    ``length`` is rounded up to a multiple of 64 so that prompts of similar lengths share one."""
    length = -(-length // 64) * 64
    first = next(model.parameters())
    key = (id(model), tag, batch, length, dtype, first.device, compiled)
    for stale in [k for k, v in _SLOTS.items() if v.model() is None]:  # its model is gone: free its buffers
        del _SLOTS[stale]
    slot = _SLOTS.pop(key, None)
    if slot is None or slot.model() is not model or slot.weights != first.data_ptr():
        dev = first.device
        slot = GraphSlot(model=weakref.ref(model), weights=first.data_ptr(), cache=new_cache(model, True, length),
                         length=length, tok_buf=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                         pos_buf=torch.zeros((batch, 1), dtype=torch.long, device=dev),
                         mask_buf=torch.zeros((batch, 1, 1, length), dtype=dtype, device=dev))
    _SLOTS[key] = slot  # most recently used last
    while len(_SLOTS) > _MAX_SLOTS:
        _SLOTS.pop(next(iter(_SLOTS)))
    return slot


def release_graphs() -> int:
    """Drop every kept CUDA graph and static cache (their GPU memory returns to torch's allocator);
    returns how many there were. Later calls capture again."""
    n = len(_SLOTS)
    _SLOTS.clear()
    return n


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> torch.compile(model)


def static_step(model, branch: Branch, dtype: torch.dtype, capture: bool,
                slot: GraphSlot | None = None, compiled: bool = False) -> Callable[[Tensor], Tensor]:
    """A decode step with the same contract as :func:`~ankus.generation.kv_cache.decode`, on
    fixed-shape buffers.

    The forward reads three static buffers (token, position, 4-D additive mask) refilled before
    each call, and ``StaticCache`` writes keys / values in place at an index it keeps in a device
    tensor; so the same forward, replayed, is always a valid next step. With ``capture`` (CUDA)
    the first step of a new slot runs eagerly on a side stream (a real step that also warms up
    kernels and the allocator), the next captures the forward as a CUDA graph, and every step
    after that, in this call and in later calls given the same ``slot``, replays it: one launch
    per step instead of hundreds. Without ``capture`` every step runs the forward eagerly on the
    same buffers, which is how the CPU tests check this path.
    """
    if slot is None:  # buffers for this call only
        B, width = branch.mask.shape
        dev = branch.mask.device
        slot = GraphSlot(model=weakref.ref(model), weights=0, cache=branch.cache, length=width,
                         tok_buf=torch.zeros((B, 1), dtype=torch.long, device=dev),
                         pos_buf=branch.positions.clone(), mask_buf=additive_mask(branch.mask, dtype))

    run = model
    if compiled:
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(model, dynamic=False)
        run = _COMPILED[model]

    def forward() -> Tensor:
        return run(input_ids=slot.tok_buf, attention_mask=slot.mask_buf, position_ids=slot.pos_buf,
                   cache=slot.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(tokens: Tensor) -> Tensor:
        branch.mask[:, branch.length] = 1
        branch.length += 1
        slot.tok_buf.copy_(tokens[:, None])
        slot.pos_buf.copy_(branch.positions)
        slot.mask_buf.copy_(additive_mask(branch.mask, dtype))
        branch.positions = branch.positions + 1
        if not capture:
            return forward()
        if not slot.warm:
            slot.warm = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = forward()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if slot.graph is None:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    slot.logits = forward()
                slot.graph = graph
            except RuntimeError as e:  # a forward that syncs with the host cannot be captured
                warnings.warn(f"CUDA graph capture failed ({e}); decoding on the static cache without it",
                              stacklevel=2)
                slot.graph = False
        if slot.graph is False:
            return forward()  # capture records without running: the cache has not moved
        slot.graph.replay()
        return slot.logits

    return step


def release_compiled() -> int:
    """Drop the ``torch.compile`` wrappers kept for ``compile=True`` (and with them the models they
    refer to); returns how many there were. Later calls compile again."""
    n = len(_COMPILED)
    _COMPILED.clear()
    return n


def kept_slots() -> list[tuple[tuple, GraphSlot]]:
    """The kept slots, least recently used first, as (key, slot) pairs (key: see ``_SLOTS``)."""
    return list(_SLOTS.items())
