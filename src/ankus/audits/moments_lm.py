"""``ankus audit moments lm``: n-gram statistics across a pretraining run's snapshots (Belrose et al. 2024).

For each ``<run>/snapshots/step-N/`` (``method.snapshot_steps`` of the pretrain trainer) it measures,
against add-k unigram and bigram models of the run's training documents (the pretrain split of
the corpus, seeded as the run's ``config.yaml`` says):

* ``kl_unigram`` / ``kl_bigram``: the mean over held-out text positions of KL(model's next-token
  distribution || unigram) and KL(model || bigram(. | previous token)); ``kl_bigram_u`` the same to
  the bigram smoothed toward the unigram (``k V u(w)`` pseudo-counts): add-k's uniform pseudo-counts
  swamp a rare context's few counts (k V = 4,915 at k = 0.1 with SmolLM2's vocabulary);
* ``loss_unigram`` / ``loss_bigram``: the model's mean next-token loss on sequences sampled from
  the unigram and the bigram model (the same sequences for every snapshot), next to
  ``loss_text`` on held-out text. ``ref_unigram`` (the unigram's entropy) and ``ref_bigram`` (the
  bigram's own loss on its samples) are the best losses a predictor can reach on those samples.

The reference effect: a network first fits low-order statistics, so its loss on n-gram samples
falls early in training, and later rises as it comes to rely on longer context that those samples
lack. Outputs in ``--out``: ``table.csv``, ``rows.jsonl``, ``moments_lm.png`` (x = step), ``config.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ankus.audits import moments_math as mm
from ankus.audits.tables import save_figure, step_axes, write_rows
from ankus.config import ConfigError, read_yaml
from ankus.data.corpus import load_corpus
from ankus.data.io import DataError

__all__ = ["NoSnapshotsError", "CorpusTooShortError", "MomentsLMConfig", "find_snapshots", "split_tokens",
           "sequence_losses", "snapshot_row", "run_moments_lm", "plot_lm", "cmd_moments_lm"]

COLUMNS = ["step", "loss_text", "loss_unigram", "loss_bigram", "kl_unigram", "kl_bigram", "kl_bigram_u", "ref_unigram",
           "ref_bigram"]


class NoSnapshotsError(DataError):
    """A run directory without ``snapshots/step-N/`` models."""


class CorpusTooShortError(DataError):
    """A corpus too short for the n-gram statistics or one held-out row."""


@dataclass
class MomentsLMConfig:
    run_dir: str = ""
    """A pretrain run directory with snapshots/step-N/ (method.snapshot_steps)."""
    corpus: str = ""
    """The `ankus data corpus` directory the run trained on."""
    out: str = ""
    """Directory for table.csv, rows.jsonl and moments_lm.png."""
    n_seqs: int = 32
    """Sequences of each kind: held-out text rows, unigram samples, bigram samples."""
    length: int = 128
    """Tokens per sequence."""
    k: float = 0.1
    """Add-k smoothing of the n-gram models the KL divergences are taken to."""
    sample_k: float = 0.0
    """Add-k smoothing of the n-gram models the sequences are sampled from (0 = the empirical counts)."""
    batch_size: int = 8
    seed: int = 0
    """Seed of the n-gram samples."""


def find_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, directory)]`` of ``<run>/snapshots/step-N/``, by step."""
    root = Path(run_dir) / "snapshots"
    found = sorted((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                   if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "config.json").exists())
    if not found:
        raise NoSnapshotsError(f"no snapshots in {root}: expected step-N/ model directories; pretrain with "
                               "method.snapshot_steps=[0,100,...] (recipe pretrain_moments) and pass that run directory")
    return found


def split_tokens(cfg: MomentsLMConfig) -> tuple[np.ndarray, np.ndarray, object]:
    """``(training tokens (N,), held-out rows (R, length), corpus)``: the run's seeded document split
    (``data.val_fraction`` and ``trainer.seed`` of ``<run>/config.yaml``; 0.05 and 0 without one)."""
    from ankus.trainers.pretrain import split_documents

    corpus = load_corpus(cfg.corpus)
    conf = Path(cfg.run_dir) / "config.yaml"
    run = read_yaml(conf) if conf.exists() else {}
    frac = float(run.get("data", {}).get("val_fraction", 0.05))
    train_ix, val_ix = split_documents(len(corpus.documents), frac, int(run.get("trainer", {}).get("seed", 0)))
    train = np.concatenate([corpus.documents[i] for i in train_ix]).astype(np.int64)
    held = np.concatenate([corpus.documents[i] for i in val_ix]).astype(np.int64) if val_ix else np.zeros(0, np.int64)
    n_rows = min(cfg.n_seqs, len(held) // cfg.length)
    if len(train) < cfg.length or n_rows == 0:
        raise CorpusTooShortError(f"corpus {cfg.corpus} is too short for this audit: {len(train)} training tokens and "
                                  f"{len(held)} held-out tokens (data.val_fraction={frac}), and it needs at least "
                                  f"--length {cfg.length} of each; lower --length or use a larger corpus")
    return train, held[:n_rows * cfg.length].reshape(n_rows, cfg.length), corpus


@torch.no_grad()
def sequence_losses(model, ids: np.ndarray, batch_size: int, stats=None, k: float = 0.0) -> dict[str, float]:
    """Mean next-token loss of ``model`` over ``ids (n, L)`` (positions 1..), and with ``stats``
    ``(unigram (V,), bigram counts)`` the mean KL of its next-token distributions to them."""
    total, kl_u, kl_b, kl_bu, n = 0.0, 0.0, 0.0, 0.0, 0
    for s in range(0, len(ids), batch_size):
        x = torch.from_numpy(ids[s:s + batch_size])  # (B, L)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        n += x[:, 1:].numel()
        if stats is None:
            continue
        for row, prev in zip(logits, x[:, :-1].numpy()):  # one sequence at a time: (L-1, V) bigram rows
            u, b, bu = mm.model_ngram_kl(row, prev, stats[0], stats[1], k)  # (L-1,) each
            kl_u, kl_b, kl_bu = kl_u + float(u.sum()), kl_b + float(b.sum()), kl_bu + float(bu.sum())
    out = {"loss": total / n}
    return {**out, "kl_unigram": kl_u / n, "kl_bigram": kl_b / n, "kl_bigram_u": kl_bu / n} if stats is not None else out


def snapshot_row(model, step: int, text: np.ndarray, uni_seqs: np.ndarray, bi_seqs: np.ndarray, stats,
                 cfg: MomentsLMConfig) -> dict[str, float]:
    """One table row: the snapshot's losses and KL divergences."""
    real = sequence_losses(model, text, cfg.batch_size, stats, cfg.k)
    return {"step": step, "loss_text": real["loss"], "loss_unigram": sequence_losses(model, uni_seqs, cfg.batch_size)["loss"],
            "loss_bigram": sequence_losses(model, bi_seqs, cfg.batch_size)["loss"], "kl_unigram": real["kl_unigram"],
            "kl_bigram": real["kl_bigram"], "kl_bigram_u": real["kl_bigram_u"]}


def run_moments_lm(cfg: MomentsLMConfig) -> list[dict]:
    """Measure every snapshot; write table.csv, rows.jsonl, moments_lm.png and config.yaml to ``cfg.out``."""
    from ankus.models.loading import load_model
    from ankus.trainers.pretrain import check_tokenizer

    if not cfg.out:
        raise DataError("moments lm: give --out DIR for the table and the plot")
    if cfg.k <= 0 or cfg.sample_k < 0 or cfg.length < 2 or cfg.n_seqs < 1:
        raise ConfigError(f"moments lm: need --k > 0 (the KL to an unsmoothed n-gram is infinite), --sample-k >= 0, "
                          f"--length >= 2 and --n-seqs >= 1; got {cfg.k}, {cfg.sample_k}, {cfg.length}, {cfg.n_seqs}")
    snaps = find_snapshots(cfg.run_dir)
    train, text, corpus = split_tokens(cfg)
    rows: list[dict] = []
    for step, path in snaps:
        model, tok = load_model(str(path), dtype="float32")
        model.eval()
        if not rows:  # the n-gram models and their samples, once, over the model's vocabulary
            check_tokenizer(corpus, tok, str(path))
            vocab = model.get_output_embeddings().weight.shape[0]
            stats = (mm.unigram_probs(train, vocab, cfg.k), mm.bigram_counts(train, vocab))
            sampler = mm.unigram_probs(train, vocab, cfg.sample_k)
            rng = np.random.default_rng(cfg.seed)
            uni_seqs = mm.sample_unigram(sampler, cfg.n_seqs, cfg.length, rng)
            bi_seqs = mm.sample_bigram(stats[1], sampler, cfg.sample_k, cfg.n_seqs, cfg.length, rng)
            refs = {"ref_unigram": mm.unigram_entropy(sampler),
                    "ref_bigram": mm.ngram_nll(bi_seqs, sampler, stats[1], cfg.sample_k)}
        rows.append({**snapshot_row(model, step, text, uni_seqs, bi_seqs, stats, cfg), **refs})
        print("[moments lm] " + "  ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()), flush=True)
    out = write_rows(cfg.out, cfg, rows, COLUMNS, decimals=5)
    plot_lm(rows, out / "moments_lm.png")
    return rows


def plot_lm(rows: list[dict], path: str | Path) -> Path:
    """Two panels against step: the losses (dashed: the n-gram references) and the KL divergences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, color in (("loss_text", "k"), ("loss_unigram", "tab:blue"), ("loss_bigram", "tab:orange")):
        a.plot(steps, [r[key] for r in rows], marker="o", markersize=3, color=color, label=key)
    for key, color in (("ref_unigram", "tab:blue"), ("ref_bigram", "tab:orange")):
        a.axhline(rows[0][key], color=color, linestyle="--", linewidth=1, label=f"{key} (n-gram's own)")
    for key, color in (("kl_unigram", "tab:blue"), ("kl_bigram", "tab:orange"), ("kl_bigram_u", "tab:green")):
        b.plot(steps, [r[key] for r in rows], marker="o", markersize=3, color=color, label=key)
    for ax, title in ((a, "loss (nats/token)"), (b, "KL(model || n-gram) on held-out text")):
        ax.set_title(title)
        step_axes(ax, linthresh=10)
    return save_figure(fig, path)


def cmd_moments_lm(args) -> int:
    cfg = MomentsLMConfig(**{k: getattr(args, k) for k in asdict(MomentsLMConfig()) if hasattr(args, k)})
    run_moments_lm(cfg)
    print(f"[moments lm] wrote {Path(cfg.out) / 'table.csv'} and moments_lm.png")
    return 0
