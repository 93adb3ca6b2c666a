"""Math-filter evaluation on the labelled fixture, beyond the one held-out split of math-train:
the prefilter alone, the classifier at several thresholds (held-out split), and 5-fold
cross-validation of the classifier over all pages (folds by sha256 of the file name).

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/mathtext_eval.py
"""

import hashlib
import json
from pathlib import Path

from ankus.data.mathtext import classifier as C
from ankus.data.mathtext.filters import math_signals, prefilter
from ankus.data.mathtext.fixture import filter_decision, load_fixture, page_text, prf

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mathtext_pages.tar.xz"


def main() -> None:
    pages = load_fixture(FIXTURE)
    texts = [page_text(p) for p in pages]
    test = [i for i, p in enumerate(pages) if p.split == "test"]
    gold = [pages[i].label for i in test]
    pre = [int(prefilter(math_signals(*texts[i])) is None) for i in test]
    out = {"prefilter_only": prf(pre, gold)}
    clf = C.load(C.default_path())
    scores = clf.scores([texts[i][1] for i in test])
    for t in (0.3, 0.5, 0.7):
        out[f"classifier@{t}"] = prf([int(s >= t) for s in scores], gold)
    fold = [int(hashlib.sha256(p.file.encode()).hexdigest(), 16) % 5 for p in pages]
    pred, chain = [0] * len(pages), [0] * len(pages)
    for k in range(5):
        tr = [i for i in range(len(pages)) if fold[i] != k]
        te = [i for i in range(len(pages)) if fold[i] == k]
        m = C.train([texts[i][1] for i in tr], [pages[i].label for i in tr])
        for i, s in zip(te, m.scores([texts[i][1] for i in te])):
            pred[i], chain[i] = int(s >= 0.5), filter_decision(*texts[i], float(s))
    all_gold = [p.label for p in pages]
    out["cv5_classifier@0.5"] = prf(pred, all_gold)
    out["cv5_filter_chain"] = prf(chain, all_gold)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
