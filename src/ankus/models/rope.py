"""RoPE context extension: linear interpolation, dynamic NTK, YaRN (static and dynamic).

YaRN (Peng et al. 2023) rescales each rotary frequency by how many turns it makes over the
original context ``L``. For a frequency θ_d (wavelength λ_d = 2π/θ_d, r_d = L/λ_d turns over the
context) and a scale s = L'/L:

    γ(r) = 0 if r < α,  1 if r > β,  (r − α)/(β − α) otherwise        (α = 1, β = 32)
    h(θ_d) = (1 − γ(r_d)) · θ_d / s  +  γ(r_d) · θ_d

so fast dimensions (many turns, r > β) keep their frequency, slow ones (less than one turn,
r < α) are interpolated by s, and the ones between are blended along the ramp. Attention logits
are multiplied by 1/t with √(1/t) = 0.1·ln s + 1: here, as in transformers, cos and sin are
scaled by that factor, which scales q·k by its square.

* static (``yarn``): transformers' own ``rope_type: yarn`` (its ramp runs over dimension indices
  found from α and β and rounded to integers, close to but not exactly the formula above; the
  tests show where they agree), the scale fixed by the recipe.
* dynamic (``dynamic-yarn``; transformers has none): the formula above with s = max(1, n/L)
  recomputed at each forward from the longest position n in it, through a forward pre-hook on
  each rotary module (the module's own forward still runs: no per-architecture code). As with
  dynamic NTK, keys already in a KV cache keep the rotation they were given.
* ``linear`` (position interpolation) and ``dynamic-ntk``: transformers' ``linear`` and
  ``dynamic`` rope types.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from torch import Tensor, nn

from ankus.config import ConfigError

__all__ = ["yarn_inv_freq", "yarn_attention_factor", "scale_rope", "rotary_modules", "METHODS", "RopeConfig",
           "apply_rope_config"]

Method = Literal["none", "linear", "dynamic-ntk", "yarn", "dynamic-yarn"]
METHODS = ("none", "linear", "dynamic-ntk", "yarn", "dynamic-yarn")
_HF_TYPE = {"linear": "linear", "dynamic-ntk": "dynamic", "yarn": "yarn"}


def yarn_inv_freq(inv_freq: Tensor, scale: float, original_max: int, alpha: float = 1.0, beta: float = 32.0) -> Tensor:
    """YaRN's frequencies h(θ_d) from the original ones θ_d = ``inv_freq`` (D,) -> (D,)."""
    if scale <= 1.0:
        return inv_freq.clone()
    turns = original_max * inv_freq / (2 * math.pi)  # r_d = L / λ_d
    gamma = ((turns - alpha) / (beta - alpha)).clamp(0.0, 1.0)  # (D,)
    return (1 - gamma) * inv_freq / scale + gamma * inv_freq


def yarn_attention_factor(scale: float) -> float:
    """√(1/t) = 0.1·ln s + 1 (1 for s ≤ 1)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary-embedding module: one holding an ``inv_freq`` buffer and an ``attention_scaling``."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), Tensor)
            and hasattr(m, "attention_scaling")]


def _original_max(model: nn.Module) -> int:
    return int(model.config.get_text_config().max_position_embeddings)


def scale_rope(model: nn.Module, method: Method, factor: float = 1.0, original_max: int | None = None) -> nn.Module:
    """Extend ``model``'s context by ``factor`` with ``method``, in place; returns the model.

    ``original_max`` is the context the model was trained at (default: its config's
    ``max_position_embeddings``). The config's ``max_position_embeddings`` becomes
    ``factor × original_max`` (``original_max`` for dynamic NTK, which scales past it) and its
    ``rope_parameters`` say what was done, so a saved model reloads with the same static
    scaling (dynamic YaRN is a hook: it is re-applied after loading).
    """
    if method not in METHODS:
        raise ValueError(f"unknown RoPE scaling '{method}'; expected one of {', '.join(METHODS)}")
    if method == "none":
        return model
    if not factor > 1.0:
        raise ValueError(f"a RoPE scaling factor must be > 1 (got {factor}); use method 'none' for no scaling")
    rotaries = rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to scale")
    config = model.config.get_text_config()
    original = int(original_max or _original_max(model))
    # transformers' dynamic NTK reads max_position_embeddings as the trained context and rescales
    # past it: set to factor x original it would do nothing up to the extended length
    config.max_position_embeddings = original if method == "dynamic-ntk" else int(round(factor * original))
    if method == "dynamic-yarn":
        for rot in rotaries:
            _add_dynamic_yarn(rot, original)
        return model
    params = dict(config.rope_parameters)
    params.update(rope_type=_HF_TYPE[method], factor=float(factor), original_max_position_embeddings=original)
    config.rope_parameters = params
    for rot in rotaries:
        fresh = type(rot)(config)  # the module's own init computes the scaled frequencies
        device = rot.inv_freq.device
        rot.inv_freq = fresh.inv_freq.to(device)
        rot.original_inv_freq = fresh.original_inv_freq.to(device)
        rot.attention_scaling = fresh.attention_scaling
        rot.rope_type = fresh.rope_type
        rot.config = config
        for name in ("max_seq_len_cached", "original_max_seq_len"):
            if hasattr(fresh, name):
                setattr(rot, name, getattr(fresh, name))
    return model


def _add_dynamic_yarn(rot: nn.Module, original_max: int) -> None:
    base = rot.inv_freq.detach().clone()

    def pre_hook(module, args, kwargs):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        n = int(position_ids.max()) + 1 if position_ids is not None else original_max
        scale = max(1.0, n / original_max)
        module.inv_freq = yarn_inv_freq(base.to(module.inv_freq.device), scale, original_max)
        module.attention_scaling = yarn_attention_factor(scale)

    rot.register_forward_pre_hook(pre_hook, with_kwargs=True)


@dataclasses.dataclass
class RopeConfig:
    method: str = "none"
    """RoPE scaling applied right after the model loads: none, linear, dynamic-ntk, yarn or dynamic-yarn."""
    factor: float = 1.0
    """Context extension factor s = new context / original_max (> 1 for any method but none)."""
    original_max: int = 0
    """The context the model was trained at; 0 = its config's max_position_embeddings."""


def apply_rope_config(model: nn.Module, rc: RopeConfig, trainer: str, save_model: bool) -> nn.Module:
    """:func:`scale_rope` from a recipe's ``rope:`` section, its errors as ConfigErrors naming the field.

    A static scaling lives in the saved config.json (``rope_parameters``), so the trained model
    reloads scaled. Dynamic YaRN is a forward hook that a plain transformers config cannot hold:
    with ``save_model`` it is refused rather than saved as an unscaled model."""
    if rc.method not in METHODS:
        raise ConfigError(f"{trainer}: rope.method='{rc.method}' is unknown; expected one of {', '.join(METHODS)}")
    if rc.original_max < 0:
        raise ConfigError(f"{trainer}: rope.original_max must be >= 0 (0 = the model's own), got {rc.original_max}")
    if rc.method == "none":
        if rc.factor != 1.0 or rc.original_max != 0:
            field = "rope.factor" if rc.factor != 1.0 else "rope.original_max"
            raise ConfigError(f"{trainer}: {field} has no effect with rope.method=none; set rope.method or remove it")
        return model
    if not rc.factor > 1.0:
        raise ConfigError(f"{trainer}: rope.factor must be > 1 for rope.method={rc.method}, got {rc.factor}")
    if rc.method == "dynamic-yarn" and save_model:
        raise ConfigError(f"{trainer}: rope.method=dynamic-yarn is a forward hook that a saved transformers config "
                          "cannot hold (the saved model would reload unscaled); fine-tune with rope.method=yarn "
                          "(at a fixed training length the same scaling) or set run.save_model=false")
    try:
        return scale_rope(model, rc.method, rc.factor, rc.original_max or None)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"{trainer}: rope: {e}") from e
