"""``ankus audit elicit``: which prefixes make a forward LM produce a target suffix?

Reverse-LM prefix search (Pfau et al. 2023) against GCG and random prefixes at an equal budget of
forward-model rows, on target suffixes from documents the models never trained on:

    ankus audit elicit                         # recipe audit_elicit (models from pretrain_reverse)
    ankus audit elicit search.budget=32 targets.n=5 run.name=elicit-small

Targets: ``targets.n`` windows of held-out documents of the forward corpus (the split the
pretrain trainer holds out: ``targets.val_fraction``, ``targets.split_seed`` = its
``data.val_fraction`` and ``trainer.seed``), each ``prefix_len`` true-prefix tokens followed by
``suffix_len`` tokens. ``targets.source``: ``text`` = the document's own next tokens; ``model`` =
the forward model's greedy continuation of the true prefix (then the true prefix elicits its
suffix by construction, the reference the searches are measured against).

Methods (``search.methods``): ``reverse_beam``, ``reverse_best_of_n``, ``gcg``, ``random``, each
with ``search.budget`` forward rows per target (:class:`~ankus.audits.prefix_search.Budget`), and
``true_prefix`` (no search). Each found prefix is then measured apart from the budget: elicited
(greedy decoding from it reproduces the suffix), the suffix's mean log-prob per token, and its
naturalness (the forward model's mean NLL of the prefix's own tokens). Outputs in the run
directory: ``results.jsonl`` (one row per target and method), ``summary.csv``, ``elicit.png``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ankus.audits.gcg import gcg_search
from ankus.audits.prefix_search import (Budget, check_context, last_logits, random_best_of_n, reverse_beam_search,
                                        reverse_best_of_n, score_prefixes)
from ankus.config import ConfigError, RunConfig
from ankus.data.io import DataError

__all__ = ["ElicitModels", "ElicitTargets", "ElicitSearch", "Config", "METHODS", "select_targets", "run_elicit",
           "summarize", "cli"]

METHODS = ("reverse_beam", "reverse_best_of_n", "gcg", "random")


@dataclass
class ElicitModels:
    forward: str = "runs/pretrain_forward/model"
    """The audited forward LM (a spec or a run's model/ directory)."""
    reverse: str = "runs/pretrain_reverse/model"
    """The reverse LM: trained on the token-reversed corpus with the forward model's tokenizer."""


@dataclass
class ElicitTargets:
    corpus: str = "runs/corpora/shakespeare_rev.forward"
    """The forward corpus directory (``ankus data corpus``); targets come from its held-out documents."""
    val_fraction: float = 0.1
    """The pretrain trainer's data.val_fraction (which documents are held out)."""
    split_seed: int = 0
    """The pretrain trainer's trainer.seed (the held-out split's seed)."""
    n: int = 20
    """Target suffixes."""
    suffix_len: int = 8
    """Tokens per target suffix."""
    source: str = "model"
    """model = the forward model's greedy continuation of the true prefix; text = the document's tokens."""
    seed: int = 0
    """Where in the held-out documents the windows start."""


@dataclass
class ElicitSearch:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Searches to run (reverse_beam, reverse_best_of_n, gcg, random); the true prefix is always measured."""
    prefix_len: int = 8
    """Tokens per prefix (every method and the true prefix)."""
    budget: int = 64
    """Forward-model rows each search may score per target (a GCG gradient row counts one)."""
    gcg_batch: int = 15
    """GCG candidates scored per step (each step also spends one gradient row)."""
    gcg_topk: int = 64
    """GCG: tokens per position by the one-hot gradient that candidates are drawn from."""
    batch_size: int = 64
    """Rows per forward-model call."""
    seed: int = 0
    """Sampling (best-of-N, random, GCG) seed."""


@dataclass
class Config:
    models: ElicitModels = field(default_factory=ElicitModels)
    targets: ElicitTargets = field(default_factory=ElicitTargets)
    search: ElicitSearch = field(default_factory=ElicitSearch)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="audit_elicit"))


def check_config(cfg: Config) -> None:
    s, t = cfg.search, cfg.targets
    bad = [m for m in s.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"search.methods: unknown {bad}; known: {', '.join(METHODS)}")
    if s.prefix_len < 1 or t.suffix_len < 1 or t.n < 1:
        raise ConfigError("search.prefix_len, targets.suffix_len and targets.n must be >= 1")
    if s.budget < 2:
        raise ConfigError(f"search.budget={s.budget}: each search needs at least 2 forward rows (GCG: one "
                          "scored start and one gradient row); raise it")
    if t.source not in ("model", "text"):
        raise ConfigError(f"targets.source={t.source!r}: expected 'model' or 'text'")


@torch.no_grad()
def greedy_continuation(model, prefixes: torch.Tensor, n_tokens: int, banned: list[int]) -> torch.Tensor:
    """``(N, n_tokens)``: the forward model's argmax continuation of ``prefixes`` (N, P) (no KV
    cache: the rows are short), never choosing a ``banned`` token."""
    ids = prefixes
    for _ in range(n_tokens):
        logits = last_logits(model, ids)  # (N, V)
        logits[:, banned] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prefixes.shape[1]:]


def select_targets(documents: list[np.ndarray], doc_ix: list[int], n: int, prefix_len: int, suffix_len: int,
                   eos: int, seed: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``n`` windows ``(doc, start, true prefix (P,), text suffix (S,))`` from documents ``doc_ix``,
    EOS-free, starts drawn by ``seed`` without repeats; a DataError when too few exist."""
    width = prefix_len + suffix_len
    spots = [(d, s) for d in doc_ix for s in range(0, len(documents[d]) - width, width)
             if eos not in documents[d][s:s + width]]
    if len(spots) < n:
        raise DataError(f"the held-out documents hold {len(spots)} windows of {width} tokens, fewer than "
                        f"targets.n={n}; lower targets.n or the lengths, or raise targets.val_fraction")
    pick = np.random.default_rng(seed).choice(len(spots), size=n, replace=False)
    out = []
    for i in sorted(pick.tolist()):
        d, s = spots[i]
        w = torch.as_tensor(documents[d][s:s + width], dtype=torch.long)
        out.append((d, s, w[:prefix_len], w[prefix_len:]))
    return out


def _search(method: str, fwd, rev, suffix, cfg: Config, allowed, banned, gen) -> tuple[torch.Tensor, Budget, dict]:
    s = cfg.search
    budget = Budget(s.budget)
    kw = dict(batch_size=s.batch_size)
    if method == "reverse_beam":
        r = reverse_beam_search(fwd, rev, suffix, s.prefix_len, budget, banned=banned, **kw)
    elif method == "reverse_best_of_n":
        r = reverse_best_of_n(fwd, rev, suffix, s.prefix_len, budget, banned=banned, generator=gen, **kw)
    elif method == "random":
        r = random_best_of_n(fwd, suffix, s.prefix_len, budget, allowed, generator=gen, **kw)
    else:
        init = allowed[torch.randint(len(allowed), (s.prefix_len,), generator=gen)]
        r = gcg_search(fwd, suffix, init, budget, batch=s.gcg_batch, topk=s.gcg_topk, allowed=allowed,
                       generator=gen, **kw)
    extra = {"gcg_steps": r["steps"]} if method == "gcg" else {}
    return r["prefix"], budget, extra


def _measure(fwd, tok, prefix: torch.Tensor, suffix: torch.Tensor) -> dict:
    sc = score_prefixes(fwd, prefix[None], suffix)
    return {"elicited": bool(sc["elicited"][0]), "suffix_logprob": float(sc["suffix_logprob"][0]),
            "suffix_logprob_per_token": float(sc["suffix_logprob"][0]) / len(suffix),
            "prefix_nll": float(sc["prefix_nll"][0]), "prefix_ids": prefix.tolist(),
            "prefix": tok.decode(prefix.tolist())}


def _load(cfg: Config):
    from ankus.data.corpus import load_corpus, tokenizer_fingerprint
    from ankus.models.loading import load_model
    from ankus.trainers.pretrain import check_tokenizer, split_documents

    corpus = load_corpus(cfg.targets.corpus)
    fwd, tok = load_model(cfg.models.forward)
    check_tokenizer(corpus, tok, cfg.models.forward)
    rev = rtok = None
    if {"reverse_beam", "reverse_best_of_n"} & set(cfg.search.methods):
        rev, rtok = load_model(cfg.models.reverse)
        if tokenizer_fingerprint(rtok) != tokenizer_fingerprint(tok):
            raise DataError(f"the reverse LM {cfg.models.reverse} uses another tokenizer than the forward model "
                            f"{cfg.models.forward}; train it on `ankus data reverse` of the forward corpus")
        rev.eval()
    fwd.eval()
    train_ix, val_ix = split_documents(len(corpus.documents), cfg.targets.val_fraction, cfg.targets.split_seed)
    return corpus, fwd, rev, tok, train_ix, val_ix


def run_elicit(cfg: Config) -> dict:
    """Run the audit; returns ``{"run_dir", "summary": [...]}``."""
    from ankus.runs import create_run_dir

    check_config(cfg)
    s, t = cfg.search, cfg.targets
    corpus, fwd, rev, tok, train_ix, val_ix = _load(cfg)
    for model, what in ((fwd, "forward model"), (rev, "reverse LM")):
        if model is not None:
            check_context(model, s.prefix_len, t.suffix_len, what)
    eos = int(corpus.manifest["tokenizer"]["eos_token_id"])
    banned = [eos]
    allowed = torch.as_tensor(np.unique(np.concatenate([corpus.documents[i] for i in train_ix])))
    allowed = allowed[allowed != eos]  # tokens the forward model trained on: random and GCG draw from these
    targets = select_targets(corpus.documents, val_ix, t.n, s.prefix_len, t.suffix_len, eos, t.seed)
    if t.source == "model":
        cont = greedy_continuation(fwd, torch.stack([p for _, _, p, _ in targets]), t.suffix_len, banned)
        targets = [(d, st, p, c) for (d, st, p, _), c in zip(targets, cont)]
    run_dir = create_run_dir(cfg.run, "audit_elicit", cfg)
    gen = torch.Generator().manual_seed(s.seed)
    rows = []
    with open(run_dir / "results.jsonl", "w", encoding="utf-8") as f:
        for k, (doc, start, true_prefix, suffix) in enumerate(targets):
            base = {"target": k, "document": corpus.manifest["document_names"][doc], "start": start,
                    "suffix_ids": suffix.tolist(), "suffix": tok.decode(suffix.tolist())}
            row = {**base, "method": "true_prefix", **_measure(fwd, tok, true_prefix, suffix),
                   "forward_rows": 0, "backward_rows": 0, "reverse_rows": 0, "seconds": 0.0}
            rows.append(row)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            for method in s.methods:
                t0 = time.perf_counter()
                prefix, budget, extra = _search(method, fwd, rev, suffix, cfg, allowed, banned, gen)
                row = {**base, "method": method, **_measure(fwd, tok, prefix, suffix), "forward_rows": budget.forward,
                       "backward_rows": budget.backward, "reverse_rows": budget.reverse,
                       "seconds": time.perf_counter() - t0, **extra}
                rows.append(row)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
    summary = summarize(rows)
    write_summary(run_dir, summary)
    plot_summary(run_dir, summary)
    return {"run_dir": str(run_dir), "summary": summary}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per method (first-seen order): elicitation rate, means of the measures and costs."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        mean = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
        out.append({"method": m, "targets": len(rs), "elicitation_rate": mean("elicited"),
                    "suffix_logprob_per_token": mean("suffix_logprob_per_token"), "prefix_nll": mean("prefix_nll"),
                    "forward_rows": mean("forward_rows"), "backward_rows": mean("backward_rows"),
                    "reverse_rows": mean("reverse_rows"), "seconds": mean("seconds")})
    return out


def write_summary(run_dir: Path, summary: list[dict]) -> Path:
    path = Path(run_dir) / "summary.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        for r in summary:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def plot_summary(run_dir: Path, summary: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in summary]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, (("elicitation_rate", "elicitation rate (greedy reproduces suffix)"),
                                       ("suffix_logprob_per_token", "suffix log-prob / token (higher = better)"),
                                       ("prefix_nll", "prefix NLL / token (lower = more natural)"))):
        ax.bar(names, [r[key] for r in summary], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    path = Path(run_dir) / "elicit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli(args) -> int:
    from ankus.config import build, read_yaml
    from ankus.recipes import resolve_recipe

    cfg = build(Config, read_yaml(resolve_recipe(args.recipe)), args.overrides)
    out = run_elicit(cfg)
    cols = ("method", "elicitation_rate", "suffix_logprob_per_token", "prefix_nll", "forward_rows", "seconds")
    print("  ".join(f"{c:>24s}" for c in cols))
    for r in out["summary"]:
        print("  ".join(f"{r[c]:>24.3f}" if isinstance(r[c], float) else f"{r[c]:>24s}" for c in cols))
    print(f"wrote {out['run_dir']}/results.jsonl, summary.csv, elicit.png")
    return 0
