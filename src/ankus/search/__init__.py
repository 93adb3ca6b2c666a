"""Corpus search: a BM25 index (bm25s) over JSONL, text or source files and `ankus data corpus`
directories, with incremental adds, highlighted and PII-redacted results, and a web page.

    ankus search index stdlib --out runs/search/stdlib
    ankus search query runs/search/stdlib "parse command line arguments" -k 5
    ankus search add runs/search/stdlib more_docs.jsonl
    ankus search serve runs/search/stdlib --port 8765

Modules: ``terms`` (tokenize, stop words, stemming), ``sources`` (reading corpora into documents),
``index`` (build, add, save, load, score), ``show`` (highlight and redact), ``web`` (the page and
the JSON API), ``commands`` (the CLI). See docs/search.md.
"""
