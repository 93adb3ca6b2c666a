"""Token-reversed corpora for reverse language models (Pfau et al. 2023).

    ankus data reverse runs/corpora/shakespeare --out runs/corpora/shakespeare_rev
    ankus data reverse shakespeare --out runs/corpora/shakespeare_rev     # tokenize, then reverse

A reverse LM is an ordinary causal LM trained on every document's tokens in reverse order, with
the forward model's tokenizer: given a suffix it predicts the token before it, so sampling it
after a reversed suffix and flipping the result gives prefixes for the forward model.

Each document ``[t1, ..., tn, EOS]`` of a corpus written by :mod:`ankus.data.corpus` becomes
``[tn, ..., t1, EOS]``: the tokens are reversed, the EOS stays the separator after the document.
The output is a corpus directory in the same format (same tokenizer fingerprint, so the
pretraining trainer accepts it for the forward model's tokenizer), its manifest marked
``"reversed": true`` and naming the source's content hash. Reversing twice gives the source back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ankus.atomic import atomic_write_dir
from ankus.data.corpus import MANIFEST, build_corpus, load_corpus
from ankus.data.io import DataError

__all__ = ["reverse_document", "reverse_tokens", "reverse_corpus"]


def reverse_tokens(ids):
    """``ids`` (T,) in reverse order (a list or a 1-D array/tensor; same type back)."""
    return ids[::-1] if not hasattr(ids, "flip") else ids.flip(-1)


def reverse_document(doc: np.ndarray, eos: int) -> np.ndarray:
    """``[t1..tn, EOS] -> [tn..t1, EOS]``; a document without its final EOS is a DataError."""
    if len(doc) == 0 or int(doc[-1]) != eos:
        raise DataError(f"a corpus document does not end with the EOS id {eos}; rebuild the corpus with "
                        "`ankus data corpus`")
    return np.concatenate([doc[:-1][::-1], doc[-1:]])


def _write(tmp: Path, src, docs: list[np.ndarray], shard_tokens: int) -> None:
    from ankus.data.corpus import FORMAT, _write_shards

    dtype = np.dtype(src.manifest["dtype"])
    shards = _write_shards(tmp, docs, shard_tokens, dtype)
    content = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    manifest = dict(src.manifest, format=FORMAT, source=f"reversed({src.manifest['source']})",
                    reversed=not src.manifest.get("reversed", False), reversed_from=src.manifest["content_hash"],
                    shards=shards, content_hash=content)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def reverse_corpus(source: str | Path, out: str | Path, *, shard_tokens: int = 1 << 22, tokenizer=None) -> dict:
    """Write the token-reversed copy of ``source`` under ``out``; returns its manifest.

    ``source``: a corpus directory, or what ``ankus data corpus`` takes (stdlib, shakespeare, a
    directory of .txt files), tokenized first (``tokenizer`` or the default one) into ``out``'s
    sibling ``OUT.forward`` (kept: the forward model trains on it) and reversed from there."""
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out)
    src_path = Path(source)
    if not (src_path / MANIFEST).is_file():
        src_path = out.with_name(out.name + ".forward")
        build_corpus(str(source), src_path, shard_tokens=shard_tokens, tokenizer=tokenizer)
    src = load_corpus(src_path)
    eos = int(src.manifest["tokenizer"]["eos_token_id"])
    docs = [reverse_document(d, eos) for d in src.documents]
    atomic_write_dir(out, lambda tmp: _write(tmp, src, docs, shard_tokens))
    return json.loads((out / MANIFEST).read_text())
