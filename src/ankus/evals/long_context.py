"""Long-context evaluations: passkey retrieval and perplexity by context length.

Passkey retrieval (Mohtashami & Jaggi 2023, used by the YaRN paper): a 5-digit key hidden at a
chosen depth in filler text, then a question. A trial passes when greedy decoding reproduces
the key; that is checked with one teacher-forced forward (greedy decoding emits the key exactly
when every key token is the argmax given the tokens before it), which also gives the key's
log-probability and, unlike step-by-step decoding, sees one RoPE scale for the whole sequence
under dynamic scaling.

Perplexity by length: the mean next-token loss over windows of ``n`` tokens of real text,
for several ``n``; a model whose context does not extend shows a loss that climbs past its
training length.

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

from ankus.models.rope import scale_rope

__all__ = ["passkey_trial", "passkey_ids", "passkey", "perplexity_by_length", "compare_scalings", "FILLER"]

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
def perplexity_by_length(model: nn.Module, tokens: Sequence[int], lengths: Sequence[int], windows: int = 4) -> list[dict]:
    """Mean next-token NLL (and its exp) over ``windows`` disjoint windows of each length."""
    device = next(model.parameters()).device
    rows = []
    for n in lengths:
        if len(tokens) < n * windows:
            raise ValueError(f"{len(tokens)} tokens are too few for {windows} windows of {n}; "
                             "give a longer text or fewer windows")
        nll, count = 0.0, 0
        for w in range(windows):
            ids = torch.tensor([list(tokens[w * n:(w + 1) * n])], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()  # (n-1, V)
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += n - 1
        rows.append({"length": n, "nll": nll / count, "ppl": math.exp(nll / count)})
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
