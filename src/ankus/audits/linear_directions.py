"""``ankus audit directions``: find a sentiment direction five ways, probe, ablate, patch and steer.

Tigges et al. (2023), "Linear representations of sentiment in large language models", on a small
model. One run:

1. data: templated toy sentences from VADER's words (train / held-out words) and short reviews
   the model writes, labelled by VADER (:mod:`ankus.audits.sentiment_data`);
2. directions at each layer of ``layers`` from the residual stream at the sentiment word, by
   mean difference, k-means, PCA, logistic regression and DAS (:mod:`ankus.audits.directions`),
   saved as ``directions/<method>_L<layer>.safetensors`` (``ankus steer --direction``);
3. ``probe.csv``: each direction as a classifier (held-out toy words; reviews, mean over their
   tokens), and its interchange accuracy (patching its coordinate from an opposite-label sentence);
4. ``ablation.csv``: zero-shot accuracy and logit difference (`` great`` vs `` terrible``) with the
   direction mean-ablated at every layer in ``ablate_layers`` (all by default), at all tokens or
   at commas only, against a random direction; the fraction of above-chance accuracy removed;
5. ``steering.csv``: VADER score of generations against alpha, and their perplexity under the
   unsteered model. Every row also goes to ``results.jsonl``; plots are PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from ankus.audits import sentiment_data as sd
from ankus.audits.directions import (METHODS, das_direction, find_direction, interchange_accuracy, orient,
                                     probe_accuracy)
from ankus.audits.interventions import content_mask, encode
from ankus.config import ConfigError, RunConfig
from ankus.data.tokens import position_ids_from_mask
from ankus.generation.hooks import check_layers, residual_stream
from ankus.generation.steering import Direction, model_name, save_direction

__all__ = ["DirectionsConfig", "run_audit", "STEER_PROMPTS"]

STEER_PROMPTS = ["I watched the new movie last night. Honestly, it was", "My review of the film: the story",
                 "The restaurant we went to yesterday was", "Here is what I think about this book:"]


@dataclasses.dataclass
class DirectionsConfig:
    algorithm: str = "audit_directions"
    """Fixed: names this audit in a recipe."""
    model: str = "smollm2-135m-instruct"
    """Model spec (``ankus models``)."""
    layers: list[int] = dataclasses.field(default_factory=lambda: [6, 12])
    """Decoder layers whose output (residual stream) the directions are found in."""
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    """Any of mean_diff, kmeans, pca, logistic, das."""
    min_valence: float = 1.5
    """VADER words with |valence| at least this are used."""
    words_per_class: int = 40
    """Strongest positive and negative words kept."""
    train_fraction: float = 0.6
    """Share of the words the directions are fitted on; the rest are held out."""
    eval_sentences: int = 40
    """Held-out toy sentences in the ablation table (0 = all)."""
    n_reviews: int = 36
    """Reviews the model writes (before neutral ones are dropped); cached in the run dir."""
    review_tokens: int = 40
    """Most tokens per review."""
    reviews_file: str = ""
    """A JSONL file of reviews (a ``text`` field each) to use instead of model-written ones."""
    review_margin: float = 0.3
    """Reviews with VADER |compound| below this are dropped as neutral."""
    batch_size: int = 16
    """Rows per forward."""
    das_steps: int = 24
    """Optimisation steps of DAS (Adam on the direction only)."""
    das_lr: float = 0.01
    das_batch: int = 8
    """(base, source) pairs per DAS step."""
    patch_pairs: int = 32
    """Pairs for the interchange accuracy of each direction."""
    ablate_layers: list[int] = dataclasses.field(default_factory=list)
    """Layers a direction is mean-ablated at; [] = every layer."""
    ablate_from: list[int] = dataclasses.field(default_factory=list)
    """Which of ``layers``' directions the ablation table tests; [] = the first layer's."""
    comma_methods: list[str] = dataclasses.field(default_factory=lambda: ["mean_diff", "das"])
    """Methods also ablated at comma tokens only (plus the random control)."""
    steer_method: str = "mean_diff"
    steer_layer: int = -1
    """Layer of the steering direction; -1 = the first of ``layers``."""
    alphas: list[float] = dataclasses.field(default_factory=lambda: [-40.0, -20.0, -10.0, 0.0, 10.0, 20.0, 40.0])
    """Steering strengths: alpha times the unit direction is added to the residual stream (SmolLM2-135M's
    residual norm is ~110 per token at layer 6)."""
    steer_prompts: list[str] = dataclasses.field(default_factory=lambda: list(STEER_PROMPTS))
    samples_per_prompt: int = 2
    steer_tokens: int = 32
    seed: int = 0
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(save_model=False))


def check_config(cfg: DirectionsConfig, n_model_layers: int | None = None) -> None:
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ConfigError(f"unknown direction method(s) {bad} in methods; choose from {', '.join(METHODS)}")
    if cfg.steer_method not in cfg.methods:
        raise ConfigError(f"steer_method '{cfg.steer_method}' is not in methods {cfg.methods}")
    if not cfg.layers:
        raise ConfigError("layers is empty; give at least one decoder layer index, e.g. layers=[6]")
    if not cfg.alphas:
        raise ConfigError("alphas is empty; give the steering strengths to compare, e.g. alphas=[-4,0,4]")
    if not 0 < cfg.train_fraction < 1:
        raise ConfigError(f"train_fraction must be in (0, 1), got {cfg.train_fraction}")
    for name in ("ablate_from",):
        if any(x not in cfg.layers for x in getattr(cfg, name)):
            raise ConfigError(f"{name} {getattr(cfg, name)} must be among layers {cfg.layers}")


# ---------------------------------------------------------------------------------------------
# activations


@torch.no_grad()
def toy_activations(model, tokenizer, toy: sd.ToySet, layers: list[int]) -> tuple[list[Tensor], dict[int, list[Tensor]]]:
    """Per sentence: its ids (T,) and its residual stream (T, D) at each layer (unpadded; one
    forward per template, whose sentences all have the same length)."""
    ids = [torch.tensor(tokenizer.encode(t, add_special_tokens=False)) for t in toy.texts]
    resid: dict[int, list[Tensor | None]] = {layer: [None] * len(ids) for layer in layers}
    for g in sorted(set(toy.template)):
        rows = [i for i, t in enumerate(toy.template) if t == g]
        batch = torch.stack([ids[i] for i in rows])  # equal lengths: one-token words
        with residual_stream(model, layers) as acts:
            model(input_ids=batch, logits_to_keep=1)
        for layer in layers:
            for j, i in enumerate(rows):
                resid[layer][i] = acts[layer][0][j].float()
    return ids, resid


@torch.no_grad()
def mean_token_activations(model, batches: list[tuple[Tensor, Tensor]], layers: list[int]) -> dict[int, Tensor]:
    """{layer: (N, D)} the residual stream averaged over each text's real tokens but the first
    (the attention sink: :func:`~ankus.audits.interventions.content_mask`)."""
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for ids, mask in batches:
        with residual_stream(model, layers) as acts:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1)
        m = content_mask(mask).unsqueeze(-1).float()
        for layer in layers:
            out[layer].append((acts[layer][0].float() * m).sum(1) / m.sum(1))
    return {layer: torch.cat(v) for layer, v in out.items()}


# ---------------------------------------------------------------------------------------------
# directions and the probe table


def fit_directions(model, cfg: DirectionsConfig, data: dict, log) -> dict[tuple[str, int], Tensor]:
    """{(method, layer): unit direction} from the toy training sentences."""
    train = data["train"]
    y = torch.tensor(train.labels)
    out = {}
    for layer in cfg.layers:
        X = data["X_train"][layer]
        for method in cfg.methods:
            t0 = time.time()
            if method == "das":
                init = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(cfg.seed))
                d, losses = das_direction(model, data["train_ids"], data["train_resid"][layer], train.labels,
                                          train.template, layer, data["label_ids"], cfg.das_steps, cfg.das_lr,
                                          cfg.das_batch, cfg.seed, init)
                d = orient(d, X, y)
                log({"table": "das_loss", "layer": layer, "loss": losses})
            else:
                d = find_direction(method, X, y, cfg.seed)
            out[(method, layer)] = d
            log({"table": "fit", "layer": layer, "method": method, "seconds": round(time.time() - t0, 2)})
    return out


def probe_rows(model, cfg: DirectionsConfig, data: dict, dirs: dict) -> list[dict]:
    """Each direction as a classifier on held-out words and on reviews; its interchange accuracy."""
    test = data["test"]
    rows = [{"layer": layer, "method": "none (no patch)",
             "interchange_acc": interchange_accuracy(model, data["test_ids"], data["test_resid"][layer], test.labels,
                                                     test.template, layer, torch.zeros(data["X_train"][layer].shape[1]),
                                                     data["label_ids"], cfg.patch_pairs, cfg.seed + 1)}
            for layer in cfg.layers]  # the base rate: sources' label without any intervention
    y_train, y_test = torch.tensor(data["train"].labels), torch.tensor(data["test"].labels)
    y_rev = torch.tensor(data["review_labels"])
    for (method, layer), d in dirs.items():
        Xtr = data["X_train"][layer]
        rows.append({
            "layer": layer, "method": method,
            "probe_acc_train": probe_accuracy(d, Xtr, y_train, Xtr, y_train),
            "probe_acc_heldout_words": probe_accuracy(d, Xtr, y_train, data["X_test"][layer], y_test),
            "probe_acc_reviews": probe_accuracy(d, Xtr, y_train, data["X_reviews"][layer], y_rev),
            "interchange_acc": interchange_accuracy(model, data["test_ids"], data["test_resid"][layer],
                                                    data["test"].labels, data["test"].template, layer, d,
                                                    data["label_ids"], cfg.patch_pairs, cfg.seed + 1),
            "cos_mean_diff": float(d @ dirs[("mean_diff", layer)]) if ("mean_diff", layer) in dirs else float("nan"),
            "separation": float((Xtr[y_train.bool()] @ d).mean() - (Xtr[~y_train.bool()] @ d).mean()),
        })
    return rows


def save_directions(model, cfg: DirectionsConfig, dirs: dict, run_dir: Path) -> None:
    for (method, layer), d in dirs.items():
        save_direction(Direction(d, layer, model_name(model) or cfg.model, method),
                       run_dir / "directions" / f"{method}_L{layer}.safetensors")


def _load_data(model, tokenizer, cfg: DirectionsConfig, run_dir: Path, log) -> dict:
    pos, neg = sd.vader_words(tokenizer, cfg.min_valence, cfg.words_per_class)
    pos_tr, pos_te = sd.split_words(pos, cfg.train_fraction, cfg.seed)
    neg_tr, neg_te = sd.split_words(neg, cfg.train_fraction, cfg.seed)
    train, test = sd.toy_sentences(tokenizer, pos_tr, neg_tr), sd.toy_sentences(tokenizer, pos_te, neg_te)
    texts, labels = sd.model_reviews(model, tokenizer, cfg.n_reviews, cfg.review_tokens, run_dir / "reviews.jsonl",
                                     cfg.seed, cfg.review_margin, cfg.reviews_file)
    log({"table": "data", "positive_words": pos, "negative_words": neg, "train_sentences": len(train.texts),
         "test_sentences": len(test.texts), "reviews": len(texts), "positive_reviews": sum(labels)})
    label_ids = tuple(tokenizer.encode(w, add_special_tokens=False)[-1] for w in sd.LABEL_WORDS)
    train_ids, train_resid = toy_activations(model, tokenizer, train, cfg.layers)
    test_ids, test_resid = toy_activations(model, tokenizer, test, cfg.layers)
    review_batches = encode(tokenizer, texts, cfg.batch_size)

    def at_word(resid: dict, toy: sd.ToySet) -> dict[int, Tensor]:
        return {layer: torch.stack([r[p] for r, p in zip(resid[layer], toy.word_pos)]) for layer in resid}
    return dict(train=train, test=test, review_texts=texts, review_labels=labels, label_ids=label_ids,
                train_ids=train_ids, train_resid=train_resid, test_ids=test_ids, test_resid=test_resid,
                X_train=at_word(train_resid, train), X_test=at_word(test_resid, test),
                X_reviews=mean_token_activations(model, review_batches, cfg.layers), review_batches=review_batches)


def run_audit(cfg: DirectionsConfig) -> Path:
    """The whole audit; returns the run directory."""
    from ankus.audits.directions_report import ablation_rows, plot_tables, steering_rows, write_csv
    from ankus.models.loading import load_model
    from ankus.runs import create_run_dir

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model)
    model.eval()
    check_config(cfg)
    cfg.layers = check_layers(model, cfg.layers)
    run_dir = create_run_dir(cfg.run, "audit-directions", cfg, exist_ok=True)
    results = open(run_dir / "results.jsonl", "a")

    def log(row: dict) -> None:
        results.write(json.dumps(row) + "\n")
        results.flush()
    t0 = time.time()
    try:
        data = _load_data(model, tokenizer, cfg, run_dir, log)
        dirs = fit_directions(model, cfg, data, log)
        save_directions(model, cfg, dirs, run_dir)
        tables = {"probe": probe_rows(model, cfg, data, dirs)}
        tables["ablation"] = ablation_rows(model, tokenizer, cfg, data, dirs)
        tables["steering"] = steering_rows(model, tokenizer, cfg, dirs)
        for name, rows in tables.items():
            write_csv(run_dir / f"{name}.csv", rows)
            for row in rows:
                log({"table": name, **row})
        plot_tables(run_dir, tables)
        log({"table": "time", "seconds": round(time.time() - t0, 1)})
    finally:
        results.close()
    return run_dir


# ---------------------------------------------------------------------------------------------
# command line (cli.py adds the parsers and calls these)


def cmd_audit_directions(args) -> int:
    from ankus.config import build, read_yaml
    from ankus.recipes import resolve_recipe

    cfg = build(DirectionsConfig, read_yaml(resolve_recipe(args.recipe)), args.overrides)
    run_dir = run_audit(cfg)
    for name in ("probe", "ablation", "steering"):
        print(f"{name}: {run_dir / (name + '.csv')}")
    print(f"plot: {run_dir / 'directions.png'}; directions: {run_dir / 'directions'}")
    return 0


def cmd_steer(args) -> int:
    from ankus.generation.engine import GenerationConfig
    from ankus.generation.steering import load_direction, steer
    from ankus.models.loading import load_model

    model, tok = load_model(args.model)
    direction = load_direction(args.direction, model)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                              temperature=args.temperature, top_p=args.top_p,
                              chat_template=False if args.no_chat else None)
    out = steer(model, tok, list(args.prompts), direction, args.alpha, config,
                generator=torch.Generator().manual_seed(args.seed))
    for prompt, text in zip(args.prompts, out.texts):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(text.strip())
    return 0
