"""A MAP-Elites archive for QDAIF (Bradley et al. 2023) on pyribs' ``GridArchive``.

The archive keeps, in each cell of a grid over the diversity measures, the highest-quality text
seen whose measures fall in that cell. QDAIF's grids are **non-uniform**: each measure lies in
[0, 1] (an AI-feedback probability) and its bins are finer near the ends, where a small model's
probabilities pile up. pyribs' ``GridArchive`` only has uniform bins, so:

* each measure ``x`` is mapped to its bin index with ``np.digitize(x, ticks)`` over the inner bin
  edges ``ticks`` (``len(ticks) + 1`` bins; ``x < ticks[0]`` -> 0, ``x >= ticks[-1]`` -> last);
* the ``GridArchive`` has one cell per bin index: ``dims = len(ticks) + 1`` and range
  ``(0, len(ticks) + 1)`` on each axis, and receives ``index + 0.5`` (the cell's centre) as its
  measure, so pyribs' uniform cell ``i`` is exactly the non-uniform bin ``i``;
* the raw measures (probabilities) ride along as an extra field, for the JSONL and the plots.

QD score is the sum of the elites' qualities (qualities are probabilities in [0, 1], so pyribs'
offset is 0); coverage is the fraction of cells holding an elite.

Saved as ``archive.jsonl`` (one elite per line: bin, text, quality, measures, iteration) and
``archive_meta.json`` (measure names, ticks, grid shape). :func:`load_archive` refuses an
archive saved from another grid (:class:`GridMismatchError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ankus.data.io import DataError

__all__ = ["ArchiveError", "GridMismatchError", "Grid", "bin_index", "QDArchive", "load_archive",
           "ARCHIVE_FILE", "META_FILE"]

ARCHIVE_FILE, META_FILE = "archive.jsonl", "archive_meta.json"
FORMAT = 1


class ArchiveError(DataError):
    """An archive file that cannot be read (missing, malformed, inconsistent)."""


class GridMismatchError(ArchiveError):
    """An archive saved on one grid loaded for another (other measures, ticks or shape)."""


@dataclass(frozen=True)
class Grid:
    """The measures' names and, for each, its inner bin edges (strictly increasing)."""

    names: tuple[str, ...]
    ticks: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not self.names or len(self.names) != len(self.ticks):
            raise ValueError(f"a grid needs one tick list per measure, got {len(self.names)} names and "
                             f"{len(self.ticks)} tick lists")
        for name, t in zip(self.names, self.ticks):
            if len(t) < 1 or any(b <= a for a, b in zip(t, t[1:])):
                raise ValueError(f"measure '{name}': ticks must be a non-empty, strictly increasing list, got {list(t)}")

    @classmethod
    def make(cls, names: Sequence[str], ticks: Sequence[Sequence[float]]) -> "Grid":
        return cls(tuple(names), tuple(tuple(float(x) for x in t) for t in ticks))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(t) + 1 for t in self.ticks)

    @property
    def cells(self) -> int:
        return int(np.prod(self.shape))

    def meta(self) -> dict:
        return {"format": FORMAT, "measures": list(self.names), "ticks": [list(t) for t in self.ticks],
                "shape": list(self.shape)}


def bin_index(grid: Grid, measures: np.ndarray) -> np.ndarray:
    """(N, D) measures in [0, 1] -> (N, D) integer bin indices on the non-uniform grid."""
    measures = np.asarray(measures, dtype=np.float64).reshape(-1, len(grid.names))  # (N, D)
    cols = [np.digitize(measures[:, d], np.asarray(t)) for d, t in enumerate(grid.ticks)]  # D x (N,)
    return np.stack(cols, axis=1).astype(np.int64)  # (N, D), values in [0, len(ticks_d)]


class QDArchive:
    """MAP-Elites archive of texts over a (non-uniform) :class:`Grid`."""

    def __init__(self, grid: Grid) -> None:
        try:
            from ribs.archives import GridArchive  # pyribs; imported here (its import pulls numba)
        except ImportError:
            from ankus.config import ConfigError

            raise ConfigError("ankus qd needs pyribs: pip install 'ankus[qd]' (or 'ribs>=0.12,<0.13')") from None

        self.grid = grid
        d = len(grid.names)
        self._ribs = GridArchive(solution_dim=(), dims=list(grid.shape), ranges=[(0, n) for n in grid.shape],
                                 solution_dtype=object, qd_score_offset=0.0,
                                 extra_fields={"raw": ((d,), np.float64), "iteration": ((), np.int64)})

    def __len__(self) -> int:
        return len(self._ribs)

    def add(self, texts: Sequence[str], quality: Sequence[float], measures: np.ndarray,
            iteration: int = 0) -> np.ndarray:
        """Insert candidates; returns pyribs' status per candidate (0 not added, 1 improved a
        cell, 2 filled a new cell). Candidates in one call compete for their cells."""
        if not len(texts):
            return np.zeros(0, dtype=np.int32)
        measures = np.asarray(measures, dtype=np.float64).reshape(len(texts), len(self.grid.names))  # (N, D)
        centres = bin_index(self.grid, measures) + 0.5  # (N, D): the uniform cell of each bin
        out = self._ribs.add(np.array(list(texts), dtype=object), np.asarray(quality, dtype=np.float64), centres,
                             raw=measures, iteration=np.full(len(texts), iteration, dtype=np.int64))
        return np.asarray(out["status"])

    def elites(self) -> list[dict]:
        """One dict per filled cell, in bin order: bin, text, quality, measures, iteration."""
        data = self._ribs.data()
        bins = bin_index(self.grid, data["raw"]) if len(data["raw"]) else np.zeros((0, len(self.grid.names)), int)
        rows = [{"bin": [int(b) for b in bins[i]], "text": str(data["solution"][i]),
                 "quality": float(data["objective"][i]), "measures": [float(x) for x in data["raw"][i]],
                 "iteration": int(data["iteration"][i])} for i in range(len(bins))]
        return sorted(rows, key=lambda r: r["bin"])

    def qd_score(self) -> float:
        """Sum of the elites' qualities."""
        return float(np.sum(self._ribs.data("objective"))) if len(self) else 0.0

    def coverage(self) -> float:
        """Filled cells / all cells."""
        return len(self) / self.grid.cells

    def grid_values(self) -> np.ndarray:
        """Quality per cell, NaN where empty: an array of the grid's shape (for heatmaps)."""
        values = np.full(self.grid.shape, np.nan)
        for e in self.elites():
            values[tuple(e["bin"])] = e["quality"]
        return values

    def save(self, directory: str | Path) -> None:
        """Write ``archive.jsonl`` and ``archive_meta.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ARCHIVE_FILE, "w", encoding="utf-8") as f:
            for e in self.elites():
                f.write(json.dumps(e) + "\n")
        (directory / META_FILE).write_text(json.dumps(self.grid.meta(), indent=1) + "\n")


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        raise ArchiveError(f"{path}: no archive metadata here; is {directory} an archive saved by ankus qd?")
    try:
        meta = json.loads(path.read_text())
        return {"measures": list(meta["measures"]), "ticks": [[float(x) for x in t] for t in meta["ticks"]],
                "shape": list(meta["shape"])}
    except (ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"{path}: malformed archive metadata ({type(e).__name__}: {e})") from None


def load_archive(directory: str | Path, grid: Grid) -> QDArchive:
    """The archive saved in ``directory``, on ``grid``; :class:`GridMismatchError` when it was
    saved on another grid, :class:`ArchiveError` when a line is malformed or off its bin."""
    directory = Path(directory)
    meta, want = _read_meta(directory), grid.meta()
    for key in ("measures", "shape", "ticks"):
        if meta[key] != want[key]:
            raise GridMismatchError(f"{directory}: the archive was saved on another grid ({key} {meta[key]} here, "
                                    f"{want[key]} in this config); load it with its own recipe or start a new run")
    archive = QDArchive(grid)
    path = directory / ARCHIVE_FILE
    if not path.is_file():
        raise ArchiveError(f"{path}: missing (the metadata is there, the elites are not)")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, quality, measures = str(row["text"]), float(row["quality"]), [float(x) for x in row["measures"]]
            stored_bin, iteration = [int(b) for b in row["bin"]], int(row.get("iteration", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise ArchiveError(f"{path}, line {n}: malformed elite ({type(e).__name__}: {e})") from None
        if len(measures) != len(grid.names) or bin_index(grid, np.array([measures]))[0].tolist() != stored_bin:
            raise ArchiveError(f"{path}, line {n}: measures {measures} do not fall in the stored bin {stored_bin}")
        archive.add([text], [quality], np.array([measures]), iteration)
    return archive
