"""What a result SHOWS: a snippet around the matches, query terms highlighted, PII redacted.

Redaction covers what is displayed only (the index keeps the text as given):

* e-mail addresses -> ``[email]``;
* IPv4 addresses -> ``[ip]``: four dot-separated numbers 0-255, not part of a longer dotted run.
  A dotted 4-number *version* (``1.2.3.4``) looks the same; it is kept only when a version cue sits
  right before it (``v``, ``version``, ``release``, ``==``, ``>=``, ``<=``, ``~=``, ``!=``), otherwise
  redacted: privacy wins over a false positive. Versions of 1-3 numbers (``3.12.1``) never match;
* IPv6 addresses -> ``[ip]``: candidates that :mod:`ipaddress` accepts and that have a hex letter, a
  4-digit group or 3+ groups (so ``::``, ``x[1::2]`` and ``10::20`` slices stay; ``::1`` stays);
* phone numbers -> ``[phone]``: 7-15 digits in 3+ groups separated by spaces, dots or dashes, with an
  optional ``+country`` and ``(area)``; the last group has 3-4 digits (so ISO dates ``2024-01-15``
  stay), and an all-dots number must be the US 3-3-4 form (so ``10.12.2024``-like runs stay).

Highlighting marks every token whose term (``terms.term_spans``) is a query term: ``**word**`` in
bold on a terminal (``[word]`` when not a terminal) and ``<mark>word</mark>`` in HTML (the rest of
the text is escaped).
"""

from __future__ import annotations

import html
import ipaddress
import re

from ankus.search.terms import term_spans

__all__ = ["pii_spans", "redact", "render"]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_VERSION_CUE = re.compile(r"(?:\bv|\bversion\s*|\brelease\s*|[=<>~!]=\s*)$", re.IGNORECASE)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")
_PHONE = re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{1,4}){1,4}(?![\w]|[.-]\d)")


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in s.split(":") if g]
    return any(re.search(r"[A-Fa-f]", g) or len(g) == 4 for g in groups) or len(groups) >= 3


def _is_phone(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    groups = re.findall(r"\d+", s)
    if not 7 <= len(digits) <= 15 or len(groups) < 3 or not 3 <= len(groups[-1]) <= 4:
        return False
    if not re.search(r"[ \-+()]", s):                   # dots only: US 3-3-4
        return [len(g) for g in groups] == [3, 3, 4]
    return True


def pii_spans(text: str) -> list[tuple[int, int, str]]:
    """Sorted, non-overlapping ``(start, end, label)`` of the PII in ``text``."""
    found = [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
    found += [(m.start(), m.end(), "ip") for m in _IPV4.finditer(text)
              if not _VERSION_CUE.search(text[max(0, m.start() - 12):m.start()])]
    found += [(m.start(), m.end(), "ip") for m in _IPV6.finditer(text) if _is_ipv6(m.group())]
    found += [(m.start(), m.end(), "phone") for m in _PHONE.finditer(text) if _is_phone(m.group())]
    out: list[tuple[int, int, str]] = []
    for s, e, label in sorted(found):
        if out and s < out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e, out[-1][2])
            continue
        out.append((s, e, label))
    return out


def _window(text: str, marks: list[tuple[int, int]], pii: list[tuple[int, int, str]], width: int) -> tuple[int, int]:
    """A ``width``-character window holding the most matches (starting at a match), widened so it
    never cuts a PII span or a word."""
    if len(text) <= width:
        return 0, len(text)
    best, start = -1, 0
    ends = [e for _, e in marks]
    for i, (s, _) in enumerate(marks):
        n = sum(1 for e in ends[i:] if e <= s + width)
        if n > best:
            best, start = n, max(0, s - width // 6)
    end = min(len(text), start + width)
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    for s, e, _ in pii:
        if s < start < e:
            start = s
        if s < end < e:
            end = e
    return start, end


def render(text: str, query: set[str], *, style: str = "brackets", width: int | None = None) -> str:
    """``text`` (or a ``width``-character snippet of it) with PII redacted and query terms marked.
    ``style``: ``"html"`` (escaped, ``<mark>``), ``"ansi"`` (bold) or ``"brackets"``."""
    pii = pii_spans(text)
    marks = [(s, e) for s, e, t in term_spans(text) if t in query and not any(ps < e and s < pe for ps, pe, _ in pii)]
    start, end = (0, len(text)) if width is None else _window(text, marks, pii, width)
    esc = html.escape if style == "html" else (lambda x: x)
    wrap = {"html": ("<mark>", "</mark>"), "ansi": ("\033[1m", "\033[0m"), "brackets": ("[", "]")}[style]
    events = sorted([(s, e, None) for s, e in marks if start <= s and e <= end] +
                    [(s, e, lab) for s, e, lab in pii if start <= s and e <= end])
    out, pos = [], start
    for s, e, label in events:
        out.append(esc(text[pos:s]))
        out.append(esc(f"[{label}]") if label else wrap[0] + esc(text[s:e]) + wrap[1])
        pos = e
    out.append(esc(text[pos:end]))
    body = "".join(out)
    if width is not None:
        body = ("…" if start > 0 else "") + " ".join(body.split()) + ("…" if end < len(text) else "")
    return body


def redact(text: str) -> str:
    """``text`` with its PII replaced by ``[email]``, ``[ip]``, ``[phone]``."""
    return render(text, set(), style="brackets")
