"""A real install: a wheel built from the sources, installed (not editable) into a fresh venv,
run from a directory with no source checkout in sight.

The fresh venv gets ankus from the wheel only; its dependencies (torch, transformers, ...) come
from the test's own environment through a path file, so nothing is downloaded. Each command is
the README's, shrunk by overrides to a few seconds: the point is that an installed ankus finds
its recipes, its assets and the bundled model on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's bin directory, an empty working directory)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy of what a wheel is built from: no build litter in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = root / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", wheels, source], cwd=root)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("ankus-*.whl"))

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    # the dependencies of this environment, after the venv's own site-packages (a plain path
    # entry: the .pth files there, e.g. an editable ankus, are not processed)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
                cwd=root)
    assert inst.returncode == 0, inst.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return env_dir / "bin", work


def test_the_installed_package_is_the_wheel(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "python", "-c", "import ankus, ankus.recipes as r; print(ankus.__file__); "
                "print(len(r.shipped_recipes()))"], cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    path, count = out.stdout.split()
    assert Path(path).is_relative_to(bin_dir.parent) and str(REPO / "src") not in path
    assert int(count) >= 10


def test_recipes_listed_from_anywhere(installed):
    bin_dir, work = installed
    out = _run([bin_dir / "ankus", "recipes"], cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ppo_randomwalks" in out.stdout and "dpf_smollm2" in out.stdout and "ppo_sentiment" in out.stdout


def test_train_ppo_randomwalks_by_name(installed, tmp_path):
    bin_dir, work = installed
    out = _run([bin_dir / "ankus", "train", "ppo_randomwalks", "warm_start.steps=5", "trainer.total_steps=1",
                "method.num_rollouts=8", "method.chunk_size=8", "trainer.batch_size=8", "method.ppo_epochs=1",
                "data.num_eval=2", "run.progress=false", "run.save_model=false", f"run.out_dir={tmp_path}"], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ppo_randomwalks" / "metrics.jsonl").stat().st_size > 0


def test_demo_runs_installed(installed, tmp_path):
    bin_dir, work = installed
    out = _run([bin_dir / "ankus", "demo", "trainer.total_steps=1", "method.num_rollouts=4", "method.chunk_size=4",
                "trainer.batch_size=4", "method.ppo_epochs=1", "data.num_eval=2", "data.eval_samples=1",
                "generation.max_new_tokens=6", "run.progress=false", "run.save_model=false",
                f"run.out_dir={tmp_path}"], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out" in out.stdout and (tmp_path / "ppo_sentiment" / "metrics.jsonl").exists()


def test_dpf_finds_its_recipe_and_shipped_pairs(installed, tmp_path):
    bin_dir, work = installed
    pairs = tmp_path / "pairs.jsonl"
    out = _run([bin_dir / "ankus", "dpf", "pairs", "--split", "eval", "--limit", "3", "--out", pairs], cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(pairs.read_text().splitlines()) == 3
    # the whole pipeline on a random tiny model: every step runs from the recipe's settings; such a
    # model writes no answer that mentions X, so no preference pair survives, and it says so
    out = _run([bin_dir / "ankus", "dpf", "run", "model.spec=tiny-llama", "lm.spec=tiny-llama", "pairs.train_limit=2",
                "pairs.eval_limit=1", "dialogues.attempts=1", "revision.attempts=1", "run.progress=false",
                f"run.out_dir={tmp_path}"], cwd=work)
    assert (tmp_path / "dpf_smollm2" / "pairs_train.jsonl").exists(), out.stderr[-2000:]
    assert out.returncode == 0 or "no preference pairs survived" in out.stderr, out.stderr[-2000:]
