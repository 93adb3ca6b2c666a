"""Process memory helpers for the CPU packed-weight path (:mod:`ankus.generation.packing`).

Packing a frozen weight frees its dense memory for the duration of a ``generate`` call and
rebuilds it afterwards. Three things decide whether that shows up as less memory used by the
process, and they live here:

* glibc keeps freed heap blocks inside the process: :func:`malloc_trim` hands them back;
* a weight that ``from_pretrained`` memory-maps from a safetensors file keeps its file pages
  resident after its tensor is gone: :func:`file_backed_ranges` finds such mappings
  (``/proc/self/maps``) and :func:`release_pages` drops the pages (``madvise(MADV_DONTNEED)``);
* a rebuilt weight is put in pages of its own (:func:`mapped_empty`, an anonymous ``mmap``)
  rather than in the heap, where it would pin the free space around it.

Every function is a no-op or falls back to plain torch memory where the OS lacks the call
(macOS, musl, Windows). This module keeps no state.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import warnings

import torch
from torch import Tensor

_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def malloc_trim() -> None:
    """Return glibc's freed heap blocks to the OS; without glibc freed memory stays with the process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def mapped_empty(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous tensor in pages of its own (an anonymous ``mmap``), outside
    malloc's heap. A rebuilt weight lives for the rest of the run; in the heap, where glibc puts
    blocks of this size once larger ones have been freed, it would pin the heap's free space
    around it, and the next phase's allocations would grow the heap instead (measured: a Hydra
    PPO run peaked 150 MB higher). Its pages go back to the OS when the tensor is freed."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows: malloc's memory, as any tensor)
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # (a writable buffer: no warning is due; be sure none is shown)
        warnings.simplefilter("ignore")
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shared with a fork
        return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


def file_backed_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's memory mapped from files (Linux), e.g. safetensors weights
    that ``from_pretrained`` maps rather than copies. Empty elsewhere."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_pages(start: int, nbytes: int) -> None:
    """Drop the whole pages of [start, start + nbytes) from a private file mapping whose tensor is
    gone (``MADV_DONTNEED``): the mapping stays, for the weights beside it, but these pages stop
    counting as the process's memory. A page shared with a neighbouring tensor is kept."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + nbytes) // page * page
    if hi > lo:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
        except (OSError, AttributeError):
            pass
