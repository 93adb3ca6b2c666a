"""Terms: the one tokenizer used for indexing, querying and highlighting.

A token is a run of two or more word characters (bm25s' default pattern), lower-cased; English stop
words (bm25s' list) are dropped; the rest are stemmed with PyStemmer's Snowball English stemmer.
Highlighting re-tokenizes the shown text with the same rule, so a highlighted word is exactly a
word whose stem matched a query term.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterator

__all__ = ["TOKEN_RE", "STOPWORDS", "terms", "term_spans", "stem"]

TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


STOPWORDS = _stopwords()


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


_STEMS: dict[str, str] = {}


def _stem_all(words: list[str]) -> list[str]:
    """Stems of lower-cased words, memoized (corpora repeat their words)."""
    missing = [w for w in set(words) if w not in _STEMS]
    if missing:
        if len(_STEMS) > 2_000_000:
            _STEMS.clear()
        _STEMS.update(zip(missing, _stemmer().stemWords(missing)))
    return list(map(_STEMS.__getitem__, words))


def stem(word: str) -> str:
    return _stem_all([word.lower()])[0]


def terms(text: str) -> list[str]:
    """The index terms of ``text``, in order: tokens, lower-cased, stop words dropped, stemmed."""
    words = [w for w in TOKEN_RE.findall(text.lower()) if w not in STOPWORDS]
    return _stem_all(words)


def term_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """``(start, end, term)`` of every non-stop-word token of ``text`` (for highlighting)."""
    found = [(m.start(), m.end(), m.group().lower()) for m in TOKEN_RE.finditer(text)]
    found = [f for f in found if f[2] not in STOPWORDS]
    for (s, e, _), t in zip(found, _stem_all([w for _, _, w in found])):
        yield s, e, t
