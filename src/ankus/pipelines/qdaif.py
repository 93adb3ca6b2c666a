"""Quality-Diversity through AI Feedback (QDAIF, Bradley et al. 2023): ``algorithm: qdaif``.

MAP-Elites over texts: every generation, ``search.batch_size`` new texts are written by an LM
from parents drawn from the archive (LMX; :mod:`ankus.pipelines.qd_lm`), an LM judge scores each
for quality and places it on the diversity measures from the log-probabilities of answer labels,
and each text enters the archive if its cell is empty or it beats the cell's elite
(:mod:`ankus.pipelines.qd_archive`, pyribs). Three baselines run at the same number of LM calls
(``search.iterations x search.batch_size`` generations, each judged):

* ``random``: every text from one fixed zero-shot prompt (random search);
* ``fixed_few_shot``: every text from one fixed prompt holding the recipe's seed examples;
* ``quality_only``: LMX from a pool of the highest-quality texts so far (single objective).

Every method's texts are placed on the same grid, so QD score and coverage compare. Outputs in
the run directory: ``curves.csv`` / ``curves.png`` (QD score and coverage per iteration, all
methods), ``table.csv`` (the final numbers), and per method ``<method>/archive.jsonl``,
``archive_meta.json`` and ``heatmap.png``. Each iteration ends with a checkpoint
(``<method>/checkpoint``, written whole or not at all); ``--resume`` continues from it, and
because every iteration's sampling is seeded from (seed, method, iteration) a resumed run equals
an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ankus.config import ConfigError, RunConfig, reject_unused
from ankus.generation.engine import GenerationConfig
from ankus.pipelines.qd_archive import Grid, QDArchive, load_archive
from ankus.pipelines.qd_lm import HTTPLM, LocalLM, judge, lmx_prompt, mutate, near_parents

__all__ = ["Config", "LMSection", "QuestionConfig", "MeasureConfig", "JudgeConfig", "MutationConfig",
           "SearchConfig", "METHODS", "check_config", "grid_of", "run_method", "train", "cli"]

METHODS = ("qdaif", "random", "fixed_few_shot", "quality_only")


@dataclass
class LMSection:
    spec: str = "smollm2-135m-instruct"
    """The mutating LM: a model spec, or an OpenAI-compatible server URL (http://…/v1)."""
    served_model: str | None = None
    """HTTP only: the "model" field of each request; null = the server's default."""
    api_key_env: str = "OPENAI_API_KEY"
    """HTTP only: environment variable holding the bearer token (unset = none sent)."""
    batch_size: int = 16
    """Local only: rows per generation batch (and per judging forward)."""
    dtype: str = "float32"
    """Local only: weights' dtype."""


@dataclass
class QuestionConfig:
    prompt: str = ("Here is a short text:\n\n{text}\n\nIs this text an opinion about eating vegetables and "
                   "plant-based foods? Answer yes or no.")
    """The judge's question; {text} is replaced by the candidate."""
    labels: list[str] = field(default_factory=lambda: ["yes", "no"])
    """Answer labels; the score is P(first label) renormalised over all labels."""
    answer_prefix: str = "Answer:"
    """Raw text that starts the judge's answer (after the assistant header); labels are its next token."""


@dataclass
class MeasureConfig:
    name: str = "sentiment"
    prompt: str = "Here is a short text:\n\n{text}\n\nIs its sentiment positive or negative? Answer positive or negative."
    labels: list[str] = field(default_factory=lambda: ["positive", "negative"])
    answer_prefix: str = "Sentiment:"
    ticks: list[float] = field(default_factory=lambda: [0.005, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                        0.8, 0.9, 0.95, 0.98, 0.995])
    """Inner bin edges in (0, 1), strictly increasing (len + 1 bins); finer near the ends."""


@dataclass
class JudgeConfig:
    spec: str = ""
    """The judge: "" = the mutating LM itself; else a model spec or an http(s) URL."""
    served_model: str | None = None
    """HTTP judge only: the "model" field of each request."""
    quality: QuestionConfig = field(default_factory=QuestionConfig)
    measures: list[MeasureConfig] = field(default_factory=lambda: [MeasureConfig()])
    """One or two diversity measures (the grid's axes)."""
    top_logprobs: int = 20
    """k: labels are looked up in the judge's top-k next tokens (<= 20 over HTTP)."""
    chat_template: bool = True
    """Local judge: wrap each question in the tokenizer's chat template (a user turn)."""


@dataclass
class MutationConfig:
    header: str = "Here is a random opinion piece about eating vegetables and plant-based foods:\n"
    """Written before each parent and at the end of the prompt."""
    separator: str = "\n###\n"
    """Ends each parent; the completion is cut at its first occurrence."""
    parents: int = 3
    """Parents per LMX prompt (and seed examples in the fixed few-shot prompt)."""
    near_radius: int = 2
    """lmx_near: parents from cells within this Chebyshev distance (bins) of the first."""
    seeds: list[str] = field(default_factory=lambda: ["I love eating vegetables every day."])
    """Hand-written example texts: the fixed few-shot prompt, and parents while the archive is small."""
    random_prompt: str = ""
    """Random search's zero-shot prompt; "" = the header alone."""
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.95


@dataclass
class SearchConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Which of qdaif, random, fixed_few_shot, quality_only to run (same LM calls each)."""
    mutation: Literal["lmx", "lmx_near"] = "lmx"
    """QDAIF's parents: uniformly from the archive, or from neighbouring cells."""
    iterations: int = 10
    batch_size: int = 8
    """New texts per iteration (one batched generate, one batched judgement)."""
    init_iterations: int = 1
    """qdaif / quality_only: the first iterations draw parents from the seed examples."""
    pool_size: int = 8
    """quality_only: how many of the best texts so far serve as parents."""
    seed: int = 0
    batched: bool = True
    """false = one LM call per prompt (slower; the benchmark's baseline)."""


@dataclass
class Config:
    lm: LMSection = field(default_factory=LMSection)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    mutation: MutationConfig = field(default_factory=MutationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs", save_model=False))


def _is_http(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def check_config(cfg: Config) -> None:
    """Refuse settings that cannot run or would be ignored (ConfigError names the field)."""
    bad = [m for m in cfg.search.methods if m not in METHODS]
    if bad or not cfg.search.methods or len(set(cfg.search.methods)) != len(cfg.search.methods):
        raise ConfigError(f"search.methods: {cfg.search.methods} must be distinct names among {list(METHODS)}")
    if not 1 <= len(cfg.judge.measures) <= 2:
        raise ConfigError(f"judge.measures: give one or two measures (the grid's axes), got {len(cfg.judge.measures)}")
    for i, q in enumerate([cfg.judge.quality, *cfg.judge.measures]):
        where = "judge.quality" if i == 0 else f"judge.measures[{i - 1}]"
        if len(q.labels) < 2 or "{text}" not in q.prompt:
            raise ConfigError(f"{where}: needs at least two labels and a prompt containing {{text}}")
    try:
        grid_of(cfg)
    except ValueError as e:
        raise ConfigError(f"judge.measures: {e}") from None
    if any(not 0 < t < 1 for m in cfg.judge.measures for t in m.ticks):
        raise ConfigError("judge.measures[].ticks: every tick must lie strictly between 0 and 1")
    for name, v in (("search.iterations", cfg.search.iterations), ("search.batch_size", cfg.search.batch_size),
                    ("mutation.parents", cfg.mutation.parents), ("search.pool_size", cfg.search.pool_size),
                    ("judge.top_logprobs", cfg.judge.top_logprobs)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    if not cfg.mutation.seeds or not cfg.mutation.separator.strip():
        raise ConfigError("mutation.seeds needs at least one example and mutation.separator a visible character")
    if not _is_http(cfg.lm.spec):
        reject_unused(cfg.lm, ["served_model", "api_key_env"], "qdaif", "unless lm.spec is an http(s) URL", "lm")
    if not _is_http(cfg.judge.spec):
        reject_unused(cfg.judge, ["served_model"], "qdaif", "unless judge.spec is an http(s) URL", "judge")
    if cfg.judge.chat_template and _is_http(cfg.judge.spec or cfg.lm.spec):
        raise ConfigError("judge.chat_template: true needs a local judge; an HTTP judge gets raw text "
                          "(/v1/completions): set judge.chat_template=false")
    if cfg.search.mutation != "lmx_near" or "qdaif" not in cfg.search.methods:
        reject_unused(cfg.mutation, ["near_radius"], "qdaif", "unless search.mutation is lmx_near", "mutation")
    if "quality_only" not in cfg.search.methods:
        reject_unused(cfg.search, ["pool_size"], "qdaif", "unless quality_only is among search.methods", "search")
    if "random" not in cfg.search.methods:
        reject_unused(cfg.mutation, ["random_prompt"], "qdaif", "unless random is among search.methods", "mutation")


def grid_of(cfg: Config) -> Grid:
    return Grid.make([m.name for m in cfg.judge.measures], [m.ticks for m in cfg.judge.measures])


def _backend(spec: str, served_model: str | None, cfg: Config, loaded: dict):
    if _is_http(spec):
        return HTTPLM(spec, served_model, os.environ.get(cfg.lm.api_key_env))
    if spec not in loaded:
        from ankus.chat import LocalChat
        from ankus.models.loading import load_model

        model, tok = load_model(spec, dtype=cfg.lm.dtype)
        loaded[spec] = LocalLM(LocalChat(model=model, tokenizer=tok, batch_size=cfg.lm.batch_size))
    return loaded[spec]


def backends(cfg: Config) -> tuple[Any, Any]:
    """(mutating LM, judge); the judge is the same object when ``judge.spec`` is empty or equal."""
    loaded: dict = {}
    lm = _backend(cfg.lm.spec, cfg.lm.served_model, cfg, loaded)
    if not cfg.judge.spec or cfg.judge.spec == cfg.lm.spec:
        return lm, lm
    return lm, _backend(cfg.judge.spec, cfg.judge.served_model, cfg, loaded)


def _sample(texts: list[str], k: int, rng: np.random.Generator) -> list[str]:
    idx = rng.choice(len(texts), size=k, replace=len(texts) < k)
    return [texts[int(i)] for i in idx]


def prompts_for(method: str, cfg: Config, iteration: int, archive: QDArchive, pool: list[dict],
                rng: np.random.Generator) -> list[str]:
    """The ``batch_size`` prompts of one iteration of ``method`` (0-based ``iteration``)."""
    mut, k, n = cfg.mutation, cfg.mutation.parents, cfg.search.batch_size
    if method == "random":
        return [mut.random_prompt or mut.header] * n
    if method == "fixed_few_shot":
        return [lmx_prompt(mut.seeds[:k], mut.header, mut.separator)] * n
    elites = archive.elites() if method == "qdaif" else pool
    if iteration < cfg.search.init_iterations or len(elites) < k:
        return [lmx_prompt(_sample(mut.seeds, k, rng), mut.header, mut.separator) for _ in range(n)]
    if method == "qdaif" and cfg.search.mutation == "lmx_near":
        return [lmx_prompt(near_parents(elites, k, mut.near_radius, rng), mut.header, mut.separator) for _ in range(n)]
    texts = [e["text"] for e in elites]
    return [lmx_prompt(_sample(texts, k, rng), mut.header, mut.separator) for _ in range(n)]


def _questions(cfg: Config) -> list[dict]:
    return [{"prompt": q.prompt, "labels": list(q.labels), "prefix": q.answer_prefix}
            for q in [cfg.judge.quality, *cfg.judge.measures]]


def _generation(cfg: Config) -> GenerationConfig:
    m = cfg.mutation
    return GenerationConfig(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p,
                            stop_strings=[m.separator.strip()], chat_template=False)


def step(method: str, cfg: Config, lm, judge_lm, iteration: int, archive: QDArchive, pool: list[dict]) -> dict:
    """One iteration: prompts, one batched generate, one batched judgement, archive insertion.
    Returns the iteration's row; ``pool`` (quality_only's parents) is updated in place."""
    t0 = time.perf_counter()
    m_idx = METHODS.index(method)
    rng = np.random.default_rng([cfg.search.seed, m_idx, iteration])
    lm.reseed(int(rng.integers(2 ** 62)))
    prompts = prompts_for(method, cfg, iteration, archive, pool, rng)
    texts = [t for t in mutate(lm, prompts, _generation(cfg), cfg.mutation.separator, cfg.search.batched) if t]
    scores = judge(judge_lm, texts, _questions(cfg), cfg.judge.top_logprobs, cfg.judge.chat_template,
                   cfg.search.batched)  # (N, 1 + D)
    status = archive.add(texts, scores[:, 0], scores[:, 1:], iteration + 1)
    if method == "quality_only":
        merged = pool + [{"text": t, "quality": float(q)} for t, q in zip(texts, scores[:, 0])]
        pool[:] = sorted(merged, key=lambda r: -r["quality"])[:cfg.search.pool_size]
    return {"method": method, "iteration": iteration + 1, "lm_calls": (iteration + 1) * cfg.search.batch_size,
            "qd_score": round(archive.qd_score(), 6), "coverage": round(archive.coverage(), 6), "elites": len(archive),
            "added": int((status > 0).sum()), "empty": len(prompts) - len(texts),
            "mean_quality": round(float(scores[:, 0].mean()), 6) if len(texts) else None,
            "best_quality": round(max((e["quality"] for e in archive.elites()), default=0.0), 6),
            "seconds": round(time.perf_counter() - t0, 2)}


def _checkpoint(method_dir: Path, archive: QDArchive, history: list[dict], pool: list[dict]) -> None:
    from ankus.atomic import atomic_write_dir

    def write(tmp: Path) -> None:
        archive.save(tmp)
        (tmp / "state.json").write_text(json.dumps({"iteration": len(history), "history": history, "pool": pool}))

    atomic_write_dir(method_dir / "checkpoint", write)


def run_method(method: str, cfg: Config, lm, judge_lm, method_dir: Path, resume: bool = False, log=print,
               stop_after: int | None = None) -> tuple[QDArchive, list[dict]]:
    """Run (or continue) one method's search; a checkpoint after every iteration.
    ``stop_after`` ends the run after that many iterations in total (tests simulate a crash)."""
    grid, ckpt = grid_of(cfg), method_dir / "checkpoint"
    archive, history, pool = QDArchive(grid), [], []
    if resume and (ckpt / "state.json").is_file():
        archive = load_archive(ckpt, grid)
        state = json.loads((ckpt / "state.json").read_text())
        history, pool = state["history"], state["pool"]
        log(f"{method}: resuming after iteration {state['iteration']}")
    last = cfg.search.iterations if stop_after is None else min(stop_after, cfg.search.iterations)
    for it in range(len(history), last):
        row = step(method, cfg, lm, judge_lm, it, archive, pool)
        history.append(row)
        _checkpoint(method_dir, archive, history, pool)
        log(f"{method} {row['iteration']}/{cfg.search.iterations}: qd_score {row['qd_score']:.3f} coverage "
            f"{row['coverage']:.3f} elites {row['elites']} added {row['added']} ({row['seconds']:.1f} s)")
    return archive, history


def train(cfg: Config, reward_fn=None, resume: bool = False, log=print) -> dict[str, Any]:
    """Run every method of ``search.methods`` into one run directory; returns the final table."""
    from ankus.pipelines.qd_plots import plot_curves, plot_heatmap, write_csv
    from ankus.runs import create_run_dir

    if reward_fn is not None:
        raise ConfigError("qdaif scores texts with its AI-feedback judge (judge section); it takes no reward_fn")
    check_config(cfg)
    if cfg.run.save_model:
        raise ConfigError("run.save_model is not used by the qdaif pipeline (it trains no model); set it false")
    quiet = (lambda s: None) if not cfg.run.progress else log  # per-iteration lines only with run.progress
    run_dir = create_run_dir(cfg.run, "qdaif", cfg, exist_ok=resume)
    lm, judge_lm = backends(cfg)
    rows, table = [], []
    for method in cfg.search.methods:
        t0 = time.perf_counter()
        archive, history = run_method(method, cfg, lm, judge_lm, run_dir / method, resume, quiet)
        archive.save(run_dir / method)
        plot_heatmap(archive, run_dir / method / "heatmap.png", f"{method}: quality per cell")
        rows += history
        last = history[-1] if history else {}
        table.append({"method": method, "lm_calls": last.get("lm_calls", 0), "qd_score": last.get("qd_score", 0.0),
                      "coverage": last.get("coverage", 0.0), "elites": last.get("elites", 0),
                      "best_quality": last.get("best_quality", 0.0), "seconds": round(time.perf_counter() - t0, 1)})
    write_csv(rows, run_dir / "curves.csv")
    write_csv(table, run_dir / "table.csv")
    plot_curves(rows, run_dir / "curves.png")
    (run_dir / "summary.json").write_text(json.dumps({"table": table, "run_dir": str(run_dir)}, indent=1) + "\n")
    for r in table:
        log(f"{r['method']:>15}: qd_score {r['qd_score']:.3f}  coverage {r['coverage']:.3f}  elites {r['elites']}  "
            f"best {r['best_quality']:.3f}  ({r['lm_calls']} LM calls, {r['seconds']} s)")
    return {"run_dir": str(run_dir), "table": table}


def cli(args) -> int:
    """``ankus qd run RECIPE [overrides] [--resume]``."""
    from ankus.recipes import run_recipe

    run_recipe(args.recipe, overrides=list(args.overrides), resume=args.resume)
    return 0
