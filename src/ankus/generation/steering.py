"""Steering with a direction in the residual stream: ``steer(model, tok, prompts, direction, alpha)``.

A :class:`Direction` is a (D,) vector found at one layer of one model (``ankus audit directions``
writes them), saved as safetensors whose metadata names the model, its hidden size and the
layer; loading it for another model raises :class:`DirectionMismatchError`.

Steering adds ``alpha * vector`` to the residual stream after that layer at every position, on
every forward of :func:`ankus.generation.engine.generate`: the prompt's prefill and each decode
step, so the KV cache holds the steered keys and values. The edit is per position, so a row's
result does not depend on the other rows of its batch; under CFG both branches are steered.
CUDA graphs are turned off for the call (a captured graph would replay without the hook).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ankus.config import ConfigError
from ankus.generation.engine import GenerationConfig, GenerationOutput, generate
from ankus.generation.hooks import add_direction, n_layers

__all__ = ["Direction", "DirectionMismatchError", "save_direction", "load_direction", "check_direction",
           "model_name", "steer"]


class DirectionMismatchError(ConfigError):
    """A direction saved for another model (name, hidden size or depth), or an unreadable direction file."""


@dataclasses.dataclass
class Direction:
    vector: Tensor  # (D,) float32
    layer: int  # the residual stream after this decoder layer
    model_name: str = ""  # "" = unknown (a random-init model has no name)
    method: str = ""  # how it was found: mean_diff, kmeans, pca, logistic, das...

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[0])

    def unit(self) -> Tensor:
        """(D,) the vector scaled to norm 1."""
        return self.vector / self.vector.norm().clamp_min(1e-12)


def model_name(model) -> str:
    """A model's name as directions record it: the last part of ``config._name_or_path`` ("" if none)."""
    return Path(getattr(model.config, "_name_or_path", "") or "").name


def _hidden_size(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.hidden_size)


def save_direction(direction: Direction, path: str | Path) -> Path:
    """Write ``direction`` as safetensors (tensor ``direction``) with its metadata; atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model_name": direction.model_name, "hidden_size": str(direction.hidden_size),
            "layer": str(direction.layer), "method": direction.method, "format": "ankus-direction-1"}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"direction": direction.vector.detach().to(torch.float32).contiguous().cpu()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_direction(path: str | Path, model=None, expected_name: str | None = None) -> Direction:
    """Read a direction; with ``model``, check that it was made for it (:func:`check_direction`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no direction file at {path} (ankus audit directions writes them)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vector = f.get_tensor("direction").to(torch.float32)
    except Exception as e:  # noqa: BLE001 - not safetensors, or no 'direction' tensor
        raise DirectionMismatchError(f"{path} is not a direction file: {type(e).__name__}: {e}") from None
    if vector.ndim != 1 or "layer" not in meta:
        raise DirectionMismatchError(f"{path} is not a direction file (needs a 1-D 'direction' tensor and a layer)")
    d = Direction(vector, int(meta["layer"]), meta.get("model_name", ""), meta.get("method", ""))
    if model is not None:
        check_direction(d, model, expected_name, str(path))
    return d


def check_direction(d: Direction, model, expected_name: str | None = None, where: str = "the direction") -> None:
    """Raise DirectionMismatchError unless ``d`` fits ``model``: same hidden size, an existing layer,
    and the same model name when both are known."""
    name = expected_name if expected_name is not None else model_name(model)
    if d.model_name and name and d.model_name != name:
        raise DirectionMismatchError(f"{where} was found in model '{d.model_name}', not '{name}'; "
                                     f"compute one for '{name}' with ankus audit directions")
    if d.hidden_size != _hidden_size(model):
        raise DirectionMismatchError(f"{where} has {d.hidden_size} dimensions but this model's residual stream has "
                                     f"{_hidden_size(model)}; it was made for another model ('{d.model_name}')")
    if not 0 <= d.layer < n_layers(model):
        raise DirectionMismatchError(f"{where} is for layer {d.layer} but this model has {n_layers(model)} layers")


def steer(model, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], direction: Direction, alpha: float,
          config: GenerationConfig | None = None, **kwargs) -> GenerationOutput:
    """``generate`` with ``alpha * direction.unit()`` added after ``direction.layer`` (kwargs go to
    ``generate``: negative_prompts, generator, batch_size). alpha = 0 is plain generation."""
    check_direction(direction, model, where=f"the {direction.method or 'given'} direction")
    config = dataclasses.replace(config or GenerationConfig(), cuda_graph=False)
    if alpha == 0:
        return generate(model, tokenizer, prompts, config, **kwargs)
    with add_direction(model, direction.layer, direction.unit(), alpha):
        return generate(model, tokenizer, prompts, config, **kwargs)
