"""``ankus data math-extract`` and ``ankus data math-train``: the parsers and thin commands
(imports of resiliparse, datasketch and scikit-learn wait until a command runs)."""

from __future__ import annotations

import json


def add_parsers(data_sub) -> None:
    q = data_sub.add_parser("math-extract", help="OpenWebMath-style: HTML pages -> math text with LaTeX kept, "
                            "filtered (prefilter, language, classifier, perplexity, dedup), every drop logged",
                            description="Extract text with $...$/$$...$$ math from every .html/.htm/.xhtml under "
                            "IN_DIR and filter it; writes OUT/kept.jsonl, OUT/dropped.jsonl, OUT/stats.json.")
    q.add_argument("in_dir", help="directory of HTML pages (searched recursively)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--classifier", default="", help="classifier stem from `ankus data math-train` "
                   "(default: the one shipped in ankus/assets)")
    q.add_argument("--threshold", type=float, default=0.5, help="min P(math) for pages without LaTeX")
    q.add_argument("--latex-threshold", type=float, default=0.2, help="min P(math) for pages with LaTeX")
    q.add_argument("--any-language", action="store_true", help="keep non-English pages")
    q.add_argument("--min-chars", type=int, default=200, help="drop pages with less main text than this")
    q.add_argument("--ppl-model", default="", help="model spec for the perplexity filter, e.g. "
                   "smollm2-135m-instruct (default: no perplexity filter)")
    q.add_argument("--ppl-max", type=float, default=1000.0, help="drop pages above this perplexity")
    q.add_argument("--ppl-tokens", type=int, default=256, help="tokens read per page for perplexity")
    q.add_argument("--minhash-threshold", type=float, default=0.7, help="near-duplicate Jaccard threshold")
    q.add_argument("--limit", type=int, default=0, help="only the first N pages (0 = all)")
    q.set_defaults(func=cmd_math_extract)
    t = data_sub.add_parser("math-train", help="train the math-score classifier on a labelled fixture",
                            description="Train on the fixture's train split, report precision/recall on its "
                            "test split, write STEM.npz + STEM.json.")
    t.add_argument("fixture", help="labelled pages: .tar.xz or directory with labels.jsonl "
                   "(e.g. tests/fixtures/mathtext_pages.tar.xz)")
    t.add_argument("--out", required=True, help="output stem (writes OUT.npz and OUT.json)")
    t.add_argument("--c", type=float, default=4.0, help="inverse L2 strength of the logistic regression")
    t.set_defaults(func=cmd_math_train)


def cmd_math_extract(args) -> int:
    from ankus.data.mathtext.pipeline import MathExtractConfig, run_math_extract

    cfg = MathExtractConfig(classifier=args.classifier, threshold=args.threshold,
                            latex_threshold=args.latex_threshold, english_only=not args.any_language,
                            min_chars=args.min_chars, ppl_model=args.ppl_model, ppl_max=args.ppl_max,
                            ppl_tokens=args.ppl_tokens, minhash_threshold=args.minhash_threshold, limit=args.limit)
    s = run_math_extract(args.in_dir, args.out, cfg)
    drops = ", ".join(f"{n} {k}" for k, n in s["dropped"].items()) or "none"
    print(f"{args.out}: kept {s['kept']} of {s['pages']} pages ({s['pages_per_s']} pages/s); dropped: {drops}; "
          f"non-UTF-8 pages: {s['non_utf8']}")
    return 0


def cmd_math_train(args) -> int:
    from ankus.data.mathtext.fixture import train_from_fixture

    m = train_from_fixture(args.fixture, args.out, c=args.c)
    for name in ("classifier@0.5", "filter_chain"):
        r = m[name]
        print(f"{name}: precision {r['precision']:.3f} recall {r['recall']:.3f} F1 {r['f1']:.3f} "
              f"on {r['n']} held-out pages ({r['positives']} math)")
    print(json.dumps(m["by_source"]))
    print(f"wrote {args.out}.npz and {args.out}.json")
    return 0
