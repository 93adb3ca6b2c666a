"""Directories written whole or not at all.

Every directory ankus leaves behind (a saved model, a checkpoint, the dequantized GGUF cache, a
corpus) is written under a temporary name beside its final path and renamed into place, so a
crash or SIGKILL never leaves a half-written directory under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write_dir"]


def atomic_write_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then rename ``tmp_dir`` onto ``final``; an existing ``final`` is
    swapped out and deleted (a newer checkpoint or model wins, and so does a complete cache over
    a broken one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        write(tmp)
        if not final.exists():
            os.replace(tmp, final)
        else:
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
