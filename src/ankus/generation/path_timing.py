"""Which CPU linear path is fastest on this machine, measured once: :func:`fastest_path`.

A decode step on CPU is mostly its linear layers (~75% for SmolLM2-135M at batch 16), and which
way of running them is fastest depends on the machine: oneDNN with packed weights beat MKL's
``F.linear`` by 1.3-2x on the AMD EPYC these numbers come from, but the ratio moves with the thread
count, the memory bandwidth and the ISA, and bf16 weights are only faster where the CPU has bf16
units (elsewhere oneDNN emulates them). So instead of assuming, :func:`fastest_path` times passes
over every linear weight of the model through each candidate path (the candidates taking turns,
the fastest pass of each kept), with as many input rows as the decode step will have, and keeps
the fastest path. A pass streams every weight once, as a decode step does, so the timing sees the
memory traffic as well as the arithmetic.

The choice is stable rather than eager: plain ``F.linear`` replaces packed oneDNN only when it is
measured at least ``PLAIN_MARGIN`` faster, and bf16 (which changes the sampled tokens' numbers)
only when it is ``BF16_MARGIN`` faster than the best fp32 path. Models whose linear weights are
under ``MIN_BYTES`` are not timed (the packed path is kept): there a pass takes microseconds and
the noise would pick the path, while the choice cannot matter for speed. (A model that small
samples in fp32 with packed weights, as before this measurement existed, on every machine alike.)

Module-level cache:

* ``_CHOICES``: (weight shapes and dtypes, rows, threads, candidates) -> (path, seconds per pass
  of each candidate). One small entry per distinct model shape and batch; the measurement costs
  six passes and one packing of the weights per candidate (~1.5 s for SmolLM2-135M), so it
  is made once per process. :func:`reset_choices` forgets them (tests).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ankus.generation.onednn import (ISA_ENV, PACKED, PACKED_BF16, PLAIN, linear_path, onednn_isa, packed_matmul,
                                    reorder_weight)
from ankus.generation.packing import conv1d_type, linear_weight_of

logger = logging.getLogger("ankus.generation")

PLAIN_MARGIN = 1.05
BF16_MARGIN = 1.15
MIN_BYTES = 64 * 2 ** 20

_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}


def linear_weights(model) -> list[tuple[Tensor, bool]]:
    """(weight, stored transposed) of every distinct ``nn.Linear`` / GPT-2 ``Conv1D`` weight on CPU."""
    conv1d, seen, out = conv1d_type(), set(), []
    for mod in model.modules():
        found = linear_weight_of(mod, conv1d)
        if found is not None and id(found[0]) not in seen:
            seen.add(id(found[0]))
            out.append(found[:2])
    return out


def _pass(path: str, rows: int, weights: list[tuple[Tensor, bool]]) -> Callable[[], None]:
    """One decode-shaped pass over ``weights`` through ``path``: (rows, in) @ each weight."""
    dtype = torch.bfloat16 if path == PACKED_BF16 else torch.float32
    g = torch.Generator().manual_seed(0)
    dims = {w.shape[0] if t else w.shape[1] for w, t in weights}
    xs = {d: torch.randn(rows, d, generator=g).to(dtype) for d in dims}
    if path == PLAIN:
        plain = [(xs[w.shape[0] if t else w.shape[1]], w.detach(), t) for w, t in weights]

        def run() -> None:
            for x, w, t in plain:
                x @ w if t else F.linear(x, w)
        return run
    packed = [(xs[w.shape[0] if t else w.shape[1]],
               reorder_weight((w.detach().t() if t else w.detach()).contiguous().to(dtype), rows)) for w, t in weights]

    def run_packed() -> None:
        for x, p in packed:
            packed_matmul(x, p, None)
    return run_packed


def time_paths(model, rows: int, candidates: tuple[str, ...], repeats: int = 5) -> dict[str, float]:
    """Seconds of one pass over every linear weight of ``model`` through each candidate path, with
    ``rows`` input rows: the fastest of ``repeats`` passes, the candidates taking turns so that load
    from other processes hits all alike (a warm-up pass first; packing is not timed). The packed
    copies made for this are dropped on return."""
    weights = linear_weights(model)
    times: dict[str, list[float]] = {path: [] for path in candidates}
    with torch.no_grad():
        runs = {path: _pass(path, rows, weights) for path in candidates}
        for run in runs.values():
            run()
        for _ in range(repeats):
            for path, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[path].append(time.perf_counter() - t0)
    return {path: min(samples) for path, samples in times.items()}


def choose(times: dict[str, float]) -> str:
    """The path to run from measured seconds per pass: packed unless plain is ``PLAIN_MARGIN``
    faster; then bf16 if it is ``BF16_MARGIN`` faster than that."""
    best = PACKED if PACKED in times else PLAIN
    if PLAIN in times and PACKED in times and times[PLAIN] * PLAIN_MARGIN < times[PACKED]:
        best = PLAIN
    if PACKED_BF16 in times and times[PACKED_BF16] * BF16_MARGIN < times[best]:
        best = PACKED_BF16
    return best


def fastest_path(model, rows: int, candidates: tuple[str, ...],
                 reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[str, dict[str, float]]:
    """(path, seconds per pass of each candidate) for ``model`` decoding ``rows`` rows: measured
    once per model shape, batch and thread count (see the module docstring); ``{}`` as times when
    the model is too small to time. ``reduce``: combines the times over processes before the
    choice (e.g. an all-reduce max), so that every process of a data-parallel run picks alike."""
    weights = linear_weights(model)
    if sum(w.numel() * w.element_size() for w, _ in weights) < MIN_BYTES:
        return candidates[0], {}
    key = (tuple((tuple(w.shape), w.dtype) for w, _ in weights), rows, torch.get_num_threads(), candidates)
    if key not in _CHOICES:
        times = time_paths(model, rows, candidates)
        if reduce is not None:
            times = dict(zip(times, reduce(torch.tensor(list(times.values()), dtype=torch.float64)).tolist()))
        path = choose(times)
        _CHOICES[key] = (path, times)
        logger.info("CPU linear layers at %d rows, %d threads: %s per pass -> %s", rows, torch.get_num_threads(),
                    describe(times), path)
    return _CHOICES[key]


def describe(times: dict[str, float]) -> str:
    """'onednn-packed 61.2 ms, plain-linear 95.0 ms' from seconds per pass."""
    return ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()) or "not timed (linear weights under 64 MiB)"


def reset_choices() -> None:
    """Forget every measured choice; the next call measures again."""
    _CHOICES.clear()


def measured_linear_path(model, packed_linears: bool = True, bf16: bool = False,
                         rows: int | None = None) -> tuple[str, str]:
    """(path, reason) that ``generate`` takes: :func:`~ankus.generation.onednn.linear_path`'s, and
    where that is packed fp32 and ``rows`` (the decode batch) is given, the faster of packed and
    plain as measured by :func:`fastest_path`, the times in the reason."""
    path, reason = linear_path(model, packed_linears, bf16)
    if path != PACKED or rows is None:
        return path, reason
    path, times = fastest_path(model, rows, (PACKED, PLAIN))
    return path, f"{reason}; measured per pass over the linear weights: {describe(times)}"


def cpu_path_info(model=None, config=None, rows: int | None = None) -> dict:
    """What CPU sampling runs here, as a flat dict: ``path`` and ``reason`` (for ``model`` and a
    ``GenerationConfig`` if given, else for a float32 CPU model with the defaults; with ``rows``,
    the path ``generate`` measures as fastest for that batch, see :func:`measured_linear_path`), ``threads``
    and ``interop_threads`` (torch's), ``aten_isa`` (torch's CPU capability), ``onednn_isa``
    and ``onednn_impl`` (from one oneDNN call in verbose mode, captured once per process; None if
    verbose mode was already used, or without oneDNN) and ``isa_limit`` (an ``ONEDNN_MAX_CPU_ISA``
    / ``DNNL_MAX_CPU_ISA`` set in the environment)."""
    if model is None:
        model = torch.nn.Linear(1, 1)
    packed = True if config is None else config.packed_linears
    bf16 = False if config is None else config.bf16
    try:
        path, reason = measured_linear_path(model, packed, bf16, rows)
    except ValueError as e:
        path, reason = "error", str(e)
    isa, impl = onednn_isa()
    return {
        "path": path,
        "reason": reason,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "aten_isa": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": isa,
        "onednn_impl": impl,
        "isa_limit": next((f"{k}={os.environ[k]}" for k in ISA_ENV if os.environ.get(k)), None),
    }
