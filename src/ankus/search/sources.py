"""Reading a corpus into documents ``{"id", "source", "text"}``, with counted skips.

A corpus is one of:

* a ``.jsonl`` file: one document per line, its text in ``text_field`` (default ``text``), its id in
  ``id_field`` when the row has one, else ``<file>:<line>``. A line that is not a JSON object, or
  lacks the text field, is a :class:`SearchDataError` naming file and line; a line that is not
  UTF-8 and a blank text are skipped and counted;
* a ``.txt`` or ``.py`` file: one document; a non-UTF-8 (or NUL-holding) file and an empty one are
  skipped and counted;
* a directory: every ``.jsonl``, ``.txt`` and ``.py`` file under it, sorted;
* a directory written by ``ankus data corpus`` (it has ``manifest.json``): its documents decoded
  with the tokenizer that built it (its fingerprint is checked), ids from the manifest;
* ``stdlib`` or ``shakespeare``: the named corpora of ``ankus data corpus``, read as text.

``passage_words > 0`` splits each document into passages of that many words (ids ``<id>#p<n>``).
Every file read is fingerprinted (size, mtime, sha256) so ``add`` can tell when it changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ankus.data.io import DataError

__all__ = ["SearchDataError", "ReadReport", "read_corpus", "fingerprint", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".py")


class SearchDataError(DataError):
    """A corpus or index that cannot be read as it is; the message says what and how to fix it."""


@dataclass
class ReadReport:
    docs: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)      # fingerprints of the files read
    skipped: dict[str, int] = field(default_factory=lambda: {"non_utf8": 0, "empty": 0, "already_indexed": 0})


def fingerprint(path: Path, blob: bytes | None = None) -> dict:
    """``{"path", "size", "mtime_ns", "sha256"}`` of a file (absolute path)."""
    st = path.stat()
    blob = path.read_bytes() if blob is None else blob
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": hashlib.sha256(blob).hexdigest()}


def _decode(blob: bytes) -> str | None:
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _read_jsonl(path: Path, name: str, blob: bytes, fields: tuple[str, str], rep: ReadReport) -> None:
    text_field, id_field = fields
    for lineno, raw in enumerate(blob.split(b"\n"), 1):
        line = _decode(raw)
        if line is None:
            rep.skipped["non_utf8"] += 1
            continue
        if lineno == 1:
            line = line.removeprefix("\ufeff")   # a byte-order mark
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SearchDataError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                  "fix or delete the line") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            got = (type(row).__name__ if not isinstance(row, dict) else
                   f"'{text_field}' as {type(row[text_field]).__name__}" if text_field in row else
                   f"fields {', '.join(row) or 'none'}")
            raise SearchDataError(f"{path}, line {lineno}: expected a JSON object with a string field "
                                  f"'{text_field}' (got {got}); pick the field with --text-field")
        if not row[text_field].strip():
            rep.skipped["empty"] += 1
            continue
        doc_id = row.get(id_field)
        doc_id = str(doc_id) if doc_id is not None else f"{name}:{lineno}"
        rep.docs.append({"id": doc_id, "source": str(path.resolve()), "line": lineno, "text": row[text_field]})


def _read_file(path: Path, name: str, fields: tuple[str, str], rep: ReadReport, known: set[str]) -> None:
    if str(path.resolve()) in known:
        rep.skipped["already_indexed"] += 1
        return
    blob = path.read_bytes()
    rep.files.append(fingerprint(path, blob))
    if path.suffix == ".jsonl":
        return _read_jsonl(path, name, blob, fields, rep)
    text = _decode(blob)
    if text is None:
        rep.skipped["non_utf8"] += 1
    elif not text.strip():
        rep.skipped["empty"] += 1
    else:
        rep.docs.append({"id": name, "source": str(path.resolve()), "text": text})


@lru_cache(maxsize=1)
def default_tokenizer():
    """The tokenizer `ankus data corpus` uses by default, loaded once per process."""
    from ankus.models.loading import default_tokenizer

    return default_tokenizer()


def _read_token_corpus(root: Path, rep: ReadReport, known: set[str]) -> None:
    from ankus.data.corpus import MANIFEST, load_corpus, tokenizer_fingerprint

    manifest_path = root / MANIFEST
    if str(manifest_path.resolve()) in known:
        rep.skipped["already_indexed"] += 1
        return
    corpus = load_corpus(root)
    tok = default_tokenizer()
    want = corpus.manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint(tok) != want:
        raise SearchDataError(f"{root} was tokenized with {corpus.manifest['tokenizer']['name']}, not the default "
                              "tokenizer this command decodes with; index its source texts instead")
    rep.files.append(fingerprint(manifest_path))
    names = corpus.manifest.get("document_names") or [f"doc-{i}" for i in range(len(corpus.documents))]
    texts = tok.batch_decode([d[:-1].tolist() for d in corpus.documents])  # each document ends with EOS
    for name, text in zip(names, texts):
        if text.strip():
            rep.docs.append({"id": name, "source": str(manifest_path.resolve()), "text": text})
        else:
            rep.skipped["empty"] += 1


def _split_passages(docs: list[dict], words: int) -> list[dict]:
    out = []
    for d in docs:
        toks = d["text"].split()
        for p, s in enumerate(range(0, len(toks), words)):
            out.append({**d, "id": f"{d['id']}#p{p}", "text": " ".join(toks[s:s + words])})
    return out


def read_corpus(source: str | Path, *, text_field: str = "text", id_field: str = "id", passage_words: int = 0,
                known: set[str] | None = None) -> ReadReport:
    """Documents of ``source`` (see the module doc); files whose path is in ``known`` are skipped
    (counted as ``already_indexed``)."""
    from ankus.data.corpus import CORPORA, MANIFEST, corpus_files

    known = known or set()
    rep = ReadReport()
    fields = (text_field, id_field)
    path = Path(source)
    if str(source) in CORPORA and not path.exists():
        _, root, files = corpus_files(str(source))  # sorted
        for f in files:
            _read_file(f, f.relative_to(root).as_posix(), fields, rep, known)
    elif path.is_dir() and (path / MANIFEST).exists():
        _read_token_corpus(path, rep, known)
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise SearchDataError(f"{path} holds no .jsonl, .txt or .py files to index")
        for f in files:
            _read_file(f, f.relative_to(path).as_posix(), fields, rep, known)
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES + (".jsonl",):
            raise SearchDataError(f"{path}: can index .jsonl, .txt and .py files, not '{path.suffix}'")
        _read_file(path, path.name, fields, rep, known)
    else:
        raise SearchDataError(f"corpus '{source}' not found: give a .jsonl/.txt/.py file, a directory, "
                              f"an `ankus data corpus` directory, or one of {', '.join(CORPORA)}")
    if passage_words > 0:
        rep.docs = _split_passages(rep.docs, passage_words)
    return rep
