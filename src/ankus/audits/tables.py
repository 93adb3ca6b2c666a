"""Writing an audit's rows (the run's config, ``table.csv`` with floats rounded, ``rows.jsonl``) and
its plots over training steps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ankus.config import save_yaml


def write_rows(out: str | Path, cfg, rows: list[dict], columns: list[str], decimals: int = 4) -> Path:
    """``cfg`` as ``config.yaml``, ``rows`` as ``table.csv`` (``columns`` in order) and ``rows.jsonl``
    (full precision) in ``out``, created if missing; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows([{k: (f"{v:.{decimals}f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def step_axes(ax, linthresh: float) -> None:
    """An x axis of training steps (symlog from 0), a grid and a small legend."""
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=0)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
