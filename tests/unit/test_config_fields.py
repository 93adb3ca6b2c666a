"""Honest configuration: every leaf field of a trainer's Config is either read while the trainer
runs, or rejected (ConfigError naming the field and the trainer) when given a non-default value.

How: the trainer runs on a tiny model with a config whose sections record attribute reads made
by ankus code (``__getattribute__`` of a recording subclass; reads from ``ankus.config`` itself,
i.e. the rejection checks and the YAML dump, do not count). Each leaf not read in that run is
then set to a non-default value on top of the same run's settings, and the trainer must refuse
it with a ConfigError that names ``section.field`` and the trainer.

Adding a trainer is one ``TrainerCase`` in ``CASES``: its algorithm name (a key of
``ankus.recipes.TRAINERS``), a tiny recipe, the variants to run (each a dict of dotted overrides;
every variant must be honest on its own), and non-default values for fields whose generic one
(``not b``, ``n + 1``, another Literal choice, ...) would not make sense.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from ankus.config import ConfigError, build
from ankus.recipes import TRAINERS


@dataclass
class TrainerCase:
    algorithm: str
    recipe: Callable[[Path], dict]
    """A tiny recipe (seconds on a CPU) given a scratch directory."""
    variants: dict[str, dict[str, Any]]
    """Named sets of dotted overrides, one run each."""
    values: dict[str, Any] = field(default_factory=dict)
    """``section.field`` -> the non-default value to try where the generic one does not fit."""


def _run(tmp: Path) -> dict:
    return {"out_dir": str(tmp / "runs"), "name": "run", "progress": False, "save_model": False}


def _corpus(tmp: Path) -> str:
    from ankus.data.corpus import build_corpus

    texts = tmp / "texts"
    texts.mkdir(exist_ok=True)
    for i in range(8):
        (texts / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(60 + 10 * i)) + "\n")
    if not (tmp / "corpus").exists():
        build_corpus(str(texts), tmp / "corpus")
    return str(tmp / "corpus")


def _rm_jsonl(tmp: Path) -> str:
    rows = [{"q": f"Review {i}.", "good": " Great.", "bad": " Awful."} for i in range(8)]
    path = tmp / "rm_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CASES = [
    TrainerCase(
        "sft",
        lambda tmp: {"model": {"spec": "tiny-llama"}, "data": {"name": "sft_tiny", "eval_fraction": 0.25},
                     "trainer": {"batch_size": 4, "total_steps": 2}, "run": _run(tmp)},
        {"base": {},
         "lora": {"lora.enabled": True, "lora.r": 4},
         "randomwalks_eval": {"data.name": "randomwalks", "data.kwargs": {"n_walks": 20}, "data.limit": 8,
                              "eval.samples_per_prompt": 1, "eval.max_new_tokens": 2, "data.batching": "bucket"}},
        {"data.split": "validation", "data.kwargs": {"n_walks": 10}, "data.score_field": "score",
         "lora.target": ["q_proj"]},
    ),
    TrainerCase(
        "dpo",
        lambda tmp: {"model": {"spec": "tiny-llama"}, "data": {"path": "prefs_tiny"},
                     "trainer": {"batch_size": 4, "total_steps": 2, "lr": 1e-3}, "run": _run(tmp)},
        {"base": {},
         "live_reference_lora_padded": {"method.precompute_ref": False, "lora.enabled": True, "method.packing": False,
                                        "method.loss_type": "ipo"}},
        {"lora.target": ["q_proj"]},
    ),
    TrainerCase(
        "reward_model",
        lambda tmp: {"model": {"spec": "tiny-llama"},
                     "data": {"name": "synthetic", "kwargs": {"n_train": 16, "n_eval": 4}},
                     "trainer": {"batch_size": 4, "total_steps": 2}, "run": _run(tmp)},
        {"base": {},
         "jsonl_packed_lora": {"data.name": "{jsonl}", "data.kwargs": {}, "data.prompt_field": "q",
                               "data.chosen_field": "good", "data.rejected_field": "bad", "data.eval_fraction": 0.25,
                               "data.batching": "pack", "lora.enabled": True}},
        {"data.kwargs": {"n_train": 8}, "data.eval_name": "{jsonl}", "lora.target": ["q_proj"]},
    ),
    TrainerCase(
        "ppo",
        lambda tmp: {"model": {"spec": "tiny-gpt2-letters"}, "data": {"prompts": "randomwalks", "num_eval": 2},
                     "reward": {"name": "randomwalks", "kwargs": {"seed": 1000}},
                     "warm_start": {"steps": 1, "batch_size": 8},
                     "generation": {"max_new_tokens": 3, "chat_template": False},
                     "method": {"reference": "copy", "num_layers_unfrozen": -1, "num_rollouts": 8, "chunk_size": 8,
                                "ppo_epochs": 1},
                     "trainer": {"batch_size": 8, "total_steps": 1, "checkpoint_every": 1}, "run": _run(tmp)},
        {"base": {},
         "hydra_adaptive_kl": {"method.reference": "hydra", "method.num_layers_unfrozen": 1, "method.target": 6.0,
                               "method.scale_reward": "running", "trainer.grad_accum": 2},
         "grpo_lora": {"method.estimator": "grpo", "method.samples_per_prompt": 2, "method.reference": "lora",
                       "lora.enabled": True, "lora.r": 2, "lora.target": ["c_attn"]},
         "rloo": {"method.estimator": "rloo", "method.samples_per_prompt": 2}},
        {"lora.target": ["c_attn"], "reward.kwargs": {"seed": 1}, "data.eval_prompts": "randomwalks",
         "method.target": 6.0},
    ),
    TrainerCase(
        "ilql",
        lambda tmp: {"model": {"spec": "randomwalks-gpt2"}, "data": {"dataset": "randomwalks", "seq_length": 11},
                     "trainer": {"batch_size": 8, "total_steps": 2, "checkpoint_every": 1},
                     "generation": {"max_new_tokens": 3, "chat_template": False},
                     "eval": {"betas": [1], "samples_per_prompt": 1, "every": 0, "batch_size": 32},
                     "run": _run(tmp)},
        {"base": {}},
        {},
    ),
    TrainerCase(
        "pretrain",
        lambda tmp: {"model": {"spec": "tiny-llama"}, "data": {"corpus": _corpus(tmp), "seq_length": 32,
                                                               "val_fraction": 0.25},
                     "trainer": {"batch_size": 2, "total_steps": 2, "warmup_steps": 0}, "method": {"eval_every": 1},
                     "run": _run(tmp)},
        {"base": {}, "isolated_accum": {"data.isolate_documents": True, "trainer.grad_accum": 2,
                                        "method.head_dtype": "bfloat16", "data.val_rows": 1},
         "relora": {"relora.enabled": True, "relora.r": 2, "relora.reset_every": 1, "relora.restart_warmup": 1,
                    "relora.warm_start_steps": 1, "trainer.total_steps": 3},
         "rope_yarn": {"rope.method": "yarn", "rope.factor": 2.0, "rope.original_max": 16}},
        {"relora.target": ["q_proj"], "relora.restart_warmup": 2, "model.spec": "llama-5m",
         "data.extra_val": ["{corpus}"]},
    ),
]


# ---------------------------------------------------------------------------------------------
# recording reads


def _recording(section: Any, prefix: str, reads: set[str]) -> Any:
    """A copy of the dataclass ``section`` whose field reads by ankus code go into ``reads``."""
    cls = type(section)
    names = {f.name for f in dataclasses.fields(cls)}

    def __getattribute__(self, name):
        if name in names:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ankus.") and caller != "ankus.config":
                reads.add(f"{prefix}.{name}")
        return object.__getattribute__(self, name)

    rec_cls = type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})
    rec = object.__new__(rec_cls)
    for name in names:
        value = getattr(section, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = _recording(value, f"{prefix}.{name}", reads)
        object.__setattr__(rec, name, value)
    return rec


def _leaves(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``section.field`` -> (annotation, value) for every non-dataclass field below the top level."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, path))
        elif prefix:
            out[path] = (hints[f.name], value)
    return out


def _other_value(tp: Any, default: Any) -> Any:
    """A value of annotation ``tp`` that differs from ``default``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return _other_value(inner, None if default is None else default)
    if origin is typing.Literal:
        return next(a for a in args if a != default)
    if tp is bool:
        return not default if default is not None else True
    if tp is int:
        return (default or 0) + 1
    if tp is float:
        return (default or 0.0) + 0.5
    if tp is str:
        return f"{default}_other"
    if origin is tuple:
        return tuple(0.5 for _ in args)
    if origin is list or tp is list:
        return ["other"]
    if origin is dict or tp is dict:
        return {"other": 1}
    raise AssertionError(f"no generic non-default value for {tp}; add one to the case's values")


def _expand(value: Any, tmp: Path) -> Any:
    if value == ["{corpus}"]:
        return [str(tmp / "corpus")]
    return _rm_jsonl(tmp) if value == "{jsonl}" else value


@pytest.mark.parametrize("case,variant", [(c, v) for c in CASES for v in c.variants],
                         ids=[f"{c.algorithm}-{v}" for c in CASES for v in c.variants])
def test_every_field_is_read_or_rejected(tmp_path, case: TrainerCase, variant: str):
    module = importlib.import_module(TRAINERS[case.algorithm])
    recipe = case.recipe(tmp_path)
    overrides = {k: _expand(v, tmp_path) for k, v in case.variants[variant].items()}
    cfg = build(module.Config, recipe, overrides)
    reads: set[str] = set()
    recorded = dataclasses.replace(cfg, **{f.name: _recording(getattr(cfg, f.name), f.name, reads)
                                          for f in dataclasses.fields(cfg)
                                          if dataclasses.is_dataclass(getattr(cfg, f.name))})
    module.train(recorded)
    assert reads, "the recording saw no read at all: the mechanism is broken"

    defaults = _leaves(module.Config())
    silent = []
    for i, (path, (tp, default)) in enumerate(sorted(defaults.items())):
        if path in reads:
            continue
        value = _expand(case.values[path], tmp_path) if path in case.values else _other_value(tp, default)
        run = {"run.name": f"reject{i}"}
        try:
            module.train(build(module.Config, recipe, {**overrides, **run, path: value}))
        except ConfigError as e:
            if path in str(e) and case.algorithm in str(e):
                continue
            silent.append(f"{path}: ConfigError does not name the field and the trainer: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - anything but a ConfigError is a failure to report
            silent.append(f"{path}={value!r}: {type(e).__name__} instead of a ConfigError: {e}")
            continue
        silent.append(f"{path}={value!r}: neither read nor rejected")
    assert not silent, f"{case.algorithm} ({variant}):\n" + "\n".join(silent)


def test_the_recording_counts_reads_by_ankus_code_only():
    from ankus.config import LoRAConfig

    reads: set[str] = set()
    rec = _recording(LoRAConfig(), "lora", reads)
    exec("rec.r", {"__name__": "ankus.fake", "rec": rec})  # a read by ankus code
    exec("rec.dropout", {"__name__": "ankus.config", "rec": rec})  # the rejection check / YAML dump
    assert rec.alpha == 16  # a read by this test
    assert reads == {"lora.r"}
    assert isinstance(rec, LoRAConfig)


def test_generic_values_differ_from_the_defaults():
    for module in (importlib.import_module(TRAINERS[c.algorithm]) for c in CASES):
        for path, (tp, default) in _leaves(module.Config()).items():
            try:
                value = _other_value(tp, default)
            except AssertionError:
                continue  # such fields need a value in their case
            assert value != default, path
