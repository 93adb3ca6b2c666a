"""k-extractability (Biderman et al. 2023, "Emergent and Predictable Memorization in LLMs").

A sequence of ``context + continuation`` tokens (32 + 32 by default) taken from the training data
is *memorized* when the model, given the first ``context`` tokens, greedily generates exactly the
next ``continuation`` tokens. The score of a window is the fraction of its continuation tokens the
greedy continuation reproduces position by position (memorized = 1.0); partial scores are kept per
window, with the length of the matching prefix.

    ankus audit memorization --model runs/mem/model --data runs/corpora/slice --out runs/audit

Input (:func:`load_documents`): an ``ankus data corpus`` directory (its tokenizer must be the
model's), a ``.jsonl`` file (rows with ``tokens``, a list of ids, or ``text``; an optional
``name``), a text file, or a directory of ``.txt`` / ``.jsonl`` files. Each document is cut into
windows of ``context + continuation`` tokens every ``stride`` tokens; a document shorter than a
window gives none. All windows are generated in batches through the engine
(:func:`ankus.generation.engine.generate`, greedy, EOS ignored so every continuation is full length).

Outputs in the run directory: ``sequences.jsonl`` (one row per window: document, offset, score,
prefix match, the texts and ids), ``summary.csv`` (per document and ``ALL``), ``summary.json``
(settings, counts, wall time) and ``histogram.png`` (scores). :func:`precision_recall` compares two
runs' memorized sets over the same windows (predicting a final model's memorization from a smaller
model or an earlier checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ankus.config import ConfigError
from ankus.data.io import DataError

__all__ = ["MemorizationConfig", "SequenceTooLongError", "NoWindowsError", "MemorizationDataError", "Window",
           "check_config", "check_fits", "load_documents", "make_windows", "extractability", "greedy_continuations",
           "audit", "summarize", "write_outputs", "precision_recall", "memorized_set", "read_sequences",
           "load_audited_model", "run"]


class SequenceTooLongError(ConfigError):
    """The audited windows (context + continuation tokens) do not fit the model's context."""


class NoWindowsError(DataError):
    """No document is long enough for one window of context + continuation tokens."""


class MemorizationDataError(DataError):
    """An input file the audit cannot read (missing, unknown kind, bad row, wrong tokenizer)."""


@dataclass
class MemorizationConfig:
    context: int = 32
    """Tokens of the true sequence the model is given."""
    continuation: int = 32
    """Tokens generated greedily and compared with the true next tokens."""
    stride: int = 64
    """A window starts every this many tokens of a document (64 = windows side by side)."""
    batch_size: int = 64
    """Windows generated together."""
    max_windows: int = 0
    """Audit only the first this many windows (in document order); 0 = all."""
    threshold: float = 1.0
    """A window counts as memorized when its score reaches this (1.0 = the paper's exact match)."""


def check_config(cfg: MemorizationConfig) -> None:
    for name in ("context", "continuation", "stride", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"memorization {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_windows < 0:
        raise ConfigError(f"memorization max_windows must be >= 0 (0 = all), got {cfg.max_windows}")
    if not 0 < cfg.threshold <= 1:
        raise ConfigError(f"memorization threshold must be in (0, 1], got {cfg.threshold}")


def model_context(model) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings``, ``n_positions``), if it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(model, cfg: MemorizationConfig) -> None:
    """Raise :class:`SequenceTooLongError` when a window is longer than the model's context."""
    length, limit = cfg.context + cfg.continuation, model_context(model)
    if limit is not None and length > limit:
        raise SequenceTooLongError(
            f"windows of {cfg.context} context + {cfg.continuation} continuation = {length} tokens exceed the "
            f"model's context of {limit} tokens; lower --context/--continuation to fit {limit}")


# ---------------------------------------------------------------------------------------------
# input


def _jsonl_documents(path: Path, tokenizer) -> list[tuple[str, np.ndarray]]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemorizationDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not ("tokens" in row or isinstance(row.get("text"), str)):
            raise MemorizationDataError(f"{path}:{n}: expected an object with 'tokens' (a list of token ids) "
                                        "or 'text' (a string)")
        if "tokens" in row:
            ids = row["tokens"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in ids):
                raise MemorizationDataError(f"{path}:{n}: 'tokens' must be a list of ids in [0, {len(tokenizer)})")
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        docs.append((str(row.get("name", f"{path.name}:{n}")), np.asarray(ids, dtype=np.int64)))
    return docs


def _text_document(path: Path, tokenizer, name: str) -> tuple[str, np.ndarray]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MemorizationDataError(f"{path}: not UTF-8 text") from None
    return name, np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _corpus_documents(path: Path, tokenizer) -> list[tuple[str, np.ndarray]]:
    from ankus.data.corpus import load_corpus, tokenizer_fingerprint, tokenizer_name

    corpus = load_corpus(path)
    tok = corpus.manifest["tokenizer"]
    if tok["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise MemorizationDataError(f"{path} was tokenized with {tok['name']}, not the model's tokenizer "
                                    f"{tokenizer_name(tokenizer)}; rebuild it with `ankus data corpus` for this model")
    names = corpus.manifest.get("document_names") or [f"doc-{i}" for i in range(len(corpus.documents))]
    return list(zip(names, corpus.documents))


def load_documents(source: str | Path, tokenizer) -> list[tuple[str, np.ndarray]]:
    """``[(name, token ids)]`` of a corpus directory, a ``.jsonl`` / text file, or a directory of them."""
    from ankus.data.corpus import MANIFEST

    path = Path(source)
    if not path.exists():
        raise MemorizationDataError(f"{path}: no such file or directory; give an `ankus data corpus` directory, "
                                    "a .jsonl or text file, or a directory of .txt/.jsonl files")
    if path.is_dir() and (path / MANIFEST).exists():
        return _corpus_documents(path, tokenizer)
    if path.is_file():
        return _jsonl_documents(path, tokenizer) if path.suffix == ".jsonl" else [_text_document(path, tokenizer, path.name)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise MemorizationDataError(f"{path} holds no .txt or .jsonl files and is not a corpus directory")
    docs = []
    for f in files:
        rel = f.relative_to(path).as_posix()
        docs += _jsonl_documents(f, tokenizer) if f.suffix == ".jsonl" else [_text_document(f, tokenizer, rel)]
    return docs


@dataclass
class Window:
    doc: int  # index of the document
    name: str  # the document's name
    start: int  # offset of the window's first token in the document
    tokens: np.ndarray  # (context + continuation,)


def make_windows(documents: Sequence[tuple[str, np.ndarray]], cfg: MemorizationConfig) -> list[Window]:
    """Windows of ``context + continuation`` tokens every ``stride`` tokens of each document, in
    document order; the first ``max_windows`` when set. Raises :class:`NoWindowsError` when none fits."""
    w = cfg.context + cfg.continuation
    out = []
    for d, (name, toks) in enumerate(documents):
        for s in range(0, len(toks) - w + 1, cfg.stride):
            out.append(Window(d, name, s, np.asarray(toks[s:s + w], dtype=np.int64)))
            if cfg.max_windows and len(out) == cfg.max_windows:
                return out
    if not out:
        longest = max((len(t) for _, t in documents), default=0)
        raise NoWindowsError(f"no window of {cfg.context} + {cfg.continuation} = {w} tokens fits: the longest of "
                             f"{len(documents)} documents has {longest} tokens; give longer documents or lower "
                             "--context/--continuation")
    return out


# ---------------------------------------------------------------------------------------------
# scores


def extractability(generated: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(score, prefix)`` per row of ``generated`` and ``target`` (B, N): the fraction of the N
    positions where they agree (1.0 = memorized) and the number of leading positions that agree."""
    same = np.asarray(generated) == np.asarray(target)  # (B, N)
    score = same.mean(axis=1)  # (B,)
    prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))  # (B,) first mismatch
    return score, prefix


def greedy_continuations(model, tokenizer, contexts: np.ndarray, continuation: int, batch_size: int) -> np.ndarray:
    """(B, continuation) greedy token ids after each context row (B, C), through the engine."""
    from ankus.generation.engine import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=continuation, do_sample=False, ignore_eos=True, chat_template=False)
    out = generate(model, tokenizer, [row.tolist() for row in contexts], config, batch_size=batch_size)
    return out.response_ids.cpu().numpy()


def audit(model, tokenizer, windows: Sequence[Window], cfg: MemorizationConfig) -> list[dict]:
    """One row per window: score, prefix match, memorized, and the context / target / generated tokens."""
    check_fits(model, cfg)
    tokens = np.stack([w.tokens for w in windows])  # (B, C + N)
    contexts, targets = tokens[:, :cfg.context], tokens[:, cfg.context:]
    generated = greedy_continuations(model, tokenizer, contexts, cfg.continuation, cfg.batch_size)
    scores, prefix = extractability(generated, targets)
    rows = []
    for i, w in enumerate(windows):
        rows.append({"index": i, "doc": w.doc, "name": w.name, "start": w.start, "score": float(scores[i]),
                     "prefix_match": int(prefix[i]), "memorized": bool(scores[i] >= cfg.threshold),
                     "context": tokenizer.decode(contexts[i].tolist()), "target": tokenizer.decode(targets[i].tolist()),
                     "generated": tokenizer.decode(generated[i].tolist()),
                     "context_ids": contexts[i].tolist(), "target_ids": targets[i].tolist(),
                     "generated_ids": generated[i].tolist()})
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per document (in order) and ``ALL``: windows, mean score, memorized count and share, mean prefix match."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in [*groups.items(), ("ALL", list(rows))]:
        scores = np.array([r["score"] for r in rs])
        mem = sum(r["memorized"] for r in rs)
        out.append({"name": name, "windows": len(rs), "mean_score": round(float(scores.mean()), 4),
                    "memorized": mem, "memorized_fraction": round(mem / len(rs), 4),
                    "score_ge_0.5": int((scores >= 0.5).sum()),
                    "mean_prefix_match": round(float(np.mean([r["prefix_match"] for r in rs])), 2)})
    return out


# ---------------------------------------------------------------------------------------------
# comparing memorized sets


def memorized_set(rows: Sequence[dict], threshold: float = 1.0) -> set[tuple[str, int]]:
    """``(document name, window start)`` of the windows scoring at least ``threshold``."""
    return {(r["name"], int(r["start"])) for r in rows if r["score"] >= threshold}


def precision_recall(predictor: Sequence[dict], target: Sequence[dict], threshold: float = 1.0) -> dict:
    """How well ``predictor``'s memorized windows predict ``target``'s, over the same windows.

    precision = |P ∩ T| / |P|, recall = |P ∩ T| / |T| (NaN when the denominator is 0), with P and T
    the windows scoring >= ``threshold`` under the predictor and the target."""
    keys_p = {(r["name"], int(r["start"])) for r in predictor}
    keys_t = {(r["name"], int(r["start"])) for r in target}
    if keys_p != keys_t:
        raise MemorizationDataError(f"the two audits cover different windows ({len(keys_p)} vs {len(keys_t)}, "
                                    f"{len(keys_p ^ keys_t)} not shared); audit the same data with the same "
                                    "--context/--continuation/--stride/--max-windows")
    p, t = memorized_set(predictor, threshold), memorized_set(target, threshold)
    tp = len(p & t)
    return {"windows": len(keys_t), "predicted": len(p), "actual": len(t), "tp": tp, "fp": len(p - t),
            "fn": len(t - p), "precision": tp / len(p) if p else math.nan, "recall": tp / len(t) if t else math.nan}


def read_sequences(path: str | Path) -> list[dict]:
    """The rows of an audit's ``sequences.jsonl`` (give the file or its run directory)."""
    path = Path(path)
    path = path / "sequences.jsonl" if path.is_dir() else path
    if not path.exists():
        raise MemorizationDataError(f"{path}: no audit here; run `ankus audit memorization ... --out DIR` first")
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): \x0c and \u2028 sit inside texts
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------
# outputs and the command


def plot_histogram(rows: Sequence[dict], path: Path, title: str, continuation: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [r["score"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(-0.5 / continuation, 1 + 0.5 / continuation, continuation + 2)  # one bin per score value
    ax.hist(scores, bins=edges, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel(f"k-extractability score (fraction of {continuation} tokens reproduced)")
    ax.set_ylabel("windows")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: Sequence[dict], out: str | Path, meta: dict, continuation: int) -> list[dict]:
    """``sequences.jsonl``, ``summary.csv``, ``summary.json`` and ``histogram.png`` under ``out``."""
    from ankus.data.io import write_jsonl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "sequences.jsonl", rows)
    table = summarize(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "summary.json").write_text(json.dumps({**meta, **{k: table[-1][k] for k in table[-1] if k != "name"}},
                                                 indent=1) + "\n")
    all_row = table[-1]
    plot_histogram(rows, out / "histogram.png", f"{meta.get('model', '')}: {all_row['memorized']} of "
                   f"{all_row['windows']} windows memorized, mean score {all_row['mean_score']}", continuation)
    return table


def load_audited_model(spec: str, checkpoint: str | None = None, device: str = "auto"):
    """``(model, tokenizer)`` of ``spec``, with a training checkpoint's weights (``<run>/checkpoints/step-N``) if given."""
    from ankus.distributed import resolve_device
    from ankus.models.loading import ModelLoadError, load_model

    model, tok = load_model(spec)
    if checkpoint:
        from ankus.checkpoint import load_checkpoint

        path = Path(checkpoint)
        if not (path / "model.safetensors").exists():
            raise ModelLoadError(f"{path} holds no model.safetensors; give a training run's checkpoints/step-N directory")
        try:
            load_checkpoint(path, modules={"model": model})
        except RuntimeError as e:
            raise ModelLoadError(f"{e}; --model must name the spec the run trained (its config.yaml model.spec)") from None
    return model.to(resolve_device(device)).eval(), tok


def run(model, tokenizer, data: str | Path, out: str | Path, cfg: MemorizationConfig, meta: dict | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """The whole audit: windows of ``data``, greedy continuations, scores, outputs; returns summary.json's content."""
    check_config(cfg)
    check_fits(model, cfg)
    windows = make_windows(load_documents(data, tokenizer), cfg)
    if progress:
        progress(f"memorization: {len(windows)} windows of {cfg.context}+{cfg.continuation} tokens from {data}")
    t0 = time.perf_counter()
    rows = audit(model, tokenizer, windows, cfg)
    wall = time.perf_counter() - t0
    meta = {**(meta or {}), "data": str(data), **asdict(cfg), "wall_s": round(wall, 2),
            "sequences_per_s": round(len(rows) / max(wall, 1e-9), 2)}
    write_outputs(rows, out, meta, cfg.continuation)
    return json.loads((Path(out) / "summary.json").read_text())
