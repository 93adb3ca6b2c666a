"""Shared by the experiment scripts: a pretrain run in a child process, and its peak memory.

Each run is one ``ankus train`` in a fresh Python process so that its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read inside the child at the end) is its own; torch's
allocations are outside tracemalloc's view, hence RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from ankus.cli import run_recipe
t0 = time.time()
out = run_recipe(sys.argv[1], sys.argv[3:])
out["wall_s"] = time.time() - t0
out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
open(sys.argv[2], "w").write(json.dumps(out))
"""


def run_pretrain(recipe: str, overrides: list[str], out_json: Path) -> dict:
    """Run ``ankus train recipe overrides`` in a child process; its summary plus wall_s and max_rss_mb."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    t0 = time.time()
    subprocess.run([sys.executable, "-c", CHILD, recipe, str(out_json), *overrides], check=True, env=env)
    print(f"  {out_json.stem}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(out_json.read_text())


def read_metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
