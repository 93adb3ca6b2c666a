"""The search page in a real headless browser (Chromium), and the JSON API.

Chromium comes from Debian (`apt-get install -y chromium`; .ci/run installs it when missing). Without
it this test FAILS, saying so: it is never skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from ankus.search import index as ix
from ankus.search.web import SearchApp, make_server


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found: install it with `apt-get install -y chromium` (Debian); "
                    "the search page is tested in a real headless browser")
    return exe


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    (tmp / "docs.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate([
        "The socket module opens a network connection; mail ops@example.com or call 555-123-4567.",
        "Connections from 10.1.2.3 are logged by Python 3.12.1.",
        "Nothing relevant here at all."])) + "\n")
    srv = make_server(SearchApp(ix.build(tmp / "docs.jsonl")), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", tmp
    srv.shutdown()
    srv.server_close()


def _browser(exe: str, tmp, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_in_headless_chromium(server):
    base, tmp = server
    exe = _chromium()
    url = f"{base}/?q={urllib.parse.quote('socket connection')}&k=5"
    dom = _browser(exe, tmp, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<p class="meta" id="count">2 results</p>' in html
    assert "<mark>socket</mark>" in html and "<mark>connection</mark>" in html and "<mark>Connections</mark>" in html
    assert "[email]" in html and "[phone]" in html and "[ip]" in html and "3.12.1" in html
    assert "ops@example.com" not in html and "10.1.2.3" not in html and "Nothing relevant" not in html
    shot = tmp / "page.png"
    res = _browser(exe, tmp, f"--screenshot={shot}", "--window-size=900,600", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)                  # (600, 900, 3|4) floats in [0, 1]
    assert img.shape[:2] == (600, 900)
    rgb = img[..., :3]
    assert rgb.std() > 0.05 and (rgb.min(axis=-1) < 0.5).mean() > 0.005     # dark text on the page, not blank
    marked = (rgb[..., 0] > 0.9) & (rgb[..., 1] > 0.75) & (rgb[..., 2] < 0.4)   # the <mark> yellow (#fd4)
    assert marked.sum() > 50


def test_stop_word_query_on_page(server):
    base, tmp = server
    dom = _browser(_chromium(), tmp, "--dump-dom", f"{base}/?q=the+of")
    assert dom.returncode == 0 and "only stop words" in dom.stdout


def test_json_api(server):
    base, _ = server
    with urllib.request.urlopen(f"{base}/api/search?q=connection&k=1") as r:
        body = json.loads(r.read())
    assert body["k"] == 1 and len(body["results"]) == 1 and "<mark>" in body["results"][0]["snippet_html"]
    for q, msg in [("the+and", "only stop words"), ("x&k=zero", "k must be an integer"), ("x&k=0", "k must be >= 1")]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/api/search?q={q}")
        assert e.value.code == 400 and msg in json.loads(e.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{base}/nope")
    assert e.value.code == 404


def test_cli_serve_process(tmp_path):
    """`ankus search serve` in its own process: the URL on its first line, the API answering."""
    import os
    import sys

    from ankus.cli import main

    (tmp_path / "a.txt").write_text("Served from the same process as the page.")
    assert main(["search", "index", str(tmp_path / "a.txt"), "--out", str(tmp_path / "idx")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "ankus.cli", "search", "serve", str(tmp_path / "idx"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ankus search: http://127.0.0.1:"), line
        base = line.split()[2].rstrip("/")
        with urllib.request.urlopen(f"{base}/api/search?q=served+page") as r:
            assert json.loads(r.read())["results"][0]["id"] == "a.txt"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
