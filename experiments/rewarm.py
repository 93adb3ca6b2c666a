"""Re-warming for continued pretraining (Gupta et al. 2023), small scale on one CPU thread.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python experiments/rewarm.py   # ~15-20 min

llama-5m (5.1M parameters, SmolLM2 tokenizer) is pretrained on corpus A (the Python standard
library's sources) for --steps-a steps (warm-up + cosine), then continued on corpus B (Shakespeare)
from A's saved model/ for --steps-b steps in each of these ways:

* ``constant``: no warm-up, constant LR at A's final LR (lr x min_lr_ratio);
* ``rewarm-<lr>-w<W>``: linear warm-up over W steps to a new maximum lr, then cosine to 0.1 x lr,
  at three maximum LRs and two warm-up lengths.

Every --eval-every steps the continuation logs the validation loss on B (adaptation) and on A's
held-out documents (forgetting, ``data.extra_val``). Writes runs/experiments/rewarm/curves.csv,
summary.csv and rewarm.png (one panel per run, both curves), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from _common import read_metrics, run_pretrain

COMMON = ["model.spec=llama-5m", "data.seq_length=128", "trainer.batch_size=8", "data.val_fraction=0.05",
          "data.val_rows=16", "trainer.weight_decay=0.1", "trainer.min_lr_ratio=0.1", "run.progress=false",
          "trainer.log_every=5"]


def initial_losses(model_dir: Path, corpora: dict[str, str]) -> dict[str, float]:
    """Validation losses of A's model on each corpus before any continued step."""
    import numpy as np  # noqa: F401

    from ankus.config import build
    from ankus.data.corpus import load_corpus
    from ankus.models.loading import load_model
    from ankus.trainers.pretrain import Config, epoch_stream, evaluate, split_documents

    cfg = build(Config, {}, ["data.seq_length=128", "data.val_rows=16", "method.loss_chunk=1024"])
    model, _ = load_model(str(model_dir))
    out = {}
    for name, path in corpora.items():
        c = load_corpus(path)
        val = split_documents(len(c.documents), 0.05, 0)[1]
        out[name] = evaluate(model, *epoch_stream(c.documents, val, None), cfg, 8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-a", default="runs/corpora/stdlib")
    ap.add_argument("--corpus-b", default="runs/corpora/shakespeare")
    ap.add_argument("--steps-a", type=int, default=400)
    ap.add_argument("--steps-b", type=int, default=150)
    ap.add_argument("--lr-a", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", default="runs/experiments/rewarm")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    a_dir = out / "A"
    if not (a_dir / "model").exists():
        run_pretrain("pretrain_tiny", [*COMMON, f"data.corpus={args.corpus_a}", f"trainer.total_steps={args.steps_a}",
                                       f"trainer.lr={args.lr_a}", f"trainer.warmup_steps={args.steps_a // 10}",
                                       "trainer.lr_schedule=cosine", "method.eval_every=50",
                                       f"run.out_dir={out}", "run.name=A"], out / "A.json")
    start = initial_losses(a_dir / "model", {"A": args.corpus_a, "B": args.corpus_b})
    final_a = args.lr_a * 0.1
    runs = {"constant": (final_a, 0, "constant")}
    wb = max(args.steps_b // 12, 1)
    for lr in (3e-4, 1e-3, 3e-3):
        runs[f"rewarm-{lr:g}-w{wb}"] = (lr, wb, "cosine")
    runs[f"rewarm-0.001-w{3 * wb}"] = (1e-3, 3 * wb, "cosine")
    name_a = Path(args.corpus_a).resolve().name
    curves, summary = [], []
    for name, (lr, warmup, schedule) in runs.items():
        if not (out / name / "model").exists():
            run_pretrain("pretrain_tiny", [*COMMON, f"data.corpus={args.corpus_b}", f"model.spec={a_dir / 'model'}",
                                           f"data.extra_val=[{args.corpus_a}]", f"trainer.total_steps={args.steps_b}",
                                           f"trainer.lr={lr}", f"trainer.warmup_steps={warmup}",
                                           f"trainer.lr_schedule={schedule}", f"method.eval_every={args.eval_every}",
                                           "run.save_model=true", f"run.out_dir={out}", f"run.name={name}"],
                         out / f"{name}.json")
        rows = [{"run": name, "step": 0, "lr": 0.0, "val_A": start["A"], "val_B": start["B"]}]
        seen = set()
        for r in read_metrics(out / name):
            if "loss/val" in r and r["step"] not in seen:
                seen.add(r["step"])
                lrs = [m["lr"] for m in read_metrics(out / name) if m.get("step") == r["step"] and "lr" in m]
                rows.append({"run": name, "step": r["step"], "lr": lrs[0] if lrs else "", "val_A": r[f"loss/val_{name_a}"],
                             "val_B": r["loss/val"]})
        curves += rows
        summary.append({"run": name, "max_lr": lr, "warmup": warmup, "schedule": schedule,
                        "val_A_first": rows[1]["val_A"], "val_B_first": rows[1]["val_B"],
                        "val_A_max": max(r["val_A"] for r in rows), "val_A_final": rows[-1]["val_A"],
                        "val_B_min": min(r["val_B"] for r in rows), "val_B_final": rows[-1]["val_B"]})
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves[0]))
        w.writeheader()
        w.writerows(curves)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    plot(curves, list(runs), out / "rewarm.png", start)
    print(f"\nA: llama-5m on {args.corpus_a}, {args.steps_a} steps; before continuing: val_A {start['A']:.3f}, "
          f"val_B {start['B']:.3f}")
    print(f"(val_A/val_B first: at the first evaluation, step {args.eval_every})")
    print(f"{'run':<22}{'max lr':>8}{'warmup':>7}{'val_A first':>12}{'val_B first':>12}{'val_A max':>10}{'val_A end':>10}"
          f"{'val_B min':>10}{'val_B end':>10}")
    for s in summary:
        print(f"{s['run']:<22}{s['max_lr']:>8.0e}{s['warmup']:>7}{s['val_A_first']:>12.3f}{s['val_B_first']:>12.3f}{s['val_A_max']:>10.3f}"
              f"{s['val_A_final']:>10.3f}{s['val_B_min']:>10.3f}{s['val_B_final']:>10.3f}")
    print(f"wall {time.time() - t0:.0f} s; wrote {out}/curves.csv, summary.csv, rewarm.png")


def plot(curves: list[dict], names: list[str], path: Path, start: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in curves if r["run"] == name]
        ax.plot([r["step"] for r in rows], [r["val_A"] for r in rows], marker="o", ms=2, label="val A (stdlib)")
        ax.plot([r["step"] for r in rows], [r["val_B"] for r in rows], marker="o", ms=2, label="val B (shakespeare)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("continued step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
