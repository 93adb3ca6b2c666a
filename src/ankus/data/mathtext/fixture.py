"""Labelled pages for the math classifier, and ``ankus data math-train``.

A fixture is a ``.tar.xz`` (or a directory) holding ``labels.jsonl`` and the pages it names::

    {"file": "pages/017.html", "label": 1, "split": "train", "source": "python-mpmath-doc",
     "orig": "html/technical.html", "note": "binary floating-point representation with formulas"}

``label`` 1 = the page's main content states or teaches mathematics (formulas, definitions,
theorems, mathematical computations as the subject); 0 = software, setup, API plumbing,
bibliographies, navigation stubs. The tar is read in memory (members are looked up by the
names in labels.jsonl; nothing is extracted to disk).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ankus.data.io import DataError
from ankus.data.mathtext import classifier as clf_mod
from ankus.data.mathtext.extract import decode_html, extract_html
from ankus.data.mathtext.filters import is_english, math_signals, prefilter


@dataclass
class Page:
    file: str
    label: int
    split: str
    source: str
    html: bytes


def _check_row(row: dict, where: str) -> None:
    for k in ("file", "label", "split"):
        if k not in row:
            raise DataError(f"{where}: labels.jsonl row lacks '{k}': {row}")
    if row["label"] not in (0, 1) or row["split"] not in ("train", "test"):
        raise DataError(f"{where}: label must be 0/1 and split train/test: {row}")


def load_fixture(path: str | Path) -> list[Page]:
    """Pages with labels from a fixture ``.tar.xz`` or directory (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        read = lambda name: (path / name).read_bytes()  # noqa: E731
        rows_text = (path / "labels.jsonl").read_text() if (path / "labels.jsonl").exists() else None
        tar = None
    elif path.is_file():
        try:
            tar = tarfile.open(path, "r:*")
        except tarfile.TarError as e:
            raise DataError(f"{path}: not a readable tar archive ({e})") from e
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        read = lambda name: tar.extractfile(members[name]).read()  # noqa: E731
        rows_text = read("labels.jsonl").decode() if "labels.jsonl" in members else None
    else:
        raise DataError(f"{path}: no such fixture; pass a .tar.xz or a directory with labels.jsonl")
    if rows_text is None:
        raise DataError(f"{path}: no labels.jsonl in the fixture")
    pages = []
    for i, line in enumerate(rows_text.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            _check_row(row, f"{path}:labels.jsonl:{i}")
            try:
                html = read(row["file"])
            except (KeyError, FileNotFoundError) as e:
                raise DataError(f"{path}: labels.jsonl line {i} names {row['file']}, which is not there") from e
            pages.append(Page(row["file"], row["label"], row["split"], row.get("source", ""), html))
    if tar is not None:
        tar.close()
    return pages


def page_text(page: Page) -> tuple[str, str]:
    """(decoded HTML, extracted text) of a fixture page."""
    html = decode_html(page.html).text
    return html, extract_html(html).text


def prf(pred: list[int], gold: list[int]) -> dict:
    """Precision, recall, F1 and accuracy of 0/1 predictions (positive class = math)."""
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    acc = sum(int(p) == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0
    return {"n": len(gold), "positives": sum(gold), "tp": tp, "fp": fp, "fn": fn, "precision": round(prec, 4),
            "recall": round(rec, 4), "f1": round(f1, 4), "accuracy": round(acc, 4)}


def filter_decision(html: str, text: str, score: float, threshold: float = 0.5, latex_threshold: float = 0.2,
                    min_chars: int = 200) -> int:
    """The math-extract filter chain's keep (1) / drop (0) for one page, without dedup/perplexity."""
    signals = math_signals(html, text)
    if len(text) < min_chars or prefilter(signals) or not is_english(text)[0]:
        return 0
    return int(score >= (latex_threshold if signals["latex"] else threshold))


def train_from_fixture(fixture: str | Path, out_stem: str | Path, c: float = 4.0) -> dict:
    """Train on the fixture's ``train`` split, evaluate on ``test`` (classifier alone at 0.5, and
    the whole filter chain); save the classifier with the metrics in its JSON."""
    pages = load_fixture(fixture)
    texts = [page_text(p) for p in pages]
    train = [i for i, p in enumerate(pages) if p.split == "train"]
    test = [i for i, p in enumerate(pages) if p.split == "test"]
    if not train or not test:
        raise DataError(f"{fixture}: need pages in both splits (train: {len(train)}, test: {len(test)})")
    clf = clf_mod.train([texts[i][1] for i in train], [pages[i].label for i in train], c=c,
                        meta={"fixture": Path(fixture).name})
    scores = clf.scores([texts[i][1] for i in test])
    gold = [pages[i].label for i in test]
    chain = [filter_decision(*texts[i], float(s)) for i, s in zip(test, scores)]
    metrics = {"classifier@0.5": prf([int(s >= 0.5) for s in scores], gold), "filter_chain": prf(chain, gold),
               "by_source": _by_source([pages[i] for i in test], chain)}
    clf.meta["heldout"] = metrics
    clf_mod.save(clf, out_stem)
    return metrics


def _by_source(pages: list[Page], pred: list[int]) -> dict:
    out: dict = {}
    for p, y in zip(pages, pred):
        row = out.setdefault(p.source, {"pages": 0, "math": 0, "kept": 0, "correct": 0})
        row["pages"] += 1
        row["math"] += p.label
        row["kept"] += y
        row["correct"] += int(y == p.label)
    return out
