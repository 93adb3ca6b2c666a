"""The BM25 index: built from per-document term counts, so adding documents is exact.

Scoring is bm25s' ``lucene`` variant (its default; Lucene's BM25Similarity):

    idf(t)    = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    s(t, d)   = idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    score(q,d)= sum over distinct query terms t of s(t, d)

with |d| the document's term count after stop-word removal. bm25s stores s(t, d) as a sparse
matrix (one column per term) and answers queries from it; that matrix depends on N, df and
avgdl, so a new document changes every column it shares terms with. The index therefore also keeps
what the matrix is made of: each document's term counts (CSR: ``indptr``, ``term_ids``, ``tfs``)
and lengths. ``add`` appends the new documents' counts (new terms get the next ids, so the vocabulary
is the one a rebuild would make), then recomputes df, avgdl and the matrix from the counts, vectorized,
without reading or tokenizing the old documents again: the result is the matrix a rebuild over all
documents gives (same stats, same arithmetic), which ``tests/unit/test_search.py`` checks.

An index directory (written whole, atomically):
``index.json`` (settings, counts, the files read with size/mtime/sha256), ``docs.jsonl`` (per
document: id, source path, line, text), ``stats.npz`` (the term counts), ``bm25s/`` (bm25s' own saved
index: score matrix + vocabulary, loaded with ``bm25s.BM25.load``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ankus.atomic import atomic_write_dir
from ankus.config import ConfigError
from ankus.search.sources import SearchDataError, read_corpus
from ankus.search.terms import STOPWORDS, TOKEN_RE, terms

__all__ = ["IndexConfig", "Index", "Hit", "QueryError", "CorpusChangedError", "build", "build_docs", "add", "save", "load",
           "search", "count_terms", "score_matrix", "FORMAT"]

FORMAT = "ankus-search-1"


class QueryError(SearchDataError):
    """A query that cannot be scored (empty, or only stop words)."""


class CorpusChangedError(SearchDataError):
    """A file the index was built from changed since; the index would mix old and new text."""


@dataclass
class IndexConfig:
    k1: float = 1.5
    b: float = 0.75
    text_field: str = "text"
    id_field: str = "id"
    passage_words: int = 0      # > 0: split documents into passages of this many words

    def __post_init__(self):
        if not self.k1 > 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"BM25 needs k1 > 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")
        if self.passage_words < 0:
            raise ConfigError(f"passage_words must be >= 0 (0 = whole documents), got {self.passage_words}")


@dataclass
class Index:
    config: IndexConfig
    vocab: dict[str, int]
    indptr: np.ndarray          # (n_docs + 1,) int64: document d's terms are term_ids[indptr[d]:indptr[d+1]]
    term_ids: np.ndarray        # (nnz,) int32
    tfs: np.ndarray             # (nnz,) int32
    doc_len: np.ndarray         # (n_docs,) int64: terms per document
    docs: list[dict]            # id, source, (line), text
    files: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    retriever: object = None    # bm25s.BM25 holding the score matrix

    @property
    def n_docs(self) -> int:
        return len(self.docs)


@dataclass
class Hit:
    rank: int
    doc: int
    score: float
    id: str
    source: str
    text: str


def count_terms(token_lists: list[list[str]], vocab: dict[str, int]):
    """Term counts of documents as CSR (a document's term ids ascending); new terms are appended to
    ``vocab`` in order of first appearance. Returns ``(indptr (D+1,), term_ids (nnz,), tfs (nnz,),
    doc_len (D,))``."""
    setdefault = vocab.setdefault
    ids = np.fromiter((setdefault(t, len(vocab)) for toks in token_lists for t in toks), np.int64)   # (T,)
    lens = np.asarray([len(toks) for toks in token_lists], np.int64)                                 # (D,)
    doc_of = np.repeat(np.arange(len(lens), dtype=np.int64), lens)                                   # (T,)
    keys, tfs = np.unique(doc_of * max(len(vocab), 1) + ids, return_counts=True)                     # (nnz,)
    doc, term = np.divmod(keys, max(len(vocab), 1))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(doc, minlength=len(lens)))])
    return indptr.astype(np.int64), term.astype(np.int32), tfs.astype(np.int32), lens


def score_matrix(indptr, term_ids, tfs, doc_len, n_terms: int, k1: float, b: float):
    """bm25s' CSC score matrix ``(data (nnz,) float32, indices (nnz,) int32, col_ptr (V+1,) int64)``
    from term counts: column t holds s(t, d) for the documents d containing t, by document."""
    from bm25s.scoring import _score_tfc_lucene

    n = len(doc_len)
    doc_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))           # (nnz,)
    df = np.bincount(term_ids, minlength=n_terms).astype(np.float64)             # (V,)
    idf = np.log(1 + (n - df + 0.5) / (df + 0.5))                               # (V,)
    avgdl = float(doc_len.mean()) if n else 1.0
    tfc = _score_tfc_lucene(tfs.astype(np.float64), doc_len[doc_of].astype(np.float64), avgdl, k1, b)
    scores = idf[term_ids] * tfc                                                # (nnz,)
    order = np.lexsort((doc_of, term_ids))
    col_ptr = np.concatenate([[0], np.cumsum(df.astype(np.int64))])
    return scores[order].astype(np.float32), doc_of[order].astype(np.int32), col_ptr


def _make_retriever(index: Index):
    import bm25s

    r = bm25s.BM25(k1=index.config.k1, b=index.config.b, method="lucene")
    data, indices, col_ptr = score_matrix(index.indptr, index.term_ids, index.tfs, index.doc_len, len(index.vocab),
                                          index.config.k1, index.config.b)
    r.scores = {"data": data, "indices": indices, "indptr": col_ptr, "num_docs": index.n_docs}
    r.vocab_dict = dict(index.vocab)
    r.unique_token_ids_set = set(index.vocab.values())
    r.nonoccurrence_array = None
    return r


def _append(index: Index, docs: list[dict], token_lists: list[list[str]]) -> None:
    """Append documents' counts to ``index`` (vocabulary extended in place) and rescore."""
    indptr, ids, tfs, lens = count_terms(token_lists, index.vocab)
    index.indptr = np.concatenate([index.indptr, index.indptr[-1] + indptr[1:]])
    index.term_ids = np.concatenate([index.term_ids, ids])
    index.tfs = np.concatenate([index.tfs, tfs])
    index.doc_len = np.concatenate([index.doc_len, lens])
    index.docs += docs
    index.retriever = _make_retriever(index)


def _tokenize(docs: list[dict], skipped: dict[str, int]) -> tuple[list[dict], list[list[str]]]:
    """``(docs, their terms)``; documents with no index term (only stop words or punctuation) are
    dropped and counted as empty."""
    kept = [(d, toks) for d in docs if (toks := terms(d["text"]))]
    skipped["empty"] = skipped.get("empty", 0) + len(docs) - len(kept)
    return [d for d, _ in kept], [t for _, t in kept]


def build(source: str | Path, config: IndexConfig | None = None) -> Index:
    """Index every document of ``source`` (see ``sources.read_corpus``)."""
    config = config or IndexConfig()
    rep = read_corpus(source, text_field=config.text_field, id_field=config.id_field,
                      passage_words=config.passage_words)
    return build_docs(rep.docs, config, rep.files, rep.skipped, what=f"corpus '{source}'")


def build_docs(docs: list[dict], config: IndexConfig | None = None, files: list[dict] | None = None,
               skipped: dict[str, int] | None = None, what: str = "the documents") -> Index:
    """Index documents already read (``{"id", "source", "text"}``); termless ones are counted as empty."""
    skipped = {"non_utf8": 0, "empty": 0, **(skipped or {})}
    docs, token_lists = _tokenize(docs, skipped)
    if not docs:
        raise SearchDataError(f"{what} holds no document with text to index (skipped: "
                              f"{skipped['non_utf8']} not UTF-8, {skipped['empty']} empty)")
    index = Index(config or IndexConfig(), {}, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                  np.zeros(0, np.int64), [], list(files or []), skipped)
    _append(index, docs, token_lists)
    return index


def check_unchanged(files: list[dict]) -> None:
    """Raise :class:`CorpusChangedError` if a file the index was built from is gone or changed
    (size, or content when only the mtime differs)."""
    from ankus.search.sources import fingerprint

    for f in files:
        p = Path(f["path"])
        if not p.is_file():
            raise CorpusChangedError(f"{p} was indexed but is gone; rebuild with `ankus search index`")
        st = p.stat()
        if st.st_size == f["size"] and st.st_mtime_ns == f["mtime_ns"]:
            continue
        if st.st_size != f["size"] or fingerprint(p)["sha256"] != f["sha256"]:
            raise CorpusChangedError(f"{p} changed since it was indexed (size {f['size']} -> {st.st_size} bytes, "
                                     "or new content); the index holds its old text: rebuild with "
                                     "`ankus search index`")


def add(index: Index, source: str | Path) -> dict:
    """Add the documents of ``source`` to ``index`` in place; files already indexed are skipped.
    Returns counts ``{"added", "non_utf8", "empty", "already_indexed"}``."""
    check_unchanged(index.files)
    c = index.config
    rep = read_corpus(source, text_field=c.text_field, id_field=c.id_field, passage_words=c.passage_words,
                      known={f["path"] for f in index.files})
    docs, token_lists = _tokenize(rep.docs, rep.skipped)
    if docs:
        _append(index, docs, token_lists)
    index.files += rep.files
    for k, v in rep.skipped.items():
        if k != "already_indexed":
            index.skipped[k] = index.skipped.get(k, 0) + v
    return {"added": len(docs), **rep.skipped}


def save(index: Index, out: str | Path) -> Path:
    """Write ``index`` to the directory ``out``, atomically (a crash leaves the old index)."""
    def write(tmp: Path) -> None:
        meta = {"format": FORMAT, "config": asdict(index.config), "documents": index.n_docs,
                "terms": len(index.vocab), "skipped": index.skipped, "files": index.files}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for d in index.docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        np.savez(tmp / "stats.npz", indptr=index.indptr, term_ids=index.term_ids, tfs=index.tfs, doc_len=index.doc_len)
        index.retriever.save(tmp / "bm25s", show_progress=False)

    return atomic_write_dir(out, write)


def load(path: str | Path) -> Index:
    """Read an index directory written by :func:`save`."""
    import bm25s

    path = Path(path)
    if not (path / "index.json").is_file():
        raise SearchDataError(f"{path} is not a search index (no index.json); build one with "
                              "`ankus search index CORPUS --out DIR`")
    meta = json.loads((path / "index.json").read_text())
    if meta.get("format") != FORMAT:
        raise SearchDataError(f"{path}/index.json: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild it")
    with open(path / "docs.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    with np.load(path / "stats.npz", allow_pickle=False) as z:
        stats = {k: z[k] for k in ("indptr", "term_ids", "tfs", "doc_len")}
    retriever = bm25s.BM25.load(path / "bm25s", load_corpus=False)
    if len(docs) != meta["documents"] or retriever.scores["num_docs"] != len(docs):
        raise SearchDataError(f"{path}: docs.jsonl, index.json and bm25s/ disagree on the document count; rebuild it")
    return Index(IndexConfig(**meta["config"]), dict(retriever.vocab_dict), docs=docs, files=meta["files"],
                 skipped=meta["skipped"], retriever=retriever, **stats)


def query_terms(text: str) -> list[str]:
    """The distinct index terms of a query; :class:`QueryError` when it has none."""
    words = TOKEN_RE.findall(text.lower())
    if not words:
        raise QueryError(f"query {text!r} holds no words to search for (tokens are 2+ letters or digits)")
    if all(w in STOPWORDS for w in words):
        raise QueryError(f"query {text!r} holds only stop words ({', '.join(dict.fromkeys(words))}), which are not "
                         "indexed; add a content word")
    return list(dict.fromkeys(terms(text)))


def search(index: Index, text: str, k: int = 10) -> list[Hit]:
    """The top ``k`` documents by BM25 score (ties by document order); documents scoring 0 (no
    query term) are not returned."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    ids = [index.vocab[t] for t in query_terms(text) if t in index.vocab]
    if not ids:
        return []
    scores = index.retriever.get_scores_from_ids(ids)                                 # (n_docs,)
    cand = np.flatnonzero(scores > 0)
    top = cand[np.lexsort((cand, -scores[cand]))][:k]
    return [Hit(r + 1, int(d), float(scores[d]), index.docs[d]["id"], index.docs[d]["source"], index.docs[d]["text"])
            for r, d in enumerate(top)]
