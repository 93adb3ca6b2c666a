"""Long-context evaluations: passkey retrieval and perplexity by context length.

Passkey retrieval (Mohtashami & Jaggi 2023, used by the YaRN paper): a 5-digit key hidden at a
chosen depth in filler text, then a question. A trial passes when greedy decoding reproduces
the key; that is checked with one teacher-forced forward (greedy decoding emits the key exactly
when every key token is the argmax given the tokens before it), which also gives the key's
log-probability and, unlike step-by-step decoding, sees one RoPE scale for the whole sequence
under dynamic scaling.

Perplexity by length: the mean next-token loss over windows of ``n`` tokens of real text,
for several ``n``, every ``n`` scoring the same span of text; a model whose context does not
extend shows a loss that climbs past its training length.

Both compare RoPE scalings (``ankus.models.rope.METHODS``) on fresh copies of one model.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ankus.losses.lm import linear_cross_entropy
from ankus.models.heads import output_head_bypassed
from ankus.models.rope import METHODS, scale_rope

__all__ = ["passkey_trial", "passkey_ids", "passkey", "perplexity_by_length", "compare_scalings", "FILLER",
           "window_nll", "parse_lengths", "parse_scalings", "check_scaling_args", "write_table", "plot_by_length", "MAX_LENGTH"]

FILLER = ("Morning light falls on the old stone wall. A cart rolls down the lane and stops by the well. "
          "Someone whistles a tune and walks on. ")
INTRO = "Somewhere in the long text below there is a pass key. Find it and remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyIds:
    input_ids: list[int]
    """Prompt followed by the key's tokens."""
    key_start: int
    """Index of the first key token in input_ids."""


def passkey_ids(tokenizer, n_tokens: int, depth: float, key: str) -> PasskeyIds:
    """Token ids of one trial about ``n_tokens`` long with ``key`` at ``depth`` (0 = start of the
    filler, 1 = its end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    intro, question = enc(INTRO), enc(QUESTION)
    needle = enc(f"\nThe pass key is {key}. Remember it: {key} is the pass key.\n")
    answer = enc(f" {key}")
    filler_unit = enc(FILLER)
    room = n_tokens - len(intro) - len(question) - len(needle) - len(answer)
    if room < len(filler_unit):
        raise ValueError(f"n_tokens={n_tokens} is too short for a passkey trial (needs > {n_tokens - room + len(filler_unit)})")
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    cut = int(round(depth * room))
    prompt = intro + filler[:cut] + needle + filler[cut:] + question
    return PasskeyIds(prompt + answer, len(prompt))


@torch.no_grad()
def passkey_trial(model: nn.Module, trial: PasskeyIds) -> tuple[bool, float]:
    """(greedy decoding reproduces the key, log p(key | prompt))."""
    ids = torch.tensor([trial.input_ids], device=next(model.parameters()).device)
    k = trial.key_start
    logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - k + 1).logits[0, :-1].float()  # (K, V)
    targets = ids[0, k:]  # (K,)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item()
    return bool((logits.argmax(-1) == targets).all()), logp


def passkey(model: nn.Module, tokenizer, lengths: Sequence[int], trials: int = 20, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """Pass rate and mean key log-prob per length; depths spread evenly over (0, 1), keys random."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        passed, logps = 0, []
        for t in range(trials):
            depth = (t + 0.5) / trials
            ok, lp = passkey_trial(model, passkey_ids(tokenizer, n, depth, str(rng.randrange(10000, 100000))))
            passed += ok
            logps.append(lp)
        rows.append({"length": n, "trials": trials, "pass_rate": passed / trials,
                     "key_logp": sum(logps) / len(logps)})
        if progress:
            progress(f"passkey n={n}: {passed}/{trials}")
    return rows


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, chunk: int = 1024) -> float:
    """Summed next-token NLL of one window ``ids`` (1, n) (its first token is no target), in nats.

    ``chunk`` > 0: the forward returns the final hidden states (the head bypassed) and the head
    is applied ``chunk`` rows at a time (:func:`ankus.losses.lm.linear_cross_entropy`), so the
    (n, V) logits never exist whole (16,384 x 49,152 fp32 is 3.2 GB, and its log-softmax as much
    again). A model that transforms its logits after the head (soft-capping, a logit scale) or
    has a head bias falls back to the full logits, as does ``chunk`` = 0."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = ids[0, 1:]  # (n-1,)
    if chunk > 0 and head is not None and getattr(head, "bias", None) is None:
        with output_head_bypassed(model) as untouched:
            hidden = model(input_ids=ids, use_cache=False).logits  # (1, n, H)
        if untouched(hidden):
            h = hidden[0, :-1]  # (n-1, H)
            ones = torch.ones(len(targets), dtype=torch.float32, device=h.device)  # (n-1,)
            return linear_cross_entropy(h, head.weight.detach(), targets, ones, chunk).item()
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (n-1, V)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()


@torch.no_grad()
def perplexity_by_length(model: nn.Module, tokens: Sequence[int], lengths: Sequence[int], windows: int = 4,
                         chunk: int = 1024) -> list[dict]:
    """Mean next-token NLL (and its exp) over disjoint windows of each length, every length over the
    same text: the first ``windows x max(lengths)`` tokens, cut into ``span // n`` windows of ``n``.
    (Windows counted per length would score more text for the longer lengths, and text differs
    in difficulty far more than context helps.) A window's first token is no target. ``chunk``:
    rows of logits made at a time (:func:`window_nll`; 0 = the whole window's logits at once)."""
    device = next(model.parameters()).device
    span = max(lengths) * windows
    if len(tokens) < span:
        raise ValueError(f"{len(tokens)} tokens are too few for {windows} windows of {max(lengths)}; "
                         "give a longer text or fewer windows")
    rows = []
    for n in lengths:
        nll, count = 0.0, 0
        for w in range(span // n):
            ids = torch.tensor([list(tokens[w * n:(w + 1) * n])], device=device)  # (1, n)
            nll += window_nll(model, ids, chunk)
            count += n - 1
        rows.append({"length": n, "windows": span // n, "nll": nll / count, "ppl": math.exp(nll / count)})
    return rows


def compare_scalings(model: nn.Module, methods: Sequence[str], factor: float, original_max: int,
                     evaluate: Callable[[nn.Module], list[dict]]) -> list[dict]:
    """Run ``evaluate`` on a fresh copy of ``model`` per RoPE scaling method; rows get a
    ``method`` column."""
    rows = []
    for method in methods:
        scaled = scale_rope(copy.deepcopy(model), method, factor if method != "none" else 1.0, original_max)
        rows += [{"method": method, **row} for row in evaluate(scaled)]
        del scaled
    return rows


# ---------------------------------------------------------------------------------------------
# command-line arguments, the table and its plot (``ankus eval passkey|perplexity-by-length``)

MAX_LENGTH = 1 << 20
"""Longest context accepted (a sanity bound: 1M tokens)."""


def parse_lengths(text: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]``; ValueError on anything but positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("--lengths is empty; give comma-separated token counts, e.g. 1024,2048")
    out = []
    for p in parts:
        try:
            n = int(p)
        except ValueError:
            raise ValueError(f"--lengths: '{p}' is not an integer; give comma-separated token counts, "
                             "e.g. 1024,2048") from None
        if not 2 <= n <= MAX_LENGTH:
            raise ValueError(f"--lengths: {n} is out of range (2..{MAX_LENGTH} tokens)")
        out.append(n)
    return out


def parse_scalings(text: str) -> list[str]:
    """``"none,yarn"`` -> ``["none", "yarn"]``; ValueError naming an unknown method."""
    out = [p.strip() for p in text.split(",") if p.strip()]
    for m in out:
        if m not in METHODS:
            raise ValueError(f"--scalings: unknown RoPE scaling '{m}'; expected some of {', '.join(METHODS)}")
    if not out:
        raise ValueError(f"--scalings is empty; give some of {', '.join(METHODS)}")
    return list(dict.fromkeys(out))


def check_scaling_args(scalings: Sequence[str], lengths: Sequence[int], factor: float | None,
                       original_max: int) -> float:
    """The factor to use (default: longest length / original_max), after refusing settings that
    cannot mean anything: a factor <= 1 with a scaling other than none, and lengths past the
    extended context factor x original_max (past original_max when only 'none' runs, up to 4x:
    'none' beyond its context is the baseline that fails)."""
    if original_max < 1:
        raise ValueError(f"--original-max must be a positive token count, got {original_max}")
    scaled = [m for m in scalings if m != "none"]
    if factor is None:
        factor = max(lengths) / original_max
        if scaled and factor <= 1.0:
            raise ValueError(f"the lengths are all within the original context ({original_max} tokens): there is "
                             f"nothing to extend; give --factor > 1 to compare {', '.join(scaled)} anyway")
    elif scaled and not factor > 1.0:
        raise ValueError(f"--factor must be > 1 for {', '.join(scaled)} (got {factor}); a RoPE scaling "
                         "factor is the new context over the original")
    limit = int(round(max(factor, 1.0) * original_max)) if scaled else 4 * original_max
    if max(lengths) > limit:
        raise ValueError(f"--lengths: {max(lengths)} tokens is past the extended context of {limit} "
                         f"(factor {max(factor, 1.0):g} x original {original_max}); raise --factor or drop the length")
    return float(factor)


def write_table(rows: list[dict], path) -> None:
    """``rows`` (dicts sharing keys) as CSV."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot_by_length(rows: list[dict], y: str, path, title: str, ylabel: str | None = None,
                   series: str = "method") -> None:
    """One line per ``series`` value: ``y`` against ``length`` (log2 axis), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r["length"], r[y]) for r in rows if r[series] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
