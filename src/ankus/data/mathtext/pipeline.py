"""``ankus data math-extract IN_DIR --out DIR``: HTML pages -> filtered math text, every decision logged.

Stages, in order (a page leaves at the first stage that drops it; the reason names the stage):

==================  ==========================================================================
``empty``           the file is empty or only white space
``binary``          more than 1% NUL bytes (not a text page)
``extract_error``   extraction raised (resiliparse repairs most broken markup; what is left is
                    counted here, never raised)
``too_short``       fewer than ``min_chars`` characters of main text
``no_math_signal``  the prefilter (:func:`.filters.prefilter`) saw no math at all
``not_english``     :func:`.filters.is_english` says the prose is not English
``low_math_score``  the classifier's P(math) is under ``threshold`` (under ``latex_threshold``
                    for a page with LaTeX, which is strong evidence already, as in OpenWebMath)
``high_perplexity`` perplexity under ``ppl_model`` above ``ppl_max`` (only with a model)
``exact_duplicate`` / ``near_duplicate``  :class:`.filters.Deduper`
==================  ==========================================================================

Non-UTF-8 bytes are decoded (see :func:`.extract.decode_html`) and counted in ``stats.json``
(``non_utf8``, ``replaced_chars``), not dropped. Writes ``kept.jsonl`` (one page per line, with
its text), ``dropped.jsonl`` (page, stage, reason detail), ``stats.json`` (counts per stage
and reason, timings, pages/s, the settings) and ``stages.csv`` (pages in/dropped/out per stage).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ankus.config import ConfigError
from ankus.data.io import DataError
from ankus.data.mathtext import classifier as clf_mod
from ankus.data.mathtext.extract import decode_html, extract_html
from ankus.data.mathtext.filters import Deduper, Perplexity, is_english, math_signals, prefilter

HTML_SUFFIXES = (".html", ".htm", ".xhtml")
STAGES = ("empty", "binary", "extract_error", "too_short", "no_math_signal", "not_english", "low_math_score",
          "high_perplexity", "exact_duplicate", "near_duplicate")


@dataclass
class MathExtractConfig:
    classifier: str = ""  # stem of a math-train classifier; "" = the one shipped in ankus/assets
    threshold: float = 0.5
    latex_threshold: float = 0.2
    english_only: bool = True
    lang_cutoff: int = 1200
    min_chars: int = 200
    ppl_model: str = ""  # an ankus model spec; "" = no perplexity filter
    ppl_max: float = 1000.0
    ppl_tokens: int = 256
    minhash_threshold: float = 0.7
    num_perm: int = 128
    main_content: bool = True
    limit: int = 0  # 0 = every page

    def validate(self) -> None:
        for name in ("threshold", "latex_threshold", "minhash_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"math-extract: {name} must be in [0, 1], got {v}")
        if self.ppl_max <= 1.0 or self.ppl_tokens < 2 or self.min_chars < 0 or self.num_perm < 16:
            raise ConfigError("math-extract: need ppl_max > 1, ppl_tokens >= 2, min_chars >= 0, num_perm >= 16")


def html_files(in_dir: str | Path) -> list[Path]:
    root = Path(in_dir)
    if not root.is_dir():
        raise DataError(f"math-extract: {root} is not a directory; pass a directory of .html files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in HTML_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"math-extract: no .html/.htm/.xhtml files under {root}")
    return files


@dataclass
class Stages:
    """The loaded filters shared by every page of one run."""

    cfg: MathExtractConfig
    clf: clf_mod.MathClassifier
    dedup: Deduper
    ppl: Perplexity | None = None


def load_stages(cfg: MathExtractConfig) -> Stages:
    cfg.validate()
    clf = clf_mod.load(cfg.classifier or clf_mod.default_path())
    ppl = Perplexity(cfg.ppl_model, cfg.ppl_tokens) if cfg.ppl_model else None
    return Stages(cfg, clf, Deduper(cfg.minhash_threshold, cfg.num_perm), ppl)


def process_page(raw: bytes, key: str, st: Stages) -> tuple[dict, str | None]:
    """One page -> (record, None) if kept, or (record, stage that dropped it)."""
    rec: dict = {"id": key}
    if not raw.strip():
        return rec, "empty"
    if raw.count(b"\x00") > 0.01 * len(raw):
        return rec, "binary"
    dec = decode_html(raw)
    rec.update(encoding=dec.encoding, replaced_chars=dec.replaced)
    try:
        ext = extract_html(dec.text, st.cfg.main_content)
    except Exception as e:  # noqa: BLE001 -- any parser failure is a counted drop, never a crash
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        return rec, "extract_error"
    rec.update(title=ext.title, chars=len(ext.text), n_math=ext.n_math)
    if len(ext.text) < st.cfg.min_chars:
        return rec, "too_short"
    rec["signals"] = math_signals(dec.text, ext.text)
    if prefilter(rec["signals"]):
        return rec, "no_math_signal"
    english, evidence = is_english(ext.text, st.cfg.lang_cutoff)
    rec.update(evidence)
    if st.cfg.english_only and not english:
        return rec, "not_english"
    rec["math_score"] = round(float(st.clf.scores([ext.text])[0]), 4)
    bar = st.cfg.latex_threshold if rec["signals"]["latex"] else st.cfg.threshold
    if rec["math_score"] < bar:
        return rec, "low_math_score"
    if st.ppl is not None:
        rec["ppl"] = round(st.ppl.score(ext.text), 2)
        if rec["ppl"] > st.cfg.ppl_max:
            return rec, "high_perplexity"
    dup = st.dedup.check(key, ext.text)
    if dup:
        rec["duplicate_of"] = dup[1]
        return rec, dup[0]
    rec["text"] = ext.text
    return rec, None


def _stage_table(reasons: Counter, pages: int) -> list[dict]:
    rows, left = [], pages
    for stage in STAGES:
        n = reasons.get(stage, 0)
        rows.append({"stage": stage, "in": left, "dropped": n, "out": left - n})
        left -= n
    return rows


def run_math_extract(in_dir: str | Path, out_dir: str | Path, cfg: MathExtractConfig | None = None) -> dict:
    """Run every page of ``in_dir`` through the stages; write kept/dropped JSONL and stats.json."""
    cfg = cfg or MathExtractConfig()
    files = html_files(in_dir)[: cfg.limit or None]
    t_load = time.perf_counter()
    st = load_stages(cfg)
    load_s = time.perf_counter() - t_load
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reasons: Counter = Counter()
    non_utf8 = replaced = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with open(out / "kept.jsonl", "w") as kept, open(out / "dropped.jsonl", "w") as dropped:
        for path in files:
            rec, reason = process_page(path.read_bytes(), str(path.relative_to(in_dir)), st)
            non_utf8 += rec.get("encoding", "utf-8") != "utf-8"
            replaced += rec.get("replaced_chars", 0)
            if reason:
                reasons[reason] += 1
                dropped.write(json.dumps({**rec, "reason": reason}, ensure_ascii=False) + "\n")
            else:
                kept.write(json.dumps(rec, ensure_ascii=False) + "\n")
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = {"in_dir": str(in_dir), "pages": len(files), "kept": len(files) - sum(reasons.values()),
             "dropped": dict(sorted(reasons.items())), "stages": _stage_table(reasons, len(files)),
             "non_utf8": non_utf8, "replaced_chars": replaced, "seconds": round(secs, 3),
             "pages_per_s": round(len(files) / secs, 2) if secs > 0 else None, "cpu_seconds": round(cpu, 3),
             "pages_per_cpu_s": round(len(files) / cpu, 2) if cpu > 0 else None, "load_seconds": round(load_s, 3),
             "config": asdict(cfg)}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    rows = ["stage,in,dropped,out"] + [f"{r['stage']},{r['in']},{r['dropped']},{r['out']}" for r in stats["stages"]]
    (out / "stages.csv").write_text("\n".join(rows) + "\n")
    return stats
