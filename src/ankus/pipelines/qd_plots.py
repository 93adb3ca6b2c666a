"""QDAIF's tables and plots: curves over iterations (all methods) and archive heatmaps."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["write_csv", "plot_curves", "plot_heatmap"]


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows (dicts) as CSV; the columns are the union of the keys, in first-seen order."""
    path = Path(path)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: Sequence[dict], path: str | Path) -> Path:
    """QD score and coverage against LM calls, one line per method, two panels."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for ax, key in zip(axes, ("qd_score", "coverage")):
            ax.plot([r["lm_calls"] for r in mine], [r[key] for r in mine], marker="o", markersize=3, label=method)
    for ax, key in zip(axes, ("QD score (sum of elite qualities)", "coverage (filled cells / cells)")):
        ax.set_title(key)
        ax.set_xlabel("LM calls (texts generated and judged)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_heatmap(archive, path: str | Path, title: str = "") -> Path:
    """Quality per cell (blank = empty); axes are bin indices labelled with the non-uniform edges."""
    plt = _plt()
    grid, values = archive.grid, archive.grid_values()
    if values.ndim == 1:
        values = values[None, :]  # (1, bins): a strip
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * values.shape[1] + 2), 2.2 if values.shape[0] == 1 else 6.0))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="quality")
    x_name, x_ticks = grid.names[-1], grid.ticks[-1]
    ax.set_xticks(np.arange(len(x_ticks)) + 0.5, [f"{t:g}" for t in x_ticks], rotation=60, fontsize=7)
    ax.set_xlabel(f"{x_name} (bin edges)")
    if len(grid.names) == 2:
        ax.set_yticks(np.arange(len(grid.ticks[0])) + 0.5, [f"{t:g}" for t in grid.ticks[0]], fontsize=7)
        ax.set_ylabel(f"{grid.names[0]} (bin edges)")
    else:
        ax.set_yticks([])
    ax.set_title(title or f"archive: {len(archive)} elites, coverage {archive.coverage():.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
