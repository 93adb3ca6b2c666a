"""HTML -> plain text that keeps the page's math as LaTeX between ``$...$`` (inline) and
``$$...$$`` (display), after OpenWebMath (Paster et al., 2023, section 3.2).

Built on resiliparse: its lexbor DOM parses (and repairs) the HTML, and its
``extract_plain_text`` does the main-content extraction. The package
``openwebmath-text-extract`` 0.1.3 was tried first: with resiliparse 2.0.1 its math step
raises ``DOMException: DOM document modified during traversal`` on every page with math (it
edits the tree inside ``traverse_dom``), so this module does the same job in two passes: it
collects the math nodes first, then swaps each for a placeholder text node, extracts the
text, and puts the LaTeX back in place of the placeholders.

Math sources, in the order they are looked for:

* MathJax 2 ``<script type="math/tex">`` (``; mode=display`` -> ``$$``); MathJax's rendered
  copies (``.MathJax``, ``.MathJax_Preview``, ...) and KaTeX's ``.katex-html`` are removed,
  so an equation is not read twice;
* ``<math>`` (MathML, also inside KaTeX and MathJax 3 ``mjx-container``): its ``alttext``,
  else a TeX ``<annotation>``, else a LaTeX rendering of the presentation MathML
  (:func:`mathml_to_tex`); ``display="block"`` or a ``.katex-display`` parent -> ``$$``;
* ``<img>`` whose alt text is LaTeX (class or src names math/tex/latex, or the alt has a TeX
  command or a braced sub/superscript): Wikipedia's ``{\\displaystyle ...}`` wrapper is removed;
* math already delimited in the text: ``\\(...\\)`` -> ``$...$`` and ``\\[...\\]`` -> ``$$...$$``
  (Sphinx, MathJax configs); text ``$...$`` stays as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLTree, NodeType

# rendered copies of math whose source is kept elsewhere on the page
RENDERED = (".MathJax_Preview, .MathJax, .MathJax_Display, .MathJax_SVG, .MathJax_SVG_Display, .MathJax_CHTML, "
            ".katex-html, mjx-container > svg, mjx-container > mjx-math")
# page furniture that main-content extraction may miss on documentation pages
SKIP = ["nav", "header", "footer", ".sphinxsidebar", ".related", ".headerlink", ".navigation", ".breadcrumb",
        ".visually-hidden", ".sidebar-drawer", ".toc-drawer", ".back-to-top", ".header", ".nav-panel"]
# where documentation themes put the main content (furo/Sphinx, HTML5, texinfo-free pages)
MAIN_ROOTS = 'article[role="main"], main, [role="main"], div.body, div#content'

_PLACEHOLDER = re.compile(r"@@M(\d+)@@")
_PAREN = re.compile(r"\\\((.{1,2000}?)\\\)", re.S)
_BRACKET = re.compile(r"\\\[(.{1,4000}?)\\\]", re.S)
_DOLLARS = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.S)
_TEX_ALT = re.compile(r"\\[A-Za-z]+|[\^_]\{")
_MATH_IMG = re.compile(r"math|latex|tex|codecogs|equation", re.I)
_DISPLAYSTYLE = re.compile(r"^\s*\{\\displaystyle\s*(.*)\}\s*$", re.S)


@dataclass
class Decoded:
    text: str
    encoding: str
    replaced: int  # U+FFFD characters introduced by decoding (0 for clean input)


@dataclass
class Extracted:
    text: str
    title: str
    n_math: int  # math expressions in the text ($...$ and $$...$$)


def decode_html(raw: bytes) -> Decoded:
    """Bytes -> str: UTF-8 if it decodes cleanly, else resiliparse's detected encoding (with
    UTF-8 and cp1252 fallbacks), undecodable bytes replaced by U+FFFD and counted."""
    try:
        return Decoded(raw.decode("utf-8"), "utf-8", 0)
    except UnicodeDecodeError:
        pass
    enc = detect_encoding(raw) or "utf-8"
    text = bytes_to_str(raw, enc, errors="replace", fallback_encodings=("utf-8", "cp1252"))
    return Decoded(text, enc, text.count("\ufffd") - raw.count("\ufffd".encode()))


def _children(node) -> list:
    """Element children and non-blank text children (pretty-printed MathML has blank ones)."""
    return [c for c in node.child_nodes
            if c.type == NodeType.ELEMENT or (c.type == NodeType.TEXT and c.text.strip())]


_MO = {"∑": r"\sum ", "∫": r"\int ", "∏": r"\prod ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\neq ", "×": r"\times ",
       "·": r"\cdot ", "⋅": r"\cdot ", "±": r"\pm ", "∞": r"\infty ", "→": r"\to ", "∈": r"\in ", "−": "-",
       "⁡": "", "⁢": ""}


def mathml_to_tex(node) -> str:
    """Presentation MathML (a resiliparse element) -> LaTeX: fractions, scripts, roots,
    under/over scripts, fences; token elements by their text (a few operators mapped)."""
    if node.type == NodeType.TEXT:
        return "".join(_MO.get(ch, ch) for ch in node.text.strip())
    tag = node.tag.lower()
    if tag in ("annotation", "annotation-xml"):
        return ""
    if tag == "semantics":
        kids = _children(node)
        return mathml_to_tex(kids[0]) if kids else ""
    parts = [mathml_to_tex(c) for c in _children(node)]
    parts = [p for p in parts if p or tag not in ("mrow", "math", "mstyle")]
    two = {"mfrac": "\\frac{{{0}}}{{{1}}}", "msup": "{{{0}}}^{{{1}}}", "msub": "{{{0}}}_{{{1}}}",
           "mroot": "\\sqrt[{1}]{{{0}}}", "munder": "{{{0}}}_{{{1}}}", "mover": "{{{0}}}^{{{1}}}"}
    if tag in two and len(parts) == 2:
        return two[tag].format(*parts)
    if tag in ("msubsup", "munderover") and len(parts) == 3:
        return "{{{0}}}_{{{1}}}^{{{2}}}".format(*parts)
    if tag == "msqrt":
        return "\\sqrt{" + "".join(parts) + "}"
    if tag == "mfenced":
        return (node.getattr("open") or "(") + ",".join(parts) + (node.getattr("close") or ")")
    return "".join(parts)


def _strip_displaystyle(tex: str) -> str:
    m = _DISPLAYSTYLE.match(tex)
    return m.group(1).strip() if m else tex.strip()


def _math_of(node) -> tuple[str, bool] | None:
    """A math node -> (LaTeX, display?), or None when it holds no math."""
    tag = node.tag.lower()
    if tag == "script":
        return node.text.strip(), "mode=display" in (node.getattr("type") or "")
    if tag == "math":
        tex = node.getattr("alttext")
        if not tex:
            ann = node.query_selector('annotation[encoding*="tex" i]')
            tex = ann.text if ann is not None else mathml_to_tex(node)
        display = node.getattr("display") == "block" or node.closest(".katex-display") is not None
        return _strip_displaystyle(tex), display
    alt = (node.getattr("alt") or "").strip()
    hint = (node.getattr("class") or "") + " " + (node.getattr("src") or "")
    if alt and (_MATH_IMG.search(hint) or _TEX_ALT.search(alt)):
        return _strip_displaystyle(alt), "display" in hint.lower()
    return None


def _swap_math(tree: HTMLTree) -> list[tuple[str, bool]]:
    """Replace every math node by a placeholder text node ``@@M<i>@@``; returns the LaTeX list.
    Nodes are collected first and changed afterwards (never during a traversal)."""
    root = tree.document
    for node in list(root.query_selector_all(RENDERED)):
        if node.parent is not None:
            node.parent.remove_child(node)
    found: list[tuple[str, bool]] = []
    nodes = list(root.query_selector_all('script[type^="math/tex" i], math, img[alt]'))
    for node in nodes:
        if node.parent is None or (node.tag.lower() == "math" and node.parent.closest("math") is not None):
            continue
        math = _math_of(node)
        if math is None or not math[0]:
            continue
        node.parent.replace_child(tree.create_text_node(f" @@M{len(found)}@@ "), node)
        found.append(math)
    return found


def _restore(text: str, found: list[tuple[str, bool]]) -> str:
    def put(m: re.Match) -> str:
        tex, display = found[int(m.group(1))]
        return f"\n$${tex}$$\n" if display else f"${tex}$"

    text = _PLACEHOLDER.sub(put, text)
    text = _BRACKET.sub(lambda m: f"\n$${m.group(1).strip()}$$\n", text)
    text = _PAREN.sub(lambda m: f"${m.group(1).strip()}$", text)
    lines = [ln.strip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def count_math(text: str) -> int:
    """Number of ``$...$`` and ``$$...$$`` spans in extracted text."""
    return sum(1 for _ in _DOLLARS.finditer(text))


def extract_html(html: str, main_content: bool = True) -> Extracted:
    """One HTML page (str) -> its main text with math as LaTeX (see the module docstring).

    With ``main_content``: a page that marks its main content (``<article role="main">``,
    ``<main>``, Sphinx's ``div.body``, ``div#content``) has that element extracted whole;
    otherwise resiliparse's main-content heuristics choose (they dropped all of a furo-themed
    Sphinx page's text, hence the explicit roots)."""
    tree = HTMLTree.parse(html)
    title = (tree.title or "").strip()
    if tree.body is None:
        return Extracted("", title, 0)
    found = _swap_math(tree)
    root = tree.document.query_selector(MAIN_ROOTS) if main_content else None
    source, heuristics = (root.html, False) if root is not None else (tree, main_content)
    text = extract_plain_text(source, preserve_formatting=True, main_content=heuristics, alt_texts=False,
                              list_bullets=True, skip_elements=SKIP)
    text = _restore(text, found)
    return Extracted(text, title, count_math(text))
