"""ankus search: BM25 scores against a brute-force reference and a hand-computed value, exact
incremental adds, redaction and highlighting, bad input, and the CLI."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter

import numpy as np
import pytest

from ankus.cli import main
from ankus.search import index as ix
from ankus.search.show import pii_spans, redact, render
from ankus.search.sources import SearchDataError
from ankus.search.terms import terms


def _write_jsonl(path, texts, start=0):
    path.write_text("".join(json.dumps({"id": f"d{start + i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def _brute_bm25(docs_terms: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """Lucene BM25 (bm25s method='lucene') written out in float64, one document at a time."""
    n = len(docs_terms)
    avgdl = sum(map(len, docs_terms)) / n
    df = Counter(t for d in docs_terms for t in set(d))
    out = np.zeros(n)
    for j, d in enumerate(docs_terms):
        tf = Counter(d)
        for t in dict.fromkeys(query):
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                out[j] += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
    return out


def _all_scores(index) -> np.ndarray:
    """(n_terms, n_docs) score of every single-term query."""
    return np.stack([index.retriever.get_scores_from_ids([i]) for i in range(len(index.vocab))])


def _toy_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = "apple banana cherry date fig grape kiwi lemon mango nut olive pear quince the of and".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def test_hand_computed_score(tmp_path):
    # d0 = [appl, banana, appl], d1 = [banana, cherri], d2 = [cherri, date, fig, grape]: N = 3, avgdl = 3.
    # "apple" in d0: df = 1, idf = ln(1 + 2.5/1.5) = ln(8/3); tf = 2, |d0| = avgdl so the norm is k1 = 1.5:
    # score = ln(8/3) * 2 / (2 + 1.5) = 0.98082925 * 4/7 = 0.56047386.
    src = _write_jsonl(tmp_path / "toy.jsonl", ["apple banana apple", "banana cherry", "cherry date fig grape"])
    hits = ix.search(ix.build(src), "apple")
    assert [h.id for h in hits] == ["d0"]
    assert hits[0].score == pytest.approx(0.56047386, rel=1e-6)


def test_scores_match_brute_force_and_bm25s(tmp_path):
    import bm25s

    texts = _toy_texts(0, 40)
    index = ix.build(_write_jsonl(tmp_path / "toy.jsonl", texts), ix.IndexConfig(k1=1.2, b=0.6))
    docs_terms = [terms(t) for t in texts]
    lib = bm25s.BM25(k1=1.2, b=0.6, method="lucene")
    lib.index(docs_terms, show_progress=False)
    for q in ["apple", "banana cherry", "kiwi kiwi lemon mango", "pear quince the fig"]:
        got = index.retriever.get_scores_from_ids([index.vocab[t] for t in set(terms(q))])
        np.testing.assert_allclose(got, _brute_bm25(docs_terms, terms(q), 1.2, 0.6), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, lib.get_scores(list(set(terms(q)))), rtol=1e-5, atol=1e-6)
        hits = ix.search(index, q, k=5)
        ref = _brute_bm25(docs_terms, terms(q), 1.2, 0.6)
        assert [h.doc for h in hits] == sorted(range(len(texts)), key=lambda d: (-ref[d], d))[:5]


def test_add_equals_rebuild_exactly(tmp_path):
    a, b = _toy_texts(1, 30), _toy_texts(2, 25) + ["zebra xylophone apple"]   # new terms too
    (tmp_path / "corpus").mkdir()
    _write_jsonl(tmp_path / "corpus" / "a.jsonl", a)
    incremental = ix.build(tmp_path / "corpus" / "a.jsonl")
    ix.save(incremental, tmp_path / "idx")
    _write_jsonl(tmp_path / "corpus" / "b.jsonl", b, start=len(a))
    incremental = ix.load(tmp_path / "idx")
    counts = ix.add(incremental, tmp_path / "corpus")          # a.jsonl is already indexed: only b is read
    assert counts["added"] == len(b) and counts["already_indexed"] == 1
    ix.save(incremental, tmp_path / "idx")
    incremental = ix.load(tmp_path / "idx")
    rebuilt = ix.build(tmp_path / "corpus")
    assert incremental.vocab == rebuilt.vocab and incremental.n_docs == len(a) + len(b)
    np.testing.assert_array_equal(incremental.doc_len, rebuilt.doc_len)
    np.testing.assert_allclose(_all_scores(incremental), _all_scores(rebuilt), rtol=1e-6, atol=0)
    ref = _brute_bm25([terms(t) for t in a + b], terms("zebra apple"))
    got = [h.score for h in ix.search(incremental, "zebra apple", k=len(a) + len(b))]
    np.testing.assert_allclose(got, sorted(ref[ref > 0], reverse=True), rtol=1e-5)


def test_redaction():
    text = ("mail bob.smith+x@example.co.uk, host 192.168.1.10 and 2001:db8::1, call +1 (555) 123-4567 or "
            "555.123.4567. Python 3.12.1, pip==1.2.3.4, v10.0.0.1, date 2024-01-15, slice x[1::2], 12:30:45")
    out = redact(text)
    for secret in ("bob.smith", "192.168.1.10", "2001:db8::1", "123-4567", "555.123.4567"):
        assert secret not in out
    assert out.count("[email]") == 1 and out.count("[ip]") == 2 and out.count("[phone]") == 2
    for kept in ("3.12.1", "pip==1.2.3.4", "v10.0.0.1", "2024-01-15", "x[1::2]", "12:30:45"):
        assert kept in out
    assert redact("build 1.2.3.4") == "build [ip]"     # a bare dotted 4-number: redacted (documented choice)
    assert [lab for _, _, lab in pii_spans("a@b.org 10.0.0.1")] == ["email", "ip"]


def test_highlight_and_snippet():
    q = set(terms("parsing arguments"))
    assert render("It parses <b> arguments", q, style="html") == "It <mark>parses</mark> &lt;b&gt; <mark>arguments</mark>"
    assert render("parse me at x@y.com", q, style="brackets") == "[parse] me at [email]"
    long = "filler " * 100 + "the parser parses arguments well " + "filler " * 100
    snip = render(long, q, style="brackets", width=80)
    assert "[parses] [arguments]" in snip and snip.startswith("…") and snip.endswith("…") and len(snip) < 120
    # a snippet never cuts a PII span in half
    pii = "word " * 30 + "argument " + "a" * 70 + "@example.com tail"
    assert "example.com" not in render(pii, q, width=40)


def test_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words"}\n{"text": oops}\n')
    with pytest.raises(SearchDataError, match=r"line 2: not valid JSON"):
        ix.build(bad)
    (tmp_path / "nofield.jsonl").write_text('{"body": "words"}\n')
    with pytest.raises(SearchDataError, match=r"line 1: .*'text'.*--text-field"):
        ix.build(tmp_path / "nofield.jsonl")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_bytes(b'{"text": "good apples"}\n{"text": "caf\xe9 latin-1"}\n{"text": "  "}\n'
                                    b'{"text": "the of and"}\n')
    (mixed / "b.txt").write_bytes(b"\xff\xfe binary")
    (mixed / "c.py").write_text("")
    (mixed / "d.py").write_text("def apples(): pass\n")
    index = ix.build(mixed)
    assert index.n_docs == 2 and index.skipped == {"non_utf8": 2, "empty": 3, "already_indexed": 0}
    with pytest.raises(ix.QueryError, match="only stop words"):
        ix.search(index, "The of AND")
    with pytest.raises(ix.QueryError, match="no words"):
        ix.search(index, " ?! ")
    assert ix.search(index, "unknownword") == []
    with pytest.raises(SearchDataError, match="no document with text"):
        ix.build(mixed / "c.py")
    with pytest.raises(SearchDataError, match="not a search index"):
        ix.load(tmp_path)


def test_jsonl_ids_bom_and_shown_ids_redacted(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_bytes("\ufeff".encode() + b'{"id": "bob@example.com", "body": "orange juice"}\r\n{"body": "orange peel"}\n')
    index = ix.build(src, ix.IndexConfig(text_field="body"))
    assert [d["id"] for d in index.docs] == ["bob@example.com", "rows.jsonl:2"]
    ix.save(index, tmp_path / "idx")
    assert main(["search", "query", str(tmp_path / "idx"), "orange"]) == 0
    shown = capsys.readouterr().out
    assert "[email]" in shown and "bob@" not in shown and "rows.jsonl:2" in shown


def test_changed_corpus_on_add_and_atomic_save(tmp_path, monkeypatch):
    src = _write_jsonl(tmp_path / "a.jsonl", ["apple pie", "banana bread"])
    ix.save(ix.build(src), tmp_path / "idx")
    src.write_text(src.read_text() + json.dumps({"text": "cherry tart"}) + "\n")
    index = ix.load(tmp_path / "idx")
    with pytest.raises(ix.CorpusChangedError, match="changed since it was indexed"):
        ix.add(index, _write_jsonl(tmp_path / "b.jsonl", ["date cake"]))
    st = os.stat(src)                                    # same content, new mtime: not a change
    _write_jsonl(src, ["apple pie", "banana bread"])
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    index = ix.load(tmp_path / "idx")
    assert ix.add(index, tmp_path / "b.jsonl")["added"] == 1

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(index.retriever), "save", crash)
    with pytest.raises(RuntimeError):
        ix.save(index, tmp_path / "idx")
    assert ix.load(tmp_path / "idx").n_docs == 2          # the old index, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]


def test_cli_index_query_add(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("Contact alice@example.com about the parser; it parses arguments.\n")
    (corpus / "tool.py").write_text("def parse_args():\n    '''Parse command line arguments.'''\n")
    out = tmp_path / "idx"
    assert main(["search", "index", str(corpus), "--out", str(out)]) == 0
    assert "indexed 2 documents" in capsys.readouterr().out
    assert main(["search", "query", str(out), "parsing arguments", "-k", "5"]) == 0
    shown = capsys.readouterr().out
    assert "notes.txt" in shown and "[parses] [arguments]" in shown and "[email]" in shown and "alice" not in shown
    _write_jsonl(tmp_path / "new.jsonl", ["argument parsing library"], start=100)
    assert main(["search", "add", str(out), str(tmp_path / "new.jsonl")]) == 0
    assert "added 1 documents (3 now" in capsys.readouterr().out
    assert main(["search", "query", str(out), "library", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["id"] == "d100"
    assert main(["search", "query", str(out), "the and of"]) == 2
    assert "only stop words" in capsys.readouterr().err
    docs = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    assert {d["id"] for d in docs} == {"notes.txt", "tool.py", "d100"} and all(d["source"] for d in docs)


def test_ankus_data_corpus_directory(tmp_path):
    from ankus.data.corpus import build_corpus
    from ankus.search.sources import default_tokenizer

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "one.txt").write_text("The quick brown fox jumps over the lazy dog.")
    (texts / "two.txt").write_text("Pretraining corpora are tokenized into shards.")
    build_corpus(str(texts), tmp_path / "corpus", tokenizer=default_tokenizer())
    index = ix.build(tmp_path / "corpus", ix.IndexConfig(passage_words=4))
    assert [d["id"] for d in index.docs] == ["one.txt#p0", "one.txt#p1", "one.txt#p2", "two.txt#p0", "two.txt#p1"]
    assert ix.search(index, "shards")[0].id == "two.txt#p1"
