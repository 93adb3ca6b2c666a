"""OpenWebMath-style math text from HTML (Paster et al., 2023): extraction that keeps LaTeX,
filters (math prefilter, language, perplexity, exact and MinHash near-duplicates), a small
math-score classifier, and the pipeline that logs every kept and dropped page.

Modules: :mod:`.extract` (HTML -> text with ``$...$``/``$$...$$``), :mod:`.filters`,
:mod:`.classifier`, :mod:`.pipeline` (``ankus data math-extract``), :mod:`.fixture`
(the labelled pages in tests/fixtures and ``ankus data math-train``).
"""
