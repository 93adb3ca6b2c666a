"""The filters of the math pipeline, each a small function or object with a documented rule.

* :func:`math_signals` / :func:`prefilter` -- cheap regexes for math on the raw HTML and on the
  extracted text (OpenWebMath's prefilter looks for math markup and math words before any
  expensive step; these regexes are ours).
* :func:`language` / :func:`is_english` -- English or not: resiliparse's ``detect_fast``
  (out-of-place n-gram ranks over 101 language profiles, ranks above ``cutoff`` = 1200 count as
  unknown) on the text with math spans and interpreter lines taken out, with a second opinion
  from English function words: a page is English when ``detect_fast`` says ``en``, or when at
  least 12% of its words are in :data:`STOPWORDS`. The second test is there because
  ``detect_fast`` read code-heavy English API pages as Latin or Danish (4 of the 251 mpmath/SymPy
  doc pages that reached the test in a 345-page Debian run; their stopword ratios were 0.14-0.31,
  German/French/Italian prose 0.00-0.03).
* :class:`Perplexity` -- mean per-token perplexity of a page's first ``max_tokens`` tokens under an
  ankus model (SmolLM2-135M or a tiny spec); pages above a threshold are dropped (OpenWebMath
  used a KenLM model trained on ProofPile; this is the same idea with a small transformer).
* :class:`Deduper` -- exact duplicates by the SHA-256 of the whitespace-normalised text, then
  near-duplicates by MinHash LSH over word 5-gram shingles (``datasketch``).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH
from resiliparse.parse.lang import detect_fast

MATH_HTML = re.compile(r"<math[\s>]|math/tex|mathjax|katex|class=\"[^\"]*\bmath\b|\\\(|\\\[|\$\$", re.I)
LATEX_COMMAND = re.compile(r"\\(?:frac|sqrt|sum|int|prod|lim|alpha|beta|gamma|delta|theta|lambda|pi|sigma|"
                           r"infty|cdot|leq?|geq?|neq|mathbb|mathrm|mathcal|partial|nabla|begin\{|left|right)(?![A-Za-z])")
DOLLAR_SPAN = re.compile(r"\$\$[^$]{1,2000}?\$\$|\$(?=[^\s$])[^$\n]{1,200}?(?<=[^\s$])\$")
_TEXISH = re.compile(r"\\[A-Za-z]+|[\^_=]|^[A-Za-z0-9]{1,3}'*$")
_PLAIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{4,}")
MATH_WORDS = re.compile(r"\b(?:theorem|lemma|corollary|proof|equation|integral|derivative|polynomial|matrix|matrices|"
                        r"eigenvalues?|determinant|logarithm|exponent|factorial|prime|integer|real numbers?|"
                        r"complex numbers?|algebra(?:ic)?|calculus|geometry|vector|tensor|series|convergen\w*|"
                        r"function of|coefficients?|denominator|numerator|quotient|modulo|differential|"
                        r"trigonometric|sine|cosine|limit|infinity|summation)\b", re.I)
FORMULA = re.compile(r"\b[a-zA-Z]\s*\^\s*\d|\b[a-z]\s*[=<>]\s*[-+]?\d|\d\s*[*/]\s*[a-z]\b|\b(?:sin|cos|tan|log|exp|"
                     r"sqrt)\s*\(")


def latex_count(text: str) -> int:
    """LaTeX in extracted text: TeX commands (``\\frac``, ``\\alpha``...) plus ``$...$``/``$$...$$`` spans
    that look like TeX -- a command, a sub/superscript or ``=``, or a lone symbol like ``$n$`` -- and
    hold at most two plain words of 4+ letters (shell prompts and ``${var}`` templates do not count)."""
    spans = 0
    for m in DOLLAR_SPAN.finditer(text):
        inner = m.group(0).strip("$")
        spans += bool(_TEXISH.search(inner)) and len(_PLAIN_WORD.findall(inner)) <= 2
    return spans + len(LATEX_COMMAND.findall(_DOLLARS_ANY.sub(" ", text)))


_DOLLARS_ANY = re.compile(r"\$\$[^$]{1,2000}?\$\$|\$[^$\n]{1,200}?\$")


def math_signals(html: str, text: str) -> dict[str, int]:
    """Counts of each math signal: markup in the HTML, LaTeX in the text (:func:`latex_count`),
    math words, formula-like snippets (``x^2``, ``n = 3``, ``sin(``)."""
    return {"html_markup": len(MATH_HTML.findall(html)), "latex": latex_count(text),
            "math_words": len(MATH_WORDS.findall(text)), "formulas": len(FORMULA.findall(text))}


def prefilter(signals: dict[str, int], min_words: int = 3, min_formulas: int = 3) -> str | None:
    """None (keep) when the page shows math markup or LaTeX, or at least ``min_words`` math words,
    or at least ``min_formulas`` formula-like snippets; else the reason to drop it."""
    if signals["html_markup"] or signals["latex"]:
        return None
    if signals["math_words"] >= min_words or signals["formulas"] >= min_formulas:
        return None
    return "no_math_signal"


_MATH_SPANS = re.compile(r"\$\$.+?\$\$|\$[^$\n]+\$", re.S)
_CODE_LINE = re.compile(r"^\s*(?:>>>|\.\.\.|\(%[io]\d+\)|[$#] ).*$", re.M)


def language(text: str, cutoff: int = 1200) -> tuple[str, int]:
    """(language code, out-of-place rank) of the prose: math spans and interpreter/shell lines
    are removed first, since LaTeX and code confuse character n-gram profiles."""
    prose = _CODE_LINE.sub(" ", _MATH_SPANS.sub(" ", text))[:20000]
    lang, rank = detect_fast(prose, cutoff=cutoff)
    return lang, int(rank)


STOPWORDS = frozenset("the of and to a in is that for it as with be on by this are or an from at which not can if its "
                      "their these we you when has have will was use used also may than all into only one other "
                      "there such then so".split())
_WORD = re.compile(r"[A-Za-z]+")


def stopword_ratio(text: str) -> float:
    """Share of the words (runs of ASCII letters, math spans removed) that are English function words."""
    words = _WORD.findall(_MATH_SPANS.sub(" ", text[:50000]))
    return sum(w.lower() in STOPWORDS for w in words) / len(words) if words else 0.0


def is_english(text: str, cutoff: int = 1200, min_stopwords: float = 0.12) -> tuple[bool, dict]:
    """(English?, evidence): ``detect_fast`` says ``en``, or the stopword ratio is >= ``min_stopwords``."""
    lang, rank = language(text, cutoff)
    ratio = stopword_ratio(text)
    return lang == "en" or ratio >= min_stopwords, {"lang": lang, "lang_rank": rank, "stopwords": round(ratio, 3)}


class Perplexity:
    """Perplexity of text under an ankus model spec; ``score(text)`` reads the first ``max_tokens``."""

    def __init__(self, spec: str = "smollm2-135m-instruct", max_tokens: int = 256) -> None:
        from ankus.models.loading import load_model

        self.spec, self.max_tokens = spec, max_tokens
        self.model, self.tok = load_model(spec)

    def score(self, text: str) -> float:
        import torch

        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        if len(ids) < 2:
            return float("inf")
        x = torch.tensor([ids])  # [1, T]
        with torch.no_grad():
            logits = self.model(x).logits[0, :-1].float()  # [T-1, V]
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="mean").item()
        return math.exp(nll)


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of the normalised text (the whole text when it has fewer than n words)."""
    words = normalise(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def minhash(text: str, num_perm: int = 128, seed: int = 1) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


@dataclass
class Deduper:
    """Keeps the first of each group of duplicates, in the order pages are offered.

    ``check(key, text)`` -> None for a new page (and remembers it), or
    ``("exact_duplicate", first_key)`` / ``("near_duplicate", first_key)``. Near means a kept page
    whose estimated Jaccard similarity of 5-gram shingles is >= ``threshold``: LSH proposes
    candidates, tuned to miss few (datasketch ``weights=(0.1, 0.9)``: 20 bands x 6 rows at 128
    permutations, a pair at Jaccard 0.77 is proposed with probability 0.99 where the balanced
    default gives 0.75), then each candidate's MinHash estimate is checked against the threshold.
    """

    threshold: float = 0.7
    num_perm: int = 128
    seen: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, MinHash] = field(default_factory=dict)
    lsh: MinHashLSH | None = None

    def __post_init__(self) -> None:
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=(0.1, 0.9))

    def check(self, key: str, text: str) -> tuple[str, str] | None:
        digest = hashlib.sha256(normalise(text).encode()).hexdigest()
        if digest in self.seen:
            return "exact_duplicate", self.seen[digest]
        m = minhash(text, self.num_perm)
        near = sorted(k for k in self.lsh.query(m) if m.jaccard(self.hashes[k]) >= self.threshold)
        if near:
            return "near_duplicate", near[0]
        self.seen[digest] = key
        self.hashes[key] = m
        self.lsh.insert(key, m)
        return None
