"""Config schemas: dataclasses are the schema, YAML gives values, dotted overrides tweak them.

A recipe is a YAML mapping. Its ``algorithm`` key names the trainer (``ppo``, ``sft``, ...);
every other key is a section of that trainer's config dataclass. Unknown keys raise
:class:`ConfigError` naming the closest valid key; values of the wrong type raise too.

    cfg = build(PPOConfig, read_yaml(resolve_recipe("ppo_sentiment")), ["trainer.lr=1e-5"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def _closest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f" Did you mean '{match[0]}'?" if match else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the few lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        # YAML reads "3e-5" as a string (YAML 1.1); accept it, and ints.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _section_default(f: dataclasses.Field) -> Any:
    """The default instance of a dataclass-valued field, or None."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return None
    return value if dataclasses.is_dataclass(value) and not isinstance(value, type) else None


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown key '{path}'.{_closest(key, list(fields))}")
        default = _section_default(fields[key])
        if default is not None and isinstance(value, Mapping):
            # a partial section keeps this config's own defaults for it (DPO's lr=5e-7, say),
            # not the section class's generic ones
            value = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}, **value}
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-5"`` -> (["optim", "lr"], 1e-05). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy). Keys are checked later, by :func:`from_dict`."""
    data = _deepcopy(data)
    items = (
        [(k.split("."), v) for k, v in overrides.items()]
        if isinstance(overrides, Mapping)
        else [parse_override(o) for o in overrides]
    )
    for path, value in items:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{'.'.join(path)}': '{part}' is a value, not a section")
        node[path[-1]] = value
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def build(cls: type[T], data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> T:
    """Schema ``cls`` from ``data`` plus overrides; the ``algorithm`` name key is dropped here."""
    data = apply_overrides(dict(data), overrides)
    data.pop("algorithm", None)
    return from_dict(cls, data)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def reject_unused(section: Any, names: Sequence[str], trainer: str, why: str, where: str) -> None:
    """Raise :class:`ConfigError` for the first of ``names`` whose value in ``section`` differs from
    the section class's default: a setting the ``trainer`` would ignore (``why`` says when).
    ``where`` is the section's key in the recipe (``data``, ``lora``, ...)."""
    defaults = type(section)()
    for name in names:
        if getattr(section, name) != getattr(defaults, name):
            raise ConfigError(f"{where}.{name} is not used by the {trainer} trainer {why}; remove it")


# ---------------------------------------------------------------------------------------------
# Sections shared by the trainers' configs. A trainer's config composes these with its own.


@dataclasses.dataclass
class ModelConfig:
    spec: str = "smollm2-135m-instruct"
    """Model spec for ankus.load_model: a known name (see `ankus models`), an HF directory or a .gguf file."""
    dtype: str = "float32"
    """Parameter dtype: float32 (default, exact) or bfloat16."""
    seed: int = 0
    """Init seed for the random-init tiny-* specs."""


@dataclasses.dataclass
class TrainerConfig:
    lr: float = 3e-5
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per optimizer step (on each process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the batch is split into this many pieces."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    total_steps: int = 100
    """Optimizer steps (or outer iterations, for PPO) to run."""
    warmup_steps: int = 0
    """Linear LR warm-up steps (from lr/warmup_steps up to lr)."""
    lr_schedule: typing.Literal["constant", "cosine", "wsd"] = "constant"
    """LR after warm-up (ankus.optim): constant; cosine decay to min_lr_ratio x lr at total_steps;
    wsd = warmup-stable-decay, constant until the last decay_steps, then linear to min_lr_ratio x lr."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr (cosine, wsd)."""
    decay_steps: int = 0
    """wsd: length of the final decay; 0 = the last 20% of total_steps."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    log_every: int = 1
    """Write metrics every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps; 0 = only at the end."""
    keep_last: int = 2
    """Resumable checkpoints kept; older ones are deleted."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a NaN/inf loss or gradient."""
    device: typing.Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model trains: auto = this process's GPU when CUDA is there, else the CPU."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with FSDP2 (SFT, DPO, PPO,
    reward model, pretrain; see docs/distributed.md)."""


@dataclasses.dataclass
class RunConfig:
    out_dir: str = "runs"
    """Parent directory of run directories."""
    name: str = ""
    """Run directory name; empty = <algorithm>-<timestamp>."""
    save_model: bool = True
    """Save the final model in Hugging Face format under <run>/model."""
    progress: bool = True
    """Show progress bars."""


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False
    """Train LoRA adapters instead of the weights they adapt (the saved model has them merged)."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target: list[str] = dataclasses.field(default_factory=list)
    """Module names to adapt; empty = every linear layer but the output head."""
