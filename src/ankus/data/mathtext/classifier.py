"""A small math-score classifier: hashed word/LaTeX-command/symbol n-grams -> logistic regression.

OpenWebMath's MathScore is a classifier of a page's extracted text; this one is trained here
on the labelled pages of ``tests/fixtures/mathtext_pages.tar.xz`` (``ankus data math-train``).
Features are stateless (scikit-learn's ``HashingVectorizer``), so the saved model is just the
weight vector and intercept (``.npz``, loaded with ``allow_pickle=False``) plus the feature
settings and training record (``.json``) -- no pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

from ankus.data.io import DataError

# LaTeX commands, words of 2+ letters/digits, and the symbols of formulas
TOKEN_PATTERN = r"\\[A-Za-z]+|\b\w\w+\b|[$^_=+<>()|]"
MAX_CHARS = 20000  # a page's text is read up to here


@dataclass
class MathClassifier:
    coef: np.ndarray  # [n_features] float32
    intercept: float
    n_features: int = 1 << 14
    ngram_max: int = 2
    meta: dict = field(default_factory=dict)

    def features(self, texts: list[str]):
        """texts -> sparse [N, n_features], rows L2-normalised."""
        vec = HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram_max), alternate_sign=False,
                                token_pattern=TOKEN_PATTERN, lowercase=True, norm="l2", dtype=np.float32)
        return vec.transform([t[:MAX_CHARS] for t in texts])

    def scores(self, texts: list[str]) -> np.ndarray:
        """texts -> [N] P(math) in [0, 1]."""
        z = self.features(texts) @ self.coef + self.intercept  # [N]
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def train(texts: list[str], labels: list[int], *, n_features: int = 1 << 14, ngram_max: int = 2, c: float = 4.0,
          meta: dict | None = None) -> MathClassifier:
    """Fit L2-regularised logistic regression (liblinear, deterministic) on labelled texts."""
    if len(set(labels)) != 2:
        raise DataError(f"math-train needs both labels (0 and 1) in the training pages; got {sorted(set(labels))}")
    clf = MathClassifier(np.zeros(n_features, np.float32), 0.0, n_features, ngram_max, dict(meta or {}))
    lr = LogisticRegression(C=c, solver="liblinear", class_weight="balanced", random_state=0)
    lr.fit(clf.features(texts), np.asarray(labels))
    clf.coef = lr.coef_[0].astype(np.float32)
    clf.intercept = float(lr.intercept_[0])
    clf.meta.update({"C": c, "n_train": len(labels), "n_math_train": int(sum(labels))})
    return clf


def save(clf: MathClassifier, stem: str | Path) -> tuple[Path, Path]:
    """Write ``stem.npz`` (weights) and ``stem.json`` (settings + meta)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    np.savez_compressed(npz, coef=clf.coef, intercept=np.array([clf.intercept], np.float64))
    info = {"format": "ankus-math-classifier/1", "n_features": clf.n_features, "ngram_max": clf.ngram_max,
            "token_pattern": TOKEN_PATTERN, "max_chars": MAX_CHARS, "meta": clf.meta}
    js.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return npz, js


def load(stem: str | Path) -> MathClassifier:
    """Read a classifier written by :func:`save` (``stem``, ``stem.npz`` or ``stem.json``)."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".npz", ".json") else stem
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    for p in (npz, js):
        if not p.exists():
            raise DataError(f"math classifier file {p} not found; train one with `ankus data math-train`")
    info = json.loads(js.read_text())
    if info.get("format") != "ankus-math-classifier/1" or info.get("token_pattern") != TOKEN_PATTERN:
        raise DataError(f"{js} is not an ankus math classifier of this version (format/token pattern differ); retrain it")
    with np.load(npz, allow_pickle=False) as z:
        coef, intercept = z["coef"].astype(np.float32), float(z["intercept"][0])
    if coef.shape != (info["n_features"],):
        raise DataError(f"{npz}: weight vector has shape {coef.shape}, expected ({info['n_features']},)")
    return MathClassifier(coef, intercept, info["n_features"], info["ngram_max"], info.get("meta", {}))


def default_path() -> Path:
    """The classifier shipped in ``ankus/assets`` (trained on the fixture's train split)."""
    return Path(__file__).resolve().parents[2] / "assets" / "math_classifier"
