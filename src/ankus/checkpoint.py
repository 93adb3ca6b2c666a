"""Resumable checkpoints, graceful stops and the non-finite-loss guard.

A checkpoint is a directory ``<run>/checkpoints/step-00000012/`` written atomically (a temporary
directory renamed into place), holding

    <name>.safetensors   the state of each module given (model, value head, ...)
    optimizer.pt         optimizer state, read back with torch.load(weights_only=True)
    scheduler.pt         LR scheduler state (same)
    rng.pt               torch's global RNG, named torch.Generators, Python's `random` state
    state.json           {"step": 12, "extra": {...}} — KL controller, running moments, data position

Nothing is ever unpickled: weights are safetensors, and torch state is loaded with
``weights_only=True``. Only the newest ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ankus.atomic import atomic_write_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): save each tensor once, contiguous.
    state, seen = {}, {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_checkpoint(run_dir: str | Path, step: int, *, modules: Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    generators: Mapping[str, torch.Generator] | None = None, extra: Mapping[str, Any] | None = None,
                    keep_last: int = 2) -> Path:
    """Write ``<run>/checkpoints/step-<step>`` atomically; delete all but the newest ``keep_last``."""
    def write(tmp: Path) -> None:
        for name, module in modules.items():
            save_file(_module_state(module), str(tmp / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "generators": {k: g.get_state() for k, g in (generators or {}).items()}}, tmp / "rng.pt")
        py_state = random.getstate()
        state = {"step": step, "extra": dict(extra or {}),
                 "python_random": [py_state[0], list(py_state[1]), py_state[2]]}
        (tmp / "state.json").write_text(json.dumps(state))

    path = atomic_write_dir(checkpoint_dir(run_dir) / f"step-{step:08d}", write)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path, *, modules: Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote, in place; returns ``{"step": ..., **extra}``."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    for name, module in modules.items():
        state = load_file(str(path / f"{name}.safetensors"))
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise RuntimeError(f"checkpoint {path}/{name}.safetensors does not match the model: {e}") from None
        # tied weights were saved once; anything else missing is a real mismatch
        tied = {k for k in missing if _is_tied_alias(module, k, state)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"checkpoint {path}/{name}.safetensors does not match the model: "
                               f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    for name, gen in (generators or {}).items():
        gen.set_state(rng["generators"][name])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return {"step": state["step"], **state["extra"]}


def _is_tied_alias(module: torch.nn.Module, key: str, saved: Mapping[str, torch.Tensor]) -> bool:
    """True if parameter ``key`` shares storage with a parameter that was saved."""
    live = module.state_dict()
    ptr = live[key].data_ptr()
    return any(live[k].data_ptr() == ptr for k in saved if k in live and k != key)


class GracefulExit:
    """Within this context SIGTERM and SIGINT only set ``requested``; the loop checkpoints and stops.

        with GracefulExit() as stop:
            for step in ...:
                ...
                if stop.requested: save; break
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C really stops
        self.requested = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False

    def after_step(self, done: int, total_steps: int, every: int, save: Callable[[int], Any], name: str) -> bool:
        """The end of step ``done`` of a training loop: ``save(done)`` every ``every`` steps (not at
        the last step, which the trainer's finish saves), and when a stop was requested on any
        process (a collective: every rank calls it) save, say so and return True."""
        from ankus import distributed

        stopping = distributed.any_rank(self.requested)
        if stopping or (every and done % every == 0 and done < total_steps):
            save(done)
        if stopping and distributed.is_main():
            print(f"[{name}] stop requested: checkpoint saved at step {done}; continue with --resume")
        return stopping


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class NonFiniteGuard:
    """Skip steps whose loss or gradient norm is NaN/inf; raise after ``max_bad`` in a row."""

    def __init__(self, max_bad: int = 5):
        self.max_bad = max_bad
        self.consecutive = 0
        self.skipped = 0

    def check(self, *values: torch.Tensor | float) -> bool:
        """True if every value is finite (take the step); False to skip it."""
        ok = all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
        if ok:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_bad:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps had a NaN/inf loss or gradient; stopping. "
                "Lower the learning rate, check the data and reward, or raise trainer.max_bad_steps. "
                "The last good checkpoint is in the run's checkpoints/ directory."
            )
        return False
