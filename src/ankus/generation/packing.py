"""Linear layers through oneDNN with packed weights, for CPU sampling: :func:`packed_linears`.

Profiled at batch 16, a SmolLM2-135M decode step is ~75% linear layers (fp32 GEMMs with 16
rows). Within :func:`packed_linears` every ``nn.Linear`` (and GPT-2's ``Conv1D``) computes
through oneDNN with its weight reordered once into oneDNN's blocked layout: the same fp32
products ~1.3-1.6x faster than MKL on this AMD CPU (lm_head ~2x), close to one core's fp32 peak.
Results differ from MKL's by fp32 summation order only. ``dtype=torch.bfloat16`` packs bf16
weights instead (AVX512-BF16): faster, but the numbers change, so ``generate`` makes it opt-in.
Whether oneDNN can run here at all is decided by :mod:`ankus.generation.onednn`'s probe.

A weight gets its packed form one of two ways:

* trainable (or shared) weights: a packed *copy*, cached per parameter and re-made when the
  parameter changes (its version counter moves, as under an optimizer step);
* frozen weights used by one layer (Hydra's trunk, a LoRA base), with ``move_frozen``: the weight
  *moves* into its packed form for the block and is rebuilt bit for bit afterwards, so sampling
  holds it once; a memory-mapped weight's file pages are released meanwhile
  (:mod:`ankus.generation.memory`).

Module-level cache:

* ``_PACKED``: id(parameter) -> (weak reference, (version, data_ptr, dtype, transpose), packed
  copy). Filled by :func:`packed_linears` for weights that are copied, not moved; an entry goes
  away with its parameter (a weakref finalizer). Freed by :func:`release_packed` (one model's
  copies, keeping the entries for the next packing) or :func:`release_all_packed` (everything).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator

import torch
from torch import Tensor, nn

from ankus.generation.memory import file_backed_ranges, malloc_trim, mapped_empty, release_pages
from ankus.generation.onednn import packed_matmul, probe, reorder_weight

_PACKED: dict[int, tuple[weakref.ref, tuple | None, Tensor | None]] = {}


def conv1d_type():
    """transformers' GPT-2 style ``Conv1D`` (a linear layer with its weight stored (in, out)), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _packed_weight(weight: Tensor, transpose: bool, dtype: torch.dtype, rows_hint: int) -> Tensor:
    """oneDNN's blocked copy of ``weight`` (out, in), made once per parameter version."""
    key = (weight._version, weight.data_ptr(), dtype, transpose)
    hit = _PACKED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    w = weight.detach()
    w = (w.t() if transpose else w).contiguous().to(dtype)
    packed = reorder_weight(w, rows_hint)
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = (weakref.ref(weight), key, packed)
    return packed


def _packed_forward(module: nn.Module, packed: Tensor, out_features: int, x: Tensor, dense: bool = True) -> Tensor:
    compute_dtype = packed.dtype
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if dense and x2.shape[0] == 1 and compute_dtype == module.weight.dtype:
        # one row (batch-1 decoding): MKL's matrix-vector path is ~4% faster than oneDNN's here
        return type(module).forward(module, x)
    if x2.dtype != compute_dtype:
        x2 = x2.to(compute_dtype)
    bias = module.bias
    b = None if bias is None else bias.detach().to(compute_dtype)
    y = packed_matmul(x2, packed, b)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)  # bf16 mode: the residual stream stays in the model's dtype
    return y.reshape(*shape[:-1], out_features)


def packed_linears_available(model) -> bool:
    """CPU, float weights, and oneDNN's packed linear runs here (see :func:`ankus.generation.onednn.probe`)."""
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and probe()[0])


def linear_weight_of(mod: nn.Module, conv1d) -> tuple[Tensor, bool, int] | None:
    """(weight, stored transposed, out features) of a plain linear layer on CPU, else None."""
    if type(mod) is nn.Linear:
        weight, transpose, out_features = mod.weight, False, mod.out_features
    elif conv1d is not None and type(mod) is conv1d:
        weight, transpose, out_features = mod.weight, True, mod.nf
    else:
        return None
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return weight, transpose, out_features


@contextlib.contextmanager
def packed_linears(model, dtype: torch.dtype | None = None, rows_hint: int = 16,
                   move_frozen: bool = False) -> Iterator[int]:
    """Within the block, each plain ``nn.Linear`` / ``Conv1D`` of ``model`` computes through oneDNN
    with a packed weight (an instance-level ``forward``; the module tree, hooks and the model's
    own forward are untouched). Inference only: packed weights carry no gradient. Yields the
    number of layers swapped.

    ``move_frozen``: a weight that does not train, is used by this one layer alone (not a head
    tied to the embeddings) and keeps its dtype is *moved* into its packed form: its dense memory
    is released for the block (the parameter keeps its shape and dtype, and reads NaN), and on
    leaving it is rebuilt from the packed form bit for bit (a reorder only moves values). Other
    weights get a cached packed copy beside them, as without the flag."""
    conv1d = conv1d_type()
    swapped: list[nn.Module] = []
    moved: list[tuple[nn.Parameter, Tensor, bool]] = []  # (weight, its packed form, transposed)
    users = _weight_users(model) if move_frozen else {}
    try:
        with torch.no_grad():
            file_ranges = file_backed_ranges() if move_frozen else []
            for mod in model.modules():
                if "forward" in mod.__dict__:
                    continue  # already swapped (shared module) or patched by someone else
                found = linear_weight_of(mod, conv1d)
                if found is None:
                    continue
                weight, transpose, out_features = found
                target = dtype or weight.dtype
                if (move_frozen and not weight.requires_grad and target == weight.dtype and users.get(id(weight)) == 1
                        and _sole_owner(weight)):
                    packed = _move_to_packed(weight, transpose, rows_hint, file_ranges)
                    moved.append((weight, packed, transpose))
                    malloc_trim()  # the reorder's freed temporaries, before the next weight's
                    mod.forward = functools.partial(_packed_forward, mod, packed, out_features, dense=False)
                else:
                    packed = _packed_weight(weight, transpose, target, rows_hint)
                    mod.forward = functools.partial(_packed_forward, mod, packed, out_features)
                swapped.append(mod)
            if moved:
                malloc_trim()
        yield len(swapped)
    finally:
        for mod in swapped:
            del mod.forward
        _rebuild(moved)


def _rebuild(moved: list[tuple[nn.Parameter, Tensor, bool]]) -> None:
    """Give each moved weight its dense values back, bit for bit, emptying ``moved``: one packed
    form is freed per weight rebuilt, so never both forms of every weight are held at once."""
    rebuilt = bool(moved)
    with torch.no_grad():
        while moved:
            weight, packed, transpose = moved.pop()
            dense = packed.to_dense()  # (out, in)
            weight.data = mapped_empty(weight.shape, weight.dtype).copy_(dense.t() if transpose else dense)
            del packed, dense
            malloc_trim()
    if rebuilt:
        malloc_trim()  # the packed forms' memory


def _weight_users(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many (module, name) slots hold it (2 for a head tied to the embeddings)."""
    counts: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _sole_owner(weight: Tensor) -> bool:
    """Nothing but ``weight`` holds its memory (no view of it elsewhere), and it is all of it."""
    storage = weight.untyped_storage()
    # 2 = the parameter and the ``storage`` object made on the line above
    return (torch._C._storage_Use_Count(storage._cdata) == 2 and weight.is_contiguous()
            and storage.nbytes() == weight.numel() * weight.element_size())


def _move_to_packed(weight: nn.Parameter, transpose: bool, rows_hint: int, file_ranges) -> Tensor:
    """The packed form of ``weight``; its dense memory is released (see ``packed_linears``)."""
    hit = _PACKED.pop(id(weight), None)  # a cached copy of this very version is reused
    key = (weight._version, weight.data_ptr(), weight.dtype, transpose)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        packed = hit[2]
    else:
        packed = reorder_weight((weight.detach().t() if transpose else weight.detach()).contiguous(), rows_hint)
    start, nbytes = weight.data_ptr(), weight.numel() * weight.element_size()
    # same shape and dtype, one element of storage: anything that reads it during the block gets NaN
    weight.data = torch.full((), float("nan"), dtype=weight.dtype).expand(weight.shape)
    if any(lo <= start and start + nbytes <= hi for lo, hi in file_ranges):
        release_pages(start, nbytes)
    return packed


def release_packed(model: nn.Module) -> int:
    """Drop the packed copies of ``model``'s weights that :func:`packed_linears` keeps for later
    calls (as large as the weights themselves: 0.5 GB for SmolLM2-135M in fp32); the next call
    packs them again (~0.4 s for SmolLM2-135M on one core). For a caller that does other work
    between generations, such as PPO scoring and updating after its rollouts. The freed memory is
    then handed back to the OS (glibc's ``malloc_trim``: freed heap blocks are otherwise kept by
    the process). Returns the number of packed weights dropped."""
    ids = {id(p) for p in model.parameters()}
    dropped = 0
    for key in ids & _PACKED.keys():
        ref, _, packed = _PACKED[key]
        if packed is not None:
            _PACKED[key] = (ref, None, None)  # the entry and its finalizer stay, for the next packing
            dropped += 1
    if dropped:
        malloc_trim()
    return dropped


def release_all_packed() -> int:
    """Drop every cached packed copy, of every model (the entries too); returns how many packed
    weights were dropped. Later calls pack again."""
    dropped = sum(packed is not None for _, _, packed in _PACKED.values())
    _PACKED.clear()  # (the finalizers left behind pop with a default: harmless)
    if dropped:
        malloc_trim()
    return dropped
