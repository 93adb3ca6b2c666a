"""Full-rank vs LoRA vs ReLoRA pretraining at equal steps, small scale on one CPU thread.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python experiments/relora.py \
        --steps 200 --warm 50 --reset 25 --restart-warmup 5   # ~20 min (five arms)

llama-5m (5.1M parameters, SmolLM2 tokenizer) on the Python standard library's sources, the same
data order, batch 8 x 128 tokens, AdamW, warm-up + cosine:

* ``full``: every weight trains for --steps steps;
* ``lora``: --warm full-rank steps, then rank-r adapters on every attention and MLP linear for the
  rest, never merged (ReLoRA with reset_every > steps);
* ``relora``: the same warm start, then adapters merged and restarted every --reset steps
  (magnitude pruning 0.9 of their Adam moments, --restart-warmup LR re-warm-up);
* ``lora-emb`` and ``relora-emb``: ``lora`` and ``relora`` with ``relora.train_embeddings=true``
  (the embeddings, output head and norms trained in full next to the adapters, as in the paper).

``--arms relora-emb,full`` runs a subset (the table lists those present; a finished run is reused).

Per run (each in its own process): final validation loss, trainable parameters after the warm
start, peak RSS, median s/step over the post-warm-start steps, and the numerical rank of the
accumulated update of one weight (layers.1.mlp.up_proj, 256 x 96) from the end of the warm start
to the end. Writes runs/experiments/relora/summary.csv and relora.png; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from _common import read_metrics, run_pretrain

WEIGHT = "model.layers.1.mlp.up_proj.weight"


def weight_at(run_dir: Path, step: int | None):
    """The weight from the step-N checkpoint (peft or plain keys), or the final model/ when None."""
    from safetensors.torch import load_file

    if step is None:
        return load_file(str(run_dir / "model" / "model.safetensors"))[WEIGHT]
    state = load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
    peft_key = "base_model.model." + WEIGHT.replace(".weight", ".base_layer.weight")
    return state[peft_key] if peft_key in state else state[WEIGHT]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="runs/corpora/stdlib")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warm", type=int, default=100)
    ap.add_argument("--reset", type=int, default=50)
    ap.add_argument("--restart-warmup", type=int, default=10)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default="runs/experiments/relora")
    ap.add_argument("--arms", default="full,lora,relora,lora-emb,relora-emb", help="comma-separated runs to do")
    args = ap.parse_args()
    from ankus.models.relora import update_rank

    out = Path(args.out)
    t0 = time.time()
    common = ["model.spec=llama-5m", f"data.corpus={args.corpus}", "data.seq_length=128", "trainer.batch_size=8",
              "data.val_fraction=0.05", "data.val_rows=32", f"trainer.total_steps={args.steps}", f"trainer.lr={args.lr}",
              f"trainer.warmup_steps={args.steps // 10}", "trainer.lr_schedule=cosine", "trainer.weight_decay=0.1",
              "method.eval_every=50", f"trainer.checkpoint_every={args.warm}", "trainer.keep_last=0",
              "run.progress=false", "run.save_model=true", f"run.out_dir={out}"]
    adapters = ["relora.enabled=true", f"relora.r={args.r}", f"relora.alpha={args.alpha}",
                f"relora.warm_start_steps={args.warm}", f"relora.restart_warmup={args.restart_warmup}",
                "relora.prune=magnitude", "relora.prune_ratio=0.9"]
    lora, relora, emb = f"relora.reset_every={args.steps + 1}", f"relora.reset_every={args.reset}", "relora.train_embeddings=true"
    arms = {"full": [], "lora": [*adapters, lora], "relora": [*adapters, relora],
            "lora-emb": [*adapters, lora, emb], "relora-emb": [*adapters, relora, emb]}
    runs = {name: arms[name] for name in args.arms.split(",")}
    rows = []
    for name, extra in runs.items():
        done = out / f"{name}.json"  # a finished run is reused (delete it to rerun)
        summary = (json.loads(done.read_text()) if done.exists() and (out / name / "model").exists()
                   else run_pretrain("pretrain_tiny", [*common, *extra, f"run.name={name}"], done))
        metrics = read_metrics(out / name)
        dts = [8 * 128 / m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m and m["step"] > args.warm]
        delta = weight_at(out / name, None) - weight_at(out / name, args.warm)
        rows.append({"run": name, "val_loss": summary["loss/val"], "trainable_params": summary["trainable_params"],
                     "peak_rss_mb": round(summary["max_rss_mb"]), "s_per_step": round(statistics.median(dts), 3),
                     "update_rank": update_rank(delta), "max_rank": min(delta.shape), "wall_s": round(summary["wall_s"])})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(out, list(runs))
    print(f"\nllama-5m on {args.corpus}, {args.steps} steps (warm start {args.warm} full-rank steps for lora/relora), "
          f"r={args.r}, alpha={args.alpha}, relora reset every {args.reset}")
    print(f"{'run':<12}{'val loss':>9}{'trainable':>11}{'peak RSS MB':>12}{'s/step':>8}{'update rank':>12}")
    for r in rows:
        print(f"{r['run']:<12}{r['val_loss']:>9.3f}{r['trainable_params']:>11}{r['peak_rss_mb']:>12}{r['s_per_step']:>8}"
              f"{r['update_rank']:>8}/{r['max_rank']}")
    print(f"wall {time.time() - t0:.0f} s; wrote {out}/summary.csv, relora.png")


def plot(out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in names:
        m = read_metrics(out / name)
        tr = [(r["step"], r["loss/train"]) for r in m if "loss/train" in r]
        va = [(r["step"], r["loss/val"]) for r in m if "loss/val" in r]
        axes[0].plot(*zip(*tr), lw=0.8, label=name)
        axes[1].plot(*zip(*va), marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("train loss", "validation loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "relora.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
