"""``ankus search index|query|add|serve``: one function per command (heavy imports inside)."""

from __future__ import annotations

import sys
import time

__all__ = ["add_parser", "cmd_index", "cmd_query", "cmd_add", "cmd_serve"]


def _skips(skipped: dict) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v) or "none"


def cmd_index(args) -> int:
    from ankus.search.index import IndexConfig, build, save

    t0 = time.perf_counter()
    cfg = IndexConfig(k1=args.k1, b=args.b, text_field=args.text_field, id_field=args.id_field,
                      passage_words=args.passage_words)
    index = build(args.corpus, cfg)
    save(index, args.out)
    print(f"indexed {index.n_docs} documents, {len(index.vocab)} terms from {len(index.files)} files in "
          f"{time.perf_counter() - t0:.1f}s -> {args.out} (skipped: {_skips(index.skipped)})")
    return 0


def cmd_add(args) -> int:
    from ankus.search.index import add, load, save

    t0 = time.perf_counter()
    index = load(args.index)
    counts = add(index, args.corpus)
    if counts["added"]:
        save(index, args.index)
    print(f"added {counts['added']} documents ({index.n_docs} now, {len(index.vocab)} terms) in "
          f"{time.perf_counter() - t0:.1f}s (skipped: {_skips({k: v for k, v in counts.items() if k != 'added'})})")
    return 0


def cmd_query(args) -> int:
    from ankus.search.index import load, query_terms, search
    from ankus.search.show import redact, render

    index = load(args.index)
    hits = search(index, args.text, args.k)
    if args.json:
        import json

        for h in hits:
            print(json.dumps({"rank": h.rank, "id": redact(h.id), "source": redact(h.source), "score": h.score,
                              "snippet": render(h.text, set(query_terms(args.text)), width=args.width)}))
        return 0
    style = "ansi" if sys.stdout.isatty() else "brackets"
    wanted = set(query_terms(args.text))
    if not hits:
        print(f"no document contains a term of {args.text!r}")
    for h in hits:
        print(f"{h.rank:>3}. {redact(h.id)}  (score {h.score:.3f})  {redact(h.source)}")
        print(f"     {render(h.text, wanted, style=style, width=args.width)}\n")
    return 0


def cmd_serve(args) -> int:
    from ankus.search.index import load
    from ankus.search.web import SearchApp, make_server
    from ankus.serve import run_until_interrupted

    server = make_server(SearchApp(load(args.index), width=args.width), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"ankus search: http://{host}:{port}/  (JSON: /api/search?q=...)", flush=True)
    run_until_interrupted(server)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="BM25 corpus search: ankus search index|query|add|serve",
                       description="BM25 search (bm25s) over .jsonl/.txt/.py corpora and `ankus data corpus` "
                                   "directories; results highlighted and PII-redacted. See docs/search.md.")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    s = p.add_subparsers(dest="search_command", metavar="TOOL")
    q = s.add_parser("index", help="build an index: CORPUS is a .jsonl/.txt/.py file, a directory, an "
                     "`ankus data corpus` directory, stdlib or shakespeare")
    q.add_argument("corpus")
    q.add_argument("--out", required=True, help="index directory to write (replaced whole, atomically)")
    q.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    q.add_argument("--id-field", default="id", help="JSONL field holding a document id (default: id; "
                   "else FILE:LINE)")
    q.add_argument("--passage-words", type=int, default=0, help="split documents into passages of N words")
    q.add_argument("--k1", type=float, default=1.5)
    q.add_argument("--b", type=float, default=0.75)
    q.set_defaults(func=cmd_index)
    q = s.add_parser("query", help="top-k documents for a query, terms highlighted, PII redacted")
    q.add_argument("index")
    q.add_argument("text")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--width", type=int, default=300, help="snippet width in characters")
    q.add_argument("--json", action="store_true", help="one JSON object per result")
    q.set_defaults(func=cmd_query)
    q = s.add_parser("add", help="add the new documents of CORPUS (files not yet indexed) without a rebuild")
    q.add_argument("index")
    q.add_argument("corpus")
    q.set_defaults(func=cmd_add)
    q = s.add_parser("serve", help="a web page + JSON API (/api/search?q=) over the index")
    q.add_argument("index")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8765)
    q.add_argument("--width", type=int, default=400, help="snippet width in characters")
    q.set_defaults(func=cmd_serve)
