"""ankus.data.mathtext: LaTeX kept by extraction, each filter, MinHash near-duplicates, the
classifier round trip, bad input counted (never raised), and the two CLI commands."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ankus.cli import main
from ankus.data.io import DataError
from ankus.data.mathtext import classifier as C
from ankus.data.mathtext.extract import count_math, decode_html, extract_html
from ankus.data.mathtext.filters import (Deduper, is_english, language, latex_count, math_signals, minhash, prefilter,
                                         shingles, stopword_ratio)
from ankus.data.mathtext.fixture import filter_decision, load_fixture, prf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mathtext_pages.tar.xz"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

PROSE = ("The quadratic formula gives both roots of a second degree polynomial equation, and the discriminant "
         "tells whether those roots are real numbers or complex numbers. We prove the formula by completing "
         "the square, a method that also shows why the parabola is symmetric about its axis. ")


def page(body: str, head: str = "") -> str:
    return f"<html><head><title>T</title>{head}</head><body><article role='main'>{body}</article></body></html>"


# --- extraction keeps LaTeX --------------------------------------------------------------------------

def test_mathjax_scripts_become_dollars_and_rendered_copies_go():
    html = page(f"<p>{PROSE} Roots of <span class='MathJax_Preview'>ax2</span><span class='MathJax'>RENDERED</span>"
                "<script type='math/tex'>ax^2+bx+c=0</script> are</p>"
                "<script type='math/tex; mode=display'>x=\\frac{-b\\pm\\sqrt{b^2-4ac}}{2a}</script><p>done.</p>")
    text = extract_html(html).text
    assert "$ax^2+bx+c=0$" in text
    assert "\n$$x=\\frac{-b\\pm\\sqrt{b^2-4ac}}{2a}$$\n" in text
    assert "RENDERED" not in text and "ax2" not in text
    assert count_math(text) == 2


def test_mathml_alttext_annotation_and_presentation_markup():
    html = page("<p>Energy <math alttext='E=mc^2'><mi>E</mi></math>, KaTeX <span class='katex'>"
                "<span class='katex-mathml'><math><semantics><mrow><mi>z</mi></mrow><annotation "
                "encoding='application/x-tex'>z^{3}</annotation></semantics></math></span>"
                "<span class='katex-html' aria-hidden='true'>z3</span></span> and plain MathML "
                "<math display='block'><mfrac><mn>1</mn><msqrt><mi>x</mi></msqrt></mfrac></math> and "
                "<math><msup><mi>a</mi><mn>2</mn></msup><mo>+</mo><msub><mi>b</mi><mi>i</mi></msub></math>.</p>")
    text = extract_html(html).text
    assert "$E=mc^2$" in text
    assert "$z^{3}$" in text and "z3" not in text
    assert "$$\\frac{1}{\\sqrt{x}}$$" in text
    assert "${a}^{2}+{b}_{i}$" in text
    pretty = page("<p>Pretty-printed: <math>\n  <mfrac>\n    <mn>1</mn>\n    <mi>n</mi>\n  </mfrac>\n</math></p>")
    assert "$\\frac{1}{n}$" in extract_html(pretty).text


def test_inline_dollars_delimiters_and_alt_text_images():
    html = page("<p>Inline $a+b=c$ stays; Sphinx \\(x^2\\) and \\[\\int_0^1 f\\] convert; "
                "<img class='math' src='m.png' alt='\\alpha_1'> and "
                "<img src='w.svg' alt='{\\displaystyle \\sum_i x_i}'> but not <img src='cat.png' alt='a cat'>.</p>")
    text = extract_html(html).text
    for want in ("$a+b=c$", "$x^2$", "$$\\int_0^1 f$$", "$\\alpha_1$", "$\\sum_i x_i$"):
        assert want in text
    assert "a cat" not in text


def test_real_sphinx_page_from_the_fixture_keeps_its_formulas():
    pages = {p.file: p for p in load_fixture(FIXTURE)}
    text = extract_html(decode_html(pages["pages/010.html"].html).text).text  # mpmath hyperbolic functions
    assert "$\\cosh(x) = (e^x + e^{-x})/2$" in text
    assert count_math(text) >= 20


# --- bad input ---------------------------------------------------------------------------------------

def test_non_utf8_bytes_are_decoded_with_replacement_and_counted():
    d = decode_html("<p>caf\u00e9 ok</p>".encode("utf-8"))
    assert (d.encoding, d.replaced) == ("utf-8", 0)
    d = decode_html(b"<p>caf\xe9 na\xefve</p>")  # latin-1 bytes, invalid UTF-8
    assert d.encoding != "utf-8" and "<p>" in d.text


def test_malformed_html_does_not_raise():
    for html in ("<p>unclosed <b>bold <i>it", "<<<>>> </div></div> <math><mi>x", "<html><body></body></html>",
                 "no tags at all $x^2$", "<script type='math/tex'></script>"):
        extract_html(html)  # repaired by lexbor or empty, never an exception


# --- filters -----------------------------------------------------------------------------------------

def test_latex_count_ignores_shell_prompts_and_templates():
    assert latex_count("Let $n$ be odd and $x_i \\ge 0$; then \\frac{1}{2}.") == 3
    assert latex_count("run $ sudo make $ then ${dir}$ and $PREFIX/share/doc/valgrind/manual.html, where $") == 0


def test_prefilter_rules():
    assert prefilter({"html_markup": 1, "latex": 0, "math_words": 0, "formulas": 0}) is None
    assert prefilter({"html_markup": 0, "latex": 0, "math_words": 3, "formulas": 0}) is None
    assert prefilter({"html_markup": 0, "latex": 0, "math_words": 2, "formulas": 2}) == "no_math_signal"
    s = math_signals("<script type='math/tex'>x</script>", "The theorem and its proof use an integral.")
    assert s["html_markup"] == 1 and s["math_words"] == 3


def test_language_filter_on_prose_with_math_removed():
    assert language(PROSE + " $\\frac{a}{b}$ ")[0] == "en"
    german = ("Die quadratische Gleichung hat zwei Lösungen, und die Diskriminante entscheidet, ob diese Lösungen "
              "reell oder komplex sind. Wir beweisen die Formel durch quadratische Ergänzung.")
    assert language(german)[0] == "de"
    assert not is_english(german)[0] and is_english(PROSE)[0]


def test_stopword_ratio_hand_counts_and_second_opinion():
    assert stopword_ratio("the cat of the house") == pytest.approx(3 / 5)
    assert stopword_ratio("$the of the$ cat dog") == 0.0  # math spans are not words
    # an API listing detect_fast does not call English, but whose prose is
    api = ("sympy.polys.rootoftools.rootof(f, x, index=None, radicals=True, expand=True) Returns the root of f "
           "at the given index. This is the index of the root in the sorted list of the roots. ") * 3
    ok, ev = is_english(api)
    assert ok and ev["stopwords"] >= 0.12


def test_exact_and_near_duplicates_with_minhash():
    base = " ".join(f"word{i} of a long page about prime numbers and their gaps" for i in range(40))
    near = base.replace("word7 ", "wordseven ").replace("word30 ", "wordthirty ")  # two words edited
    other = " ".join(f"token{i} from a page about groups rings and fields" for i in range(40))
    d = Deduper(threshold=0.7, num_perm=128)
    assert d.check("a", base) is None
    assert d.check("b", "  " + base.upper() + " ") == ("exact_duplicate", "a")  # whitespace/case normalised
    assert d.check("c", near) == ("near_duplicate", "a")
    assert d.check("d", other) is None
    jac = len(shingles(base) & shingles(near)) / len(shingles(base) | shingles(near))
    assert jac > 0.8 and abs(minhash(base).jaccard(minhash(near)) - jac) < 0.15


def test_perplexity_filter_on_a_tiny_model():
    from ankus.data.mathtext.filters import Perplexity

    ppl = Perplexity("tiny-llama", max_tokens=32)
    p = ppl.score(PROSE)
    assert 1.0 < p < 1e6 and ppl.score("x") == float("inf")


def test_prf_hand_counts():
    r = prf([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])  # tp 2, fp 1, fn 1
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3, abs=1e-4) and r["recall"] == pytest.approx(2 / 3, abs=1e-4)


# --- classifier --------------------------------------------------------------------------------------

def test_classifier_train_save_load_round_trip(tmp_path):
    texts = [PROSE + f" $x_{i}^2$ \\frac{{1}}{{{i}}}" for i in range(6)] + \
            [f"Install the package with pip, then run the server on port {i} and read the logs." for i in range(6)]
    labels = [1] * 6 + [0] * 6
    clf = C.train(texts, labels, n_features=1 << 10)
    npz, js = C.save(clf, tmp_path / "m")
    back = C.load(tmp_path / "m.npz")
    assert np.array_equal(back.coef, clf.coef) and back.intercept == clf.intercept
    np.testing.assert_allclose(back.scores(texts), clf.scores(texts), rtol=1e-6)
    s = back.scores(["The integral $\\int_0^1 x^2 dx = 1/3$ of a polynomial.", "Run pip install and start the server."])
    assert s[0] > 0.5 > s[1]
    with np.load(npz, allow_pickle=False) as z:
        assert set(z.files) == {"coef", "intercept"}
    assert json.loads(js.read_text())["format"] == "ankus-math-classifier/1"
    with pytest.raises(DataError, match="not found"):
        C.load(tmp_path / "missing")
    with pytest.raises(DataError, match="both labels"):
        C.train(texts[:3], [1, 1, 1])


def test_shipped_classifier_loads_and_records_heldout_metrics():
    clf = C.load(C.default_path())
    held = clf.meta["heldout"]["classifier@0.5"]
    assert held["n"] >= 40 and held["precision"] > 0.6 and held["recall"] > 0.6


def test_fixture_is_labelled_and_split_and_holds_no_gpl_pages():
    pages = load_fixture(FIXTURE)
    assert len(pages) >= 100 and {p.label for p in pages} == {0, 1} and {p.split for p in pages} == {"train", "test"}
    assert FIXTURE.stat().st_size < 1_500_000
    build = _fixture_script()
    assert not {p.source for p in pages} & set(build.GPL_SOURCES)  # the repo is MIT: no GPL test pages


def _fixture_script():
    spec = importlib.util.spec_from_file_location("build_mathtext_fixture", SCRIPTS / "build_mathtext_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar_with(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "in.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for name, data in [(r["file"], f"<p>{r['file']}</p>".encode()) for r in rows] + [
                ("labels.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fixture_script_filter_drops_only_the_named_sources(tmp_path):
    rows = [{"file": f"pages/{i:03d}.html", "label": i % 2, "split": "test" if i < 2 else "train", "source": src,
             "note": f"n{i}"} for i, src in enumerate(["a-doc", "gpl-doc", "a-doc", "b-doc"])]
    build = _fixture_script()
    assert build.filter_fixture(str(_tar_with(tmp_path, rows)), str(tmp_path / "out.tar.xz"), {"gpl-doc"}) == (4, 3)
    pages = load_fixture(tmp_path / "out.tar.xz")
    assert [p.file for p in pages] == ["pages/000.html", "pages/002.html", "pages/003.html"]  # names kept, gap left
    assert [(p.label, p.split, p.source) for p in pages] == [(0, "test", "a-doc"), (0, "train", "a-doc"),
                                                              (1, "train", "b-doc")]
    assert pages[1].html == b"<p>pages/002.html</p>"


def test_filter_decision_drops_short_and_non_math():
    assert filter_decision("<p>hi</p>", "hi", 0.99) == 0
    assert filter_decision("", PROSE, 0.9) == 1 and filter_decision("", PROSE, 0.3) == 0


# --- CLI ---------------------------------------------------------------------------------------------

def _write_pages(d: Path) -> None:
    d.mkdir()
    math = page(f"<p>{PROSE}</p><p>The roots are <script type='math/tex'>x=\\frac{{-b\\pm\\sqrt{{D}}}}{{2a}}</script>"
                " where the discriminant is <script type='math/tex'>D=b^2-4ac</script>.</p>")
    (d / "a.html").write_text(math)
    (d / "b_copy.html").write_text(math.replace("<title>T</title>", "<title>copy</title>"))  # same text
    (d / "c_near.html").write_text(math.replace("second degree", "2nd degree"))
    (d / "d_empty.html").write_bytes(b"   \n")
    (d / "e_latin1.html").write_bytes(page("<p>caf\xe9 menu: soup, bread, wine. " * 20 + "</p>").encode("latin-1"))
    (d / "f_broken.html").write_text("<html><body><article role='main'><p>Every prime number greater than two is "
                                     "odd, and by the theorem of Euclid there are infinitely many primes. " * 3 +
                                     " <b><i>unclosed $p_n^2$ <div></span></p")
    (d / "g_binary.html").write_bytes(b"\x00\x01\x02" * 100)
    (d / "h_german.html").write_text(page("<p>" + "Die Gleichung hat zwei Lösungen und wir beweisen es. " * 10
                                          + "$x^2$</p>"))


def test_cli_math_extract_counts_every_page(tmp_path, capsys):
    _write_pages(tmp_path / "in")
    assert main(["data", "math-extract", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    kept = [json.loads(x) for x in (tmp_path / "out" / "kept.jsonl").read_text().splitlines()]
    dropped = {json.loads(x)["id"]: json.loads(x)["reason"]
               for x in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()}
    assert stats["pages"] == 8 and stats["kept"] + sum(stats["dropped"].values()) == 8
    assert [k["id"] for k in kept] == ["a.html", "f_broken.html"]
    assert "$D=b^2-4ac$" in kept[0]["text"]
    assert dropped == {"b_copy.html": "exact_duplicate", "c_near.html": "near_duplicate", "d_empty.html": "empty",
                       "e_latin1.html": "no_math_signal", "g_binary.html": "binary", "h_german.html": "not_english"}
    assert stats["non_utf8"] == 1 and stats["stages"][-1]["out"] == 2
    csv = (tmp_path / "out" / "stages.csv").read_text().splitlines()
    assert csv[0] == "stage,in,dropped,out" and csv[1] == "empty,8,1,7" and csv[-1] == "near_duplicate,3,1,2"
    assert "kept 2 of 8 pages" in capsys.readouterr().out


def test_cli_math_extract_with_perplexity_filter(tmp_path):
    _write_pages(tmp_path / "in")
    assert main(["data", "math-extract", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--ppl-model", "tiny-llama", "--ppl-max", "2", "--ppl-tokens", "16"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    # perplexity comes before dedup: all four pages that reach it go (a random model is far above 2)
    assert stats["dropped"]["high_perplexity"] == 4 and stats["kept"] == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "math-extract", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.html").write_text("<p>x</p>")
    assert main(["data", "math-extract", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err


def test_cli_math_train_on_the_fixture(tmp_path, capsys):
    assert main(["data", "math-train", str(FIXTURE), "--out", str(tmp_path / "clf")]) == 0
    out = capsys.readouterr().out
    assert "classifier@0.5: precision" in out and (tmp_path / "clf.npz").exists()
    shipped, fresh = C.load(C.default_path()), C.load(tmp_path / "clf")
    np.testing.assert_allclose(fresh.coef, shipped.coef, atol=1e-5)  # the shipped one is this, reproducibly
