"""The side-by-side benchmarks run each configuration in a child process of its own (so one
side's memory and threads cannot colour the other's numbers); this starts one and reads back its
``RESULT {json}`` line."""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, name: str, argv: list[str]) -> dict | None:
    """Run ``python SCRIPT --worker NAME ARGV...``; its result dict, or None (its output shown on
    stderr) when it printed no ``RESULT`` line."""
    proc = subprocess.run([sys.executable, script, "--worker", name, *argv], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    print(f"  {name:15s} FAILED (exit {proc.returncode}; its output is above, on stderr)", flush=True)
    return None
