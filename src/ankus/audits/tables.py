"""Writing an audit's rows: the run's config, ``table.csv`` (floats rounded) and ``rows.jsonl``."""

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
