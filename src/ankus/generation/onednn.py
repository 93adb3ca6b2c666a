"""Which linear layers CPU sampling runs, and why: oneDNN with packed weights, or plain ``F.linear``.

``generate`` on CPU runs every linear layer through oneDNN with its weight packed once
(:mod:`ankus.generation.packing`). That needs a torch built with oneDNN whose private
``torch.ops.mkldnn`` linear ops exist and compute correctly here. :func:`probe` checks exactly
that, once per process, on a small weight against ``F.linear``; when it fails, sampling falls
back to the model's own linear layers (MKL) with the same results at lower speed, and the reason
is logged once on the ``ankus.generation`` logger. :func:`linear_path` says which paths
can run for one model and config (:mod:`ankus.generation.path_timing` measures which is faster,
and its ``cpu_path_info`` reports the decision with the threads and :func:`onednn_isa`).

Module-level cache:

* ``_PROBE``: the probe's result (keys ``ok``, ``reason``) and oneDNN's ISA (``isa``, ``impl``),
  a few strings. Filled by :func:`probe` (at the first CPU ``generate`` call) and by
  :func:`onednn_isa`; never grows past those keys. The probe's result is
  forgotten by :func:`reset_probe` (tests; a changed torch); the ISA lives as long as the process.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("ankus.generation")

_PROBE: dict[str, object] = {}  # "ok", "reason"; "isa", "impl" once cpu_path_info captured them

PACKED = "onednn-packed"
PACKED_BF16 = "onednn-packed-bf16"
PLAIN = "plain-linear"
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def reorder_weight(weight: Tensor, rows_hint: int) -> Tensor:
    """oneDNN's blocked (packed) copy of a contiguous (out, in) weight, laid out for about
    ``rows_hint`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)


def packed_matmul(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (R, in) @ packed.T + bias -> (R, out), in the packed weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _run_probe() -> tuple[bool, str]:
    if not torch.backends.mkldnn.is_available():
        return False, "torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, op):
            return False, f"torch {torch.__version__} has no torch.ops.mkldnn.{op}"
    weight = torch.linspace(-1, 1, 24 * 40).reshape(24, 40)
    x = torch.linspace(1, -0.5, 5 * 40).reshape(5, 40)
    bias = torch.linspace(0, 1, 24)
    try:
        y = packed_matmul(x, reorder_weight(weight, 5), bias)
    except Exception as e:  # an op that exists but cannot run on this CPU / build
        return False, f"the packed oneDNN linear failed: {type(e).__name__}: {e}"
    if y.shape != (5, 24) or not torch.allclose(y, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4):
        return False, "the packed oneDNN linear disagrees with F.linear"
    return True, "the packed oneDNN linear ran and matched F.linear"


def probe() -> tuple[bool, str]:
    """(usable, reason): whether the packed oneDNN linear runs here and gives ``F.linear``'s
    numbers. Run once per process (see :func:`reset_probe`); a failure is logged once."""
    if "ok" not in _PROBE:
        ok, reason = _run_probe()
        _PROBE.update(ok=ok, reason=reason)
        if not ok:
            logger.warning("packed oneDNN linears unavailable (%s); CPU generation falls back to the model's "
                           "own linear layers (same numbers, slower)", reason)
    return bool(_PROBE["ok"]), str(_PROBE["reason"])


def reset_probe() -> None:
    """Forget the probe's result; the next use probes again. (The captured ISA stays: oneDNN
    prints it once per process, and reads its ISA limits once, at start.)"""
    _PROBE.pop("ok", None)
    _PROBE.pop("reason", None)


def _sharded(model) -> bool:
    try:
        from ankus.distributed import is_sharded

        return is_sharded(model)
    except ImportError:  # a torch build without torch.distributed
        return False


def linear_path(model, packed_linears: bool = True, bf16: bool = False) -> tuple[str, str]:
    """(path, reason) for ``model`` from what can run: :data:`PACKED_BF16` (opt-in), :data:`PACKED`
    or :data:`PLAIN` (the model's own layers). Raises ``ValueError`` for bf16 where packed linears
    cannot run (bf16 is a CPU oneDNN option). Whether packed is also the faster of the fp32 paths
    is measured by :func:`ankus.generation.path_timing.measured_linear_path`."""
    if not (packed_linears or bf16):
        return PLAIN, "packed_linears=False"
    p = next(model.parameters(), None)
    if p is None:
        why = "the model has no parameters"
    elif p.device.type != "cpu":
        why = f"weights on {p.device.type}, packing is a CPU path"
    elif p.dtype not in (torch.float32, torch.bfloat16):
        why = f"weights in {p.dtype}, packing takes float32 or bfloat16"
    else:
        ok, why = probe()
        why = None if ok else why
    if bf16:
        if why is not None:
            raise ValueError(f"bf16=True is a CPU option (oneDNN bf16 linears) and is unavailable here: {why}; "
                             "on GPU load the model in bf16 instead")
        return PACKED_BF16, "bf16=True"
    if why is not None:
        return PLAIN, why
    if _sharded(model):
        return PLAIN, "an FSDP-sharded model (its forward gathers weights)"
    return PACKED, "oneDNN probe passed"


def _capture_onednn_verbose() -> str:
    """oneDNN's verbose lines for one small packed linear. oneDNN writes them to the C-level
    stdout, so file descriptor 1 is pointed at a temporary file meanwhile; its header (with the
    ISA) is printed only the first time verbose mode is turned on in a process."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                packed_matmul(torch.ones(4, 16), reorder_weight(torch.ones(8, 16), 4), None)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace")


def onednn_isa() -> tuple[str | None, str | None]:
    """(ISA oneDNN dispatches to, the matmul implementation it picked), None where unknown."""
    if "isa" not in _PROBE:
        isa = impl = None
        if probe()[0]:
            try:
                lines = _capture_onednn_verbose().splitlines()
            except (OSError, RuntimeError):
                lines = []
            for line in lines:
                fields = line.split(",")
                isa = next((f[4:] for f in fields if f.startswith("isa:")), isa)
                if "primitive" in fields and "exec" in fields and "reorder" not in fields and len(fields) > 6:
                    impl = fields[6]  # e.g. brg_matmul:avx512_core
        _PROBE.update(isa=isa, impl=impl)
    return _PROBE["isa"], _PROBE["impl"]
