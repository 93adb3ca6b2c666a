"""Sentiment data for finding directions: templated toy sentences and model-written reviews.

Toy sentences (Tigges et al.'s templates, in our wording): a sentiment word from VADER's lexicon
(``vader_lexicon.txt`` as the vaderSentiment package ships it) in a fixed template, ending in a
prompt whose next token is a label (`` great`` / `` terrible``). Only words that are one token
with a leading space are used, so every sentence of a template has the same length and the
word, the comma and the last token sit at the same positions (interchange interventions need
that). Words, not sentences, are split into train and test, so test words are unseen.

Reviews: short movie reviews the model itself writes, labelled by VADER's compound score
(|compound| below a margin is dropped as neutral), cached as ``reviews.jsonl`` in the run dir.
"""

from __future__ import annotations

import dataclasses
import json
import random
from importlib import resources
from pathlib import Path

from ankus.data.io import DataError

__all__ = ["TEMPLATES", "LABEL_WORDS", "ToySet", "vader_words", "toy_sentences", "split_words",
           "model_reviews", "review_prompts", "EmptyDataError"]

TEMPLATES = [
    "I thought this movie was {w}, and I told my friends so. Conclusion: This movie is",
    "The film was {w}, as everyone in the theater agreed. Overall, the film was",
]
LABEL_WORDS = (" great", " terrible")  # positive, negative: the zero-shot classification's two tokens
_ADJ_ENDINGS = ("ful", "ous", "ive", "ble", "ic", "ent", "ant", "less", "ing", "ed", "id", "ish", "ile", "est")
_NOT_ADJ = ("ly", "ment", "tion", "ness", "ity")


class EmptyDataError(DataError):
    """A data set came out empty (no usable words, no labelled reviews, no activations)."""


@dataclasses.dataclass
class ToySet:
    texts: list[str]
    labels: list[int]  # 1 positive, 0 negative
    words: list[str]
    template: list[int]  # which template each sentence uses
    word_pos: list[int]  # token index of the sentiment word in each sentence


def vader_words(tokenizer, min_abs: float = 1.5, per_class: int = 60) -> tuple[list[str], list[str]]:
    """(positive, negative) adjective-like VADER words, strongest first, each one token after a space."""
    text = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    pos, neg = [], []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word, score = parts[0], float(parts[1])
        if not (word.isalpha() and word.islower() and len(word) >= 4 and abs(score) >= min_abs):
            continue
        if not word.endswith(_ADJ_ENDINGS) or word.endswith(_NOT_ADJ):
            continue
        if len(tokenizer.encode(" " + word, add_special_tokens=False)) != 1:
            continue
        (pos if score > 0 else neg).append((abs(score), word))
    pos = [w for _, w in sorted(pos, reverse=True)[:per_class]]
    neg = [w for _, w in sorted(neg, reverse=True)[:per_class]]
    if not pos or not neg:
        raise EmptyDataError(f"no usable VADER words with |valence| >= {min_abs} for this tokenizer "
                             f"({len(pos)} positive, {len(neg)} negative); lower min_abs")
    return pos, neg


def split_words(words: list[str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    words = sorted(words)
    random.Random(seed).shuffle(words)
    k = max(1, min(len(words) - 1, round(train_fraction * len(words))))
    return words[:k], words[k:]


def toy_sentences(tokenizer, pos: list[str], neg: list[str]) -> ToySet:
    """Every word in every template, labelled by the word's sign."""
    out = ToySet([], [], [], [], [])
    for t, template in enumerate(TEMPLATES):
        prefix = template.split("{w}")[0].rstrip()
        word_pos = len(tokenizer.encode(prefix, add_special_tokens=False))
        for label, words in ((1, pos), (0, neg)):
            for w in words:
                out.texts.append(template.format(w=w))
                out.labels.append(label)
                out.words.append(w)
                out.template.append(t)
                out.word_pos.append(word_pos)
    if not out.texts:
        raise EmptyDataError("no toy sentences: the word lists are empty")
    return out


def review_prompts(n: int) -> list[str]:
    """n chat prompts asking for short reviews, alternating positive / negative / unspecified."""
    kinds = ["a glowing, positive", "a harsh, negative", "an honest"]
    return [f"Write {kinds[i % 3]} one-sentence review of a movie you watched. Reply with the review only."
            for i in range(n)]


def label_reviews(texts: list[str], path: Path, margin: float) -> None:
    """Write ``path`` (JSONL: text, compound, label) with the texts VADER scores at |compound| >= margin."""
    from ankus.rewards.sentiment import compound_scores

    texts = [t.strip().strip('"').replace("\n", " ") for t in texts]
    rows = [{"text": t, "compound": s, "label": int(s > 0)} for t, s in zip(texts, compound_scores(texts))
            if abs(s) >= margin and t]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def model_reviews(model, tokenizer, n: int, max_new_tokens: int, path: Path, seed: int, margin: float = 0.3,
                  source: str = "") -> tuple[list[str], list[int]]:
    """Reviews labelled by VADER, cached at ``path`` (JSONL: text, compound, label): written by the
    model, or read from ``source`` (a JSONL file with a ``text`` field per line) when given."""
    if not path.exists():
        if source:
            from ankus.data.io import read_jsonl

            texts = [r["text"] for r in read_jsonl(source, required=("text",))]
        else:
            import torch

            from ankus.generation.engine import GenerationConfig, generate

            gen = torch.Generator().manual_seed(seed)
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, chat_template=True)
            texts = generate(model, tokenizer, review_prompts(n), cfg, generator=gen, batch_size=16).texts
        label_reviews(texts, path, margin)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise EmptyDataError(f"{path} holds no labelled reviews (every one scored |compound| < {margin}); "
                             "generate more (n_reviews) or lower the margin")
    return [r["text"] + " Conclusion: This movie is" for r in rows], [int(r["label"]) for r in rows]
