"""Run directories: the resolved config, ``metrics.jsonl``, PNG plots and Hugging Face checkpoints.

    runs/ppo-20261126-101500/
      config.yaml        the resolved config (recipe + overrides + defaults)
      metrics.jsonl      one JSON object per logged step: {"step": 3, "reward/mean": 0.41, ...}
      metrics.png        the main metrics against step
      model/             save_pretrained() + tokenizer: AutoModelForCausalLM.from_pretrained() loads it

Every directory is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint where a loader would find it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ankus.atomic import atomic_write_dir
from ankus.config import RunConfig, save_yaml


def create_run_dir(run: RunConfig, algorithm: str, cfg: Any = None, *, exist_ok: bool = False) -> Path:
    """Make ``<out_dir>/<name>`` (default name ``<algorithm>-<timestamp>``) and write config.yaml."""
    name = run.name or f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(run.out_dir) / name
    if path.exists() and any(path.iterdir()) and not exist_ok:
        raise FileExistsError(
            f"run directory {path} already exists and is not empty; pick another run.name, "
            "delete it, or pass --resume to continue it"
        )
    path.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        save_yaml(cfg, path / "config.yaml")
    return path


class MetricsLogger:
    """Appends one JSON line per step to metrics.jsonl (flushed, so a crash loses nothing logged)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep it visible
    return v


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop rows logged after ``last_step`` (used on resume, so metrics continue without a gap or a repeat)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_metrics(run_dir: str | Path, keys: Iterable[str], out: str = "metrics.png", title: str = "") -> Path | None:
    """One panel per metric key against step; keys never logged are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(run_dir) / out
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_hf_model(model, tokenizer, path: str | Path) -> Path:
    """Save in Hugging Face format (safetensors + tokenizer), atomically.

    A peft model is merged first, so ``AutoModelForCausalLM.from_pretrained(path)`` loads a plain
    model; the live model keeps its adapters.
    """
    def write(tmp: Path) -> None:
        to_save = model
        if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
            import copy

            to_save = copy.deepcopy(model).merge_and_unload()
        to_save.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_write_dir(path, write)
