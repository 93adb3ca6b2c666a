"""Hooks on the residual stream: read it at chosen layers and positions, or edit it in place.

The residual stream after block ``l`` is the output of decoder layer ``l`` (found by
:func:`ankus.models.layers.find_decoder_layers`, no per-architecture code). Every hook is
removed in a ``finally``, so an exception inside the ``with`` leaves the model as it was.

    with residual_stream(model, [3, 9], positions=[-1]) as acts:
        model(ids)
    acts[3]  # list with one (B, 1, D) tensor per forward

    with edit_residual(model, 6, lambda h: h + 4.0 * v):   # h: (B, T, D)
        generate(model, tok, prompts)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ankus.config import ConfigError
from ankus.models.layers import find_decoder_layers

__all__ = ["HookPointError", "residual_stream", "edit_residual", "add_direction", "check_layers", "n_layers"]


class HookPointError(ConfigError):
    """A layer index or a token position that the model does not have."""


def n_layers(model) -> int:
    return len(find_decoder_layers(model)[1])


def check_layers(model, layers: Sequence[int]) -> list[int]:
    """The layer indices, checked against the model's depth (negative indices count from the end)."""
    n = n_layers(model)
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -n <= layer < n:
            raise HookPointError(f"layer {layer!r} does not exist: the model has {n} decoder layers "
                                 f"(valid indices 0..{n - 1}, or -{n}..-1 from the end)")
        out.append(layer % n)
    return out


def _hidden(output) -> Tensor:
    """The hidden state in a decoder layer's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden: Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _pick(hidden: Tensor, positions: Sequence[int] | None, layer: int) -> Tensor:
    """(B, T, D) -> (B, len(positions), D); every position must exist in this forward."""
    if positions is None:
        return hidden
    T = hidden.shape[1]
    bad = [p for p in positions if not -T <= p < T]
    if bad:
        raise HookPointError(f"position(s) {bad} do not exist at layer {layer}: this forward has {T} tokens "
                             f"(valid 0..{T - 1} or -{T}..-1)")
    return hidden[:, list(positions)]


@contextlib.contextmanager
def residual_stream(model, layers: Sequence[int], positions: Sequence[int] | None = None,
                    detach: bool = True) -> Iterator[dict[int, list[Tensor]]]:
    """Capture the residual stream after each of ``layers``: yields ``{layer: [tensor per forward]}``,
    each (B, len(positions), D), or (B, T, D) with ``positions=None`` (all)."""
    layers = check_layers(model, layers)
    blocks = find_decoder_layers(model)[1]
    acts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    handles = []

    def hook_for(layer: int) -> Callable:
        def hook(module, args, output):
            h = _pick(_hidden(output), positions, layer)
            acts[layer].append(h.detach() if detach else h)
        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def edit_residual(model, layers: int | Sequence[int], fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the residual stream after each of ``layers`` by ``fn(hidden)`` ((B, T, D) -> (B, T, D))
    on every forward inside the ``with``."""
    layers = check_layers(model, [layers] if isinstance(layers, int) else layers)
    blocks = find_decoder_layers(model)[1]
    handles = []

    def hook(module, args, output):
        return _replace(output, fn(_hidden(output)))

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def add_direction(model, layer: int, direction: Tensor, alpha: float) -> contextlib.AbstractContextManager:
    """Add ``alpha * direction`` ((D,)) to the residual stream after ``layer`` at every position."""
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    if direction.ndim != 1 or direction.shape[0] != hidden:
        raise HookPointError(f"direction has shape {tuple(direction.shape)}; this model's residual stream "
                             f"is ({hidden},)")
    param = next(model.parameters())
    delta = (alpha * direction.detach().to(torch.float32)).to(device=param.device, dtype=param.dtype)
    return edit_residual(model, layer, lambda h: h + delta.to(h.dtype))
