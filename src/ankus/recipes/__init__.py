"""Recipes: which trainer an ``algorithm`` names, where a recipe file is found, and running one.

A recipe is a YAML mapping whose ``algorithm`` key names a trainer in :data:`TRAINERS` and whose
other keys are sections of that trainer's ``Config``. A trainer module exposes ``Config`` and
``train(cfg, **kwargs)``; modules are imported only when a recipe names them, so looking a
recipe up stays cheap. This package sits below ``ankus.cli`` and the pipelines, which both use it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from ankus.config import ConfigError, build, read_yaml

__all__ = ["TRAINERS", "COMMANDS", "RECIPES_DIR", "shipped_recipes", "trainer_module", "resolve_recipe", "run_recipe"]

# algorithm name -> trainer module (exposing Config and train), imported lazily
TRAINERS: dict[str, str] = {
    "ppo": "ankus.trainers.ppo",
    "sft": "ankus.trainers.sft",
    "reward_model": "ankus.trainers.reward_model",
    "ilql": "ankus.trainers.ilql",
    "dpo": "ankus.trainers.dpo",
    "pretrain": "ankus.trainers.pretrain",
    "dpf": "ankus.pipelines.dpf",  # the Direct Principle Feedback pipeline (data, DPO, evaluation)
    "qdaif": "ankus.pipelines.qdaif",  # Quality-Diversity through AI Feedback (MAP-Elites over texts)
}

# algorithm name -> the command that runs such a recipe (audits: not trainers, but recipes all the same)
COMMANDS: dict[str, str] = {
    "audit_elicit": "ankus audit elicit --recipe",
    "audit_directions": "ankus audit directions --recipe",
}

RECIPES_DIR = Path(__file__).resolve().parent
"""The shipped recipes: ``*.yaml`` beside this module, installed as package data, so a recipe is
found by name from any directory and without a source checkout."""


def trainer_module(algorithm: str):
    """The trainer module an algorithm name maps to (imported now)."""
    if algorithm in COMMANDS:
        raise ConfigError(f"a recipe with algorithm '{algorithm}' is not a training run: run it with "
                          f"`{COMMANDS[algorithm]} RECIPE [overrides]`")
    if algorithm not in TRAINERS:
        raise ConfigError(f"unknown algorithm '{algorithm}'; known: {', '.join(TRAINERS)}")
    try:
        return importlib.import_module(TRAINERS[algorithm])
    except ModuleNotFoundError as e:
        if e.name == TRAINERS[algorithm]:
            raise ConfigError(f"the '{algorithm}' trainer is not available in this version of ankus") from None
        raise


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(recipe: str | Path) -> Path:
    """An existing path as it is; else the shipped recipe ``<name>`` (``.yaml`` optional)."""
    path = Path(recipe)
    if path.exists():
        return path
    name = str(recipe)
    for candidate in (RECIPES_DIR / f"{name}.yaml", RECIPES_DIR / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe not found: {recipe} (no such file, and no shipped recipe of that name). "
                      f"Shipped recipes: {', '.join(shipped_recipes()) or 'none'}")


def run_recipe(recipe: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (),
               resume: bool = False, **kwargs):
    """Load a recipe (a path, a shipped name, or a dict), apply overrides, and run its trainer."""
    data = dict(recipe) if isinstance(recipe, Mapping) else read_yaml(resolve_recipe(recipe))
    algorithm = data.get("algorithm")
    if not algorithm:
        raise ConfigError(f"the recipe has no 'algorithm' key; set it to one of: {', '.join(TRAINERS)}")
    module = trainer_module(algorithm)
    cfg = build(module.Config, data, overrides)
    if resume:
        kwargs["resume"] = True
    return module.train(cfg, **kwargs)
