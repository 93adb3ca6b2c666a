"""ankus search (bm25s) vs rank-bm25 (BM25Okapi) on the Python standard library, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search.py                 # files and 200-word passages
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/search.py --add 10 --queries 200

Corpus: the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, the files
``ankus data corpus stdlib`` reads: ``.py`` without tests and site-packages), once as one document
per file and once as passages of ``--passage-words`` words. Both sides get the same documents and
the same terms (``ankus.search.terms.terms``: tokens, stop words dropped, Snowball stems), so the
columns compare the index and the scoring, with tokenizing timed apart:

* indexing: ``build_docs`` (terms + term counts + bm25s score matrix) vs ``terms`` +
  ``BM25Okapi(tokenized)``, each from an empty stem cache, alternating, median of ``--repeats``;
  docs/s = documents / (tokenize + index);
* query: median latency over ``--queries`` queries (2-4 words drawn from the corpus vocabulary,
  seeded), alternating sides: ``ankus.search.index.search(index, q, k=10)`` (query terms, bm25s
  sparse scores, top-k) vs ``BM25Okapi.get_scores(terms(q))`` + the same top-k;
* top-10 overlap of the two rankings (they use different BM25 variants: bm25s' lucene vs Okapi with
  rank-bm25's idf floor, so rankings differ a little);
* add: ``--add`` files held out of the file index, then ``load + add + save`` of just them vs a full
  ``build + save`` of all files (scores checked equal).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ankus.search import index as ix
from ankus.search.sources import _split_passages, read_corpus
from ankus.search.terms import _STEMS as term_cache
from ankus.search.terms import terms


def _queries(token_lists: list[list[str]], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = sorted({t for toks in token_lists[:400] for t in toks if t.isalpha() and len(t) > 3})
    return [" ".join(rng.sample(vocab, rng.randint(2, 4))) for _ in range(n)]


def _time(fn):
    """``(fn(), np.array([wall s, CPU s of this process]))``: the machine is shared, CPU time is steadier."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, np.array([time.perf_counter() - t0, time.process_time() - c0])


def _okapi_top(okapi, q: str, k: int = 10) -> np.ndarray:
    s = okapi.get_scores(list(dict.fromkeys(terms(q))))
    cand = np.flatnonzero(s > 0)
    return cand[np.lexsort((cand, -s[cand]))][:k]


def _index_times(docs: list[dict], repeats: int):
    from rank_bm25 import BM25Okapi

    def cold(fn):                                    # each side starts with an empty stem cache
        term_cache.clear()
        return _time(fn)

    ta, to, tt = [], [], []
    for _ in range(repeats):                         # alternating, medians
        index, t = cold(lambda: ix.build_docs(docs))                   # tokenize + count + bm25s matrix
        ta.append(t)
        toks, t = cold(lambda: [terms(d["text"]) for d in docs])
        okapi, t2 = _time(lambda: BM25Okapi(toks))
        tt.append(t)
        to.append(t + t2)
    return index, okapi, toks, *(np.median(np.stack(x), axis=0) for x in (ta, to, tt))


def compare(name: str, docs: list[dict], n_queries: int, repeats: int) -> None:
    index, okapi, toks, t_ankus, t_okapi, t_tok = _index_times(docs, repeats)
    lat_a, lat_o, overlap = [], [], []
    for q in _queries(toks, n_queries):
        hits, ta = _time(lambda: ix.search(index, q, k=10))
        top, to = _time(lambda: _okapi_top(okapi, q))
        lat_a.append(ta)
        lat_o.append(to)
        if hits:
            overlap.append(len({h.doc for h in hits} & set(top.tolist())) / len(hits))
    n = len(docs)
    ma, mo = np.median(np.stack(lat_a), axis=0) * 1e3, np.median(np.stack(lat_o), axis=0) * 1e3
    print(f"\n== {name}: {n} documents, {sum(map(len, toks))} terms, vocabulary {len(index.vocab)}; "
          f"tokenizing alone {t_tok[0]:.2f}s wall, {t_tok[1]:.2f}s CPU")
    print(f"{'':11}{'index s':>9}{'docs/s':>8}{'query ms':>10}  |{'index CPU s':>12}{'docs/CPU-s':>11}{'query CPU ms':>13}")
    for side, t, m in (("ankus", t_ankus, ma), ("rank-bm25", t_okapi, mo)):
        print(f"{side:11}{t[0]:9.2f}{n / t[0]:8.0f}{m[0]:10.3f}  |{t[1]:12.2f}{n / t[1]:11.0f}{m[1]:13.3f}")
    print(f"ratio ankus/rank-bm25: indexing docs/s {t_okapi[0] / t_ankus[0]:.2f}x wall, {t_okapi[1] / t_ankus[1]:.2f}x CPU; "
          f"median query speed {mo[0] / ma[0]:.1f}x wall, {mo[1] / ma[1]:.1f}x CPU; "
          f"top-10 overlap {np.mean(overlap):.2f} over {len(overlap)} queries")


def add_vs_rebuild(root: Path, files: list[Path], n_add: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus, new = Path(tmp) / "corpus", Path(tmp) / "corpus" / "zz_new"
        for p in files[:-n_add]:
            (corpus / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, corpus / p.relative_to(root))
        ix.save(ix.build(corpus), Path(tmp) / "idx")
        new.mkdir()
        for i, p in enumerate(files[-n_add:]):
            shutil.copy(p, new / f"{i}_{p.name}")

        def incremental():
            index = ix.load(Path(tmp) / "idx")
            counts = ix.add(index, corpus)
            ix.save(index, Path(tmp) / "idx")
            return counts

        term_cache.clear()
        counts, t_add = _time(incremental)
        term_cache.clear()
        _, t_full = _time(lambda: ix.save(ix.build(corpus), Path(tmp) / "full"))
        a, b = ix.load(Path(tmp) / "idx"), ix.load(Path(tmp) / "full")
        same = a.vocab == b.vocab and np.array_equal(a.retriever.scores["data"], b.retriever.scores["data"])
        print(f"\n== add {counts['added']} files to an index of {a.n_docs - counts['added']} documents "
              f"({counts['already_indexed']} indexed files skipped unread)")
        print(f"load + add + save {t_add[0]:.2f}s wall ({t_add[1]:.2f}s CPU) vs full build + save {t_full[0]:.2f}s "
              f"({t_full[1]:.2f}s CPU): {t_full[0] / t_add[0]:.1f}x faster wall, {t_full[1] / t_add[1]:.1f}x CPU; "
              f"score matrices bit-identical: {same}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--passage-words", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="index builds per side (median)")
    p.add_argument("--add", type=int, default=10, help="files added incrementally (0: skip)")
    args = p.parse_args(argv)
    from ankus.data.corpus import corpus_files

    what, root, files = corpus_files("stdlib")
    rep, t_read = _time(lambda: read_corpus("stdlib"))
    print(f"corpus: {what} at {root}: {len(rep.files)} files read in {t_read[0]:.2f}s; Python {sys.version.split()[0]}")
    compare("files", rep.docs, args.queries, args.repeats)
    compare(f"passages of {args.passage_words} words", _split_passages(rep.docs, args.passage_words), args.queries,
            args.repeats)
    if args.add:
        add_vs_rebuild(root, files, args.add)


if __name__ == "__main__":
    main()
