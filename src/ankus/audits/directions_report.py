"""The ablation and steering tables of ``ankus audit directions``, their CSV files and plots."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import torch
from torch import Tensor

from ankus.audits.interventions import ablation_edit, accuracy, content_mask, encode, fraction_removed, last_logit_diffs
from ankus.data.tokens import position_ids_from_mask
from ankus.generation.engine import GenerationConfig
from ankus.generation.hooks import check_layers, n_layers, residual_stream
from ankus.generation.steering import Direction, model_name, steer

__all__ = ["ablation_rows", "steering_rows", "response_perplexity", "write_csv", "plot_tables", "spearman"]


def _eval_sets(tokenizer, cfg, data) -> dict[str, tuple[list, Tensor]]:
    test = data["test"]
    idx = list(range(len(test.texts)))
    if cfg.eval_sentences and cfg.eval_sentences < len(idx):
        idx = sorted(random.Random(cfg.seed).sample(idx, cfg.eval_sentences))
    return {"heldout_words": (encode(tokenizer, [test.texts[i] for i in idx], cfg.batch_size),
                              torch.tensor([test.labels[i] for i in idx])),
            "reviews": (data["review_batches"], torch.tensor(data["review_labels"]))}


@torch.no_grad()
def _clean_pass(model, batches, label_ids, layers: list[int], comma: int) -> tuple[Tensor, dict]:
    """Clean logit differences (N,) and {positions: {layer: (D,) mean residual}} over all real
    tokens and over comma tokens, in one pass."""
    sums = {"all": {la: 0.0 for la in layers}, "commas": {la: 0.0 for la in layers}}
    counts = {"all": 0, "commas": 0}
    lds = []
    for ids, mask in batches:
        with residual_stream(model, layers) as acts:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           logits_to_keep=1).logits[:, -1].float()
        lds.append(logits[:, label_ids[0]] - logits[:, label_ids[1]])
        sel = {"all": content_mask(mask), "commas": content_mask(mask) & (ids == comma)}
        for key, s in sel.items():
            counts[key] += int(s.sum())
            for la in layers:
                sums[key][la] = sums[key][la] + acts[la][0].float()[s].sum(0)
    means = {key: {la: v / max(counts[key], 1) for la, v in sums[key].items()} for key in sums}
    return torch.cat(lds), {**means, "counts": counts}


def _candidates(cfg, dirs: dict, hidden: int) -> list[tuple[str, int, Tensor, list[str]]]:
    out = []
    for layer in (cfg.ablate_from or cfg.layers[:1]):
        for method in cfg.methods:
            out.append((method, layer, dirs[(method, layer)], ["all"] + (["commas"] if method in cfg.comma_methods
                                                                         else [])))
        g = torch.Generator().manual_seed(cfg.seed + 7)
        r = torch.randn(hidden, generator=g)
        out.append(("random", layer, r / r.norm(), ["all", "commas"]))
    return out


def ablation_rows(model, tokenizer, cfg, data, dirs: dict) -> list[dict]:
    """Zero-shot accuracy and logit difference, clean and with each direction mean-ablated."""
    layers = check_layers(model, cfg.ablate_layers) if cfg.ablate_layers else list(range(n_layers(model)))
    comma = tokenizer.encode(",", add_special_tokens=False)[-1]
    label_ids = data["label_ids"]
    hidden = next(iter(dirs.values())).shape[0]
    rows = []
    for name, (batches, labels) in _eval_sets(tokenizer, cfg, data).items():
        clean, means = _clean_pass(model, batches, label_ids, layers, comma)
        sign = 2.0 * labels.float() - 1
        acc0, ld0 = accuracy(clean, labels), float((clean * sign).mean())
        rows.append({"dataset": name, "layer": "", "method": "none", "positions": "", "n": len(labels),
                     "n_commas": means["counts"]["commas"], "accuracy": acc0, "logit_diff": ld0,
                     "acc_removed": 0.0, "logit_diff_removed": 0.0})
        for method, layer, d, positions in _candidates(cfg, dirs, hidden):
            for pos in positions:
                proj = {la: float(means[pos][la] @ d) for la in layers}

                def select(ids, mask, pos=pos):
                    return content_mask(mask) & (ids == comma) if pos == "commas" else content_mask(mask)
                ld = last_logit_diffs(model, batches, label_ids, ablation_edit(d, proj, select))
                acc, ldm = accuracy(ld, labels), float((ld * sign).mean())
                rows.append({"dataset": name, "layer": layer, "method": method, "positions": pos, "n": len(labels),
                             "n_commas": means["counts"]["commas"], "accuracy": acc, "logit_diff": ldm,
                             "acc_removed": fraction_removed(acc0, acc),
                             "logit_diff_removed": (ld0 - ldm) / ld0 if ld0 > 0 else math.nan})
    return rows


@torch.no_grad()
def response_perplexity(model, out) -> float:
    """Perplexity of the generated tokens of a GenerationOutput under ``model`` (as it is now)."""
    seq, mask = out.sequences, out.attention_mask
    logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
    P = out.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1)
    m = out.response_mask.float()  # (B, N)
    return math.exp(float(-(logp * m).sum() / m.sum().clamp_min(1)))


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return torch.tensor(r)
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float(rx @ ry) / den if den else math.nan


def steering_rows(model, tokenizer, cfg, dirs: dict) -> list[dict]:
    """VADER compound of steered generations and their perplexity under the unsteered model, per alpha."""
    from ankus.rewards.sentiment import compound_scores

    layer = cfg.steer_layer if cfg.steer_layer >= 0 else cfg.layers[0]
    if (cfg.steer_method, layer) not in dirs:
        from ankus.config import ConfigError
        raise ConfigError(f"steer_layer {layer} is not among layers {cfg.layers}")
    d = Direction(dirs[(cfg.steer_method, layer)], layer, model_name(model), cfg.steer_method)
    prompts = [p for p in cfg.steer_prompts for _ in range(cfg.samples_per_prompt)]
    gcfg = GenerationConfig(max_new_tokens=cfg.steer_tokens, temperature=1.0, top_p=0.9, chat_template=False)
    rows = []
    for alpha in cfg.alphas:
        out = steer(model, tokenizer, prompts, d, alpha, gcfg, generator=torch.Generator().manual_seed(cfg.seed),
                    batch_size=cfg.batch_size)
        s = torch.tensor(compound_scores(out.texts))
        rows.append({"alpha": alpha, "layer": layer, "method": cfg.steer_method, "n": len(s),
                     "vader_mean": float(s.mean()), "vader_se": float(s.std() / math.sqrt(len(s))) if len(s) > 1 else 0.0,
                     "perplexity_unsteered": response_perplexity(model, out),
                     "example": (out.texts[0] or "").replace("\n", " ")[:120]})
    means = [r["vader_mean"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["alpha"])
    mono = all(means[order[i]] <= means[order[i + 1]] for i in range(len(order) - 1))
    rho = spearman([r["alpha"] for r in rows], means)
    for r in rows:
        r["monotonic"], r["spearman"] = mono, rho
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_tables(run_dir: Path, tables: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    probe = [r for r in tables["probe"] if "probe_acc_heldout_words" in r]
    labels = [f"{r['method']}\nL{r['layer']}" for r in probe]
    xs = range(len(probe))
    axes[0].bar([x - 0.2 for x in xs], [r["probe_acc_heldout_words"] for r in probe], 0.4, label="held-out words")
    axes[0].bar([x + 0.2 for x in xs], [r["probe_acc_reviews"] for r in probe], 0.4, label="reviews")
    axes[0].set_xticks(list(xs), labels, fontsize=7)
    axes[0].set(title="probe accuracy", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    abl = [r for r in tables["ablation"] if r["method"] != "none"]
    names = [f"{r['dataset'][:7]} {r['method']} {r['positions']}" for r in abl]
    axes[1].bar(range(len(abl)), [r["accuracy"] for r in abl])
    for r in tables["ablation"]:
        if r["method"] == "none":
            axes[1].axhline(r["accuracy"], ls="--", lw=0.8, color="k")
    axes[1].set_xticks(range(len(abl)), names, fontsize=6, rotation=90)
    axes[1].set(title="zero-shot accuracy, direction mean-ablated (dashed: clean)", ylim=(0, 1))
    st = sorted(tables["steering"], key=lambda r: r["alpha"])
    axes[2].errorbar([r["alpha"] for r in st], [r["vader_mean"] for r in st], [r["vader_se"] for r in st], marker="o")
    axes[2].set(title="steering", xlabel="alpha", ylabel="VADER compound")
    ax2 = axes[2].twinx()
    ax2.plot([r["alpha"] for r in st], [r["perplexity_unsteered"] for r in st], "r--", marker="x")
    ax2.set_ylabel("perplexity (unsteered model)", color="r")
    fig.tight_layout()
    fig.savefig(run_dir / "directions.png", dpi=110)
    plt.close(fig)
