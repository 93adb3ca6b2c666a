"""The search page and JSON API, served by the same process (stdlib ``http.server``).

    GET /                      the form
    GET /?q=TEXT&k=10          the form + results (rendered on the server: no JavaScript needed)
    GET /api/search?q=TEXT&k=  {"query", "k", "results": [{"rank", "id", "source", "score", "snippet_html"}]}

Bad requests (no ``q``, a stop-word-only query, a bad ``k``) are 400 with ``{"error": message}`` in
the API and a message on the page; the server goes on.
"""

from __future__ import annotations

import html
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from ankus.config import ConfigError
from ankus.data.io import DataError
from ankus.search.index import Index, query_terms, search
from ankus.search.show import redact, render

__all__ = ["SearchApp", "make_server"]

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ankus search{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; background: #fff; }}
form {{ margin-bottom: 1.5em; }} input[name=q] {{ width: 30em; font-size: 1.1em; padding: .3em; }}
.result {{ margin: 1em 0; padding: .5em 1em; border-left: 4px solid #4a7; background: #f4f8f4; }}
.meta {{ color: #666; font-size: .85em; }} mark {{ background: #fd4; font-weight: bold; }}
.error {{ color: #b00; }}
</style></head><body>
<h1>ankus search</h1>
<p class="meta">{n_docs} documents, {n_terms} terms. BM25 (bm25s, lucene; k1={k1}, b={b}).</p>
<form method="get" action="/"><input name="q" value="{q}" autofocus> <input name="k" value="{k}" size="3">
<button type="submit">Search</button></form>
{body}
</body></html>
"""


class SearchApp:
    """The endpoints as plain methods (query string in, status + body out), apart from HTTP."""

    def __init__(self, index: Index, width: int = 400):
        self.index, self.width = index, width

    def _run(self, params: dict[str, list[str]]):
        q = (params.get("q") or [""])[0]
        try:
            k = int((params.get("k") or ["10"])[0])
        except ValueError:
            raise ConfigError(f"k must be an integer, got {params['k'][0]!r}") from None
        hits = search(self.index, q, k)
        wanted = set(query_terms(q))
        return q, k, [{"rank": h.rank, "id": redact(h.id), "source": redact(h.source), "score": round(h.score, 4),
                       "snippet_html": render(h.text, wanted, style="html", width=self.width)} for h in hits]

    def api(self, params: dict[str, list[str]]) -> tuple[int, dict]:
        try:
            q, k, results = self._run(params)
        except (ConfigError, DataError) as e:
            return 400, {"error": str(e)}
        return 200, {"query": q, "k": k, "results": results}

    def page(self, params: dict[str, list[str]]) -> tuple[int, str]:
        q, k, status = (params.get("q") or [""])[0], (params.get("k") or ["10"])[0], 200
        body = ""
        if q:
            try:
                _, _, results = self._run(params)
                body = f"<p class=\"meta\" id=\"count\">{len(results)} results</p>\n" + "\n".join(
                    f"<div class=\"result\"><div class=\"meta\">{r['rank']}. <b>{html.escape(r['id'])}</b> "
                    f"score {r['score']:.3f} &middot; {html.escape(r['source'])}</div>"
                    f"<div class=\"snippet\">{r['snippet_html']}</div></div>" for r in results)
            except (ConfigError, DataError) as e:
                status, body = 400, f"<p class=\"error\">{html.escape(str(e))}</p>"
        c = self.index.config
        return status, _PAGE.format(title=f": {html.escape(q)}" if q else "", n_docs=self.index.n_docs,
                                    n_terms=len(self.index.vocab), k1=c.k1, b=c.b, q=html.escape(q, quote=True),
                                    k=html.escape(k, quote=True), body=body)


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for ``app`` (port 0: any free port; ``server.server_address`` says which)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            params = parse_qs(url.query)
            try:
                if url.path == "/api/search":
                    status, obj = app.api(params)
                    self._send(status, json.dumps(obj, ensure_ascii=False), "application/json")
                elif url.path in ("/", "/index.html"):
                    status, text = app.page(params)
                    self._send(status, text, "text/html; charset=utf-8")
                else:
                    self._send(404, json.dumps({"error": f"no page {url.path}; try / or /api/search?q="}),
                               "application/json")
            except Exception as e:  # the server goes on
                self._send(500, json.dumps({"error": f"{type(e).__name__}: {e}"}), "application/json")

        def _send(self, status: int, text: str, ctype: str) -> None:
            blob = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, fmt, *args):  # quiet
            pass

    return ThreadingHTTPServer((host, port), Handler)
