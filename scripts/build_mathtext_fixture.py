"""Rebuild tests/fixtures/mathtext_pages.tar.xz (how the shipped fixture was made).

Sources (Debian bookworm packages, unpacked with ``apt-get download NAME && dpkg-deb -x NAME.deb x``):
python-mpmath-doc, python-sympy-doc, python3.11-doc; plus HTML already installed under
/usr/share/doc (nodejs, libxslt1-dev, libffi8). Pages were drawn with random.seed(15)
per source (1.5-90 kB, no index/search pages) plus six math-flavoured Python library pages;
the labels were written by hand after reading each page's extracted text.

GPL sources are excluded: the repository is MIT-licensed, and the pages are shipped whole, so
pages from GPL-licensed docs (maxima-doc, valgrind-doc: 28 of the 142 labelled candidates) are
dropped (``GPL_SOURCES``, the default of ``--drop-source``). The kept pages keep their file names
(``pages/NNN.html`` = the candidate's index), labels, splits and notes, so the numbering has gaps.

    # from the candidate list and the hand labels (all 142 candidates, GPL ones skipped)
    python scripts/build_mathtext_fixture.py build CANDIDATES.json LABELS.txt OUT.tar.xz
    # or rewrite an existing fixture without some sources (how the shipped one lost its GPL pages)
    python scripts/build_mathtext_fixture.py filter IN.tar.xz OUT.tar.xz

CANDIDATES.json: [{"src": ..., "path": ...}, ...]; LABELS.txt: "INDEX LABEL NOTE" per line.
Split: a page is held out (``test``) when sha256 of its original path mod 5 is 0 or 1 (~40%).
``--drop-source SRC`` (repeatable) replaces the default list; ``--drop-source ''`` keeps everything.
"""

import argparse
import hashlib
import io
import json
import tarfile

GPL_SOURCES = ("maxima-doc", "valgrind-doc")


def _add_labels(tar: tarfile.TarFile, lines: list[str]) -> None:
    data = "".join(lines).encode()
    info = tarfile.TarInfo("labels.jsonl")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build(cands_path: str, labels_path: str, out: str, drop: set[str]) -> None:
    cands = json.load(open(cands_path))
    labels = {}
    for line in open(labels_path):
        idx, lab, note = line.rstrip("\n").split(" ", 2)
        labels[int(idx)] = (int(lab), note)
    rows = []
    with tarfile.open(out, "w:xz", preset=9) as tar:
        for i, c in enumerate(cands):
            if c["src"] in drop:
                continue
            lab, note = labels[i]
            orig = c["path"].split("/share/doc/", 1)[-1]
            split = "test" if int(hashlib.sha256(orig.encode()).hexdigest(), 16) % 5 < 2 else "train"
            name = f"pages/{i:03d}.html"
            tar.add(c["path"], arcname=name)
            rows.append({"file": name, "label": lab, "split": split, "source": c["src"], "orig": orig, "note": note})
        _add_labels(tar, [json.dumps(r) + "\n" for r in rows])


def filter_fixture(src: str, out: str, drop: set[str]) -> tuple[int, int]:
    """Copy fixture ``src`` to ``out`` without the pages whose source is in ``drop``.
    Kept members keep their bytes and tar headers; kept labels.jsonl lines are copied verbatim."""
    with tarfile.open(src, "r:xz") as tin:
        lines = tin.extractfile("labels.jsonl").read().decode().splitlines(keepends=True)
        kept = [ln for ln in lines if json.loads(ln).get("source") not in drop]
        keep_files = {json.loads(ln)["file"] for ln in kept}
        with tarfile.open(out, "w:xz", preset=9) as tout:
            for m in tin.getmembers():
                if m.name in keep_files:
                    tout.addfile(m, tin.extractfile(m))
            _add_labels(tout, kept)
    return len(lines), len(kept)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("build", help="build from CANDIDATES.json + LABELS.txt")
    b.add_argument("cands"), b.add_argument("labels"), b.add_argument("out")
    f = sub.add_parser("filter", help="rewrite an existing fixture without some sources")
    f.add_argument("src"), f.add_argument("out")
    for p in (b, f):
        p.add_argument("--drop-source", action="append", default=None,
                       help=f"source to leave out (repeatable; default: the GPL ones, {', '.join(GPL_SOURCES)})")
    a = ap.parse_args(argv)
    drop = {s for s in (a.drop_source if a.drop_source is not None else GPL_SOURCES) if s}
    if a.mode == "build":
        build(a.cands, a.labels, a.out, drop)
    else:
        n, k = filter_fixture(a.src, a.out, drop)
        print(f"{a.out}: kept {k} of {n} pages (dropped sources: {', '.join(sorted(drop)) or 'none'})")


if __name__ == "__main__":
    main()
