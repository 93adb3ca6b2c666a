"""QDAIF's language-model side: mutation by LMX and AI feedback from label log-probabilities.

**Mutation (LMX, Meyerson et al. 2023).** A prompt holds a few parent texts, each after the
same header and followed by a separator, and ends with the header alone; the LM writes the next
text, which is cut at the separator. Parents come from the archive: ``lmx`` draws them uniformly
from all elites, ``lmx_near`` draws one elite and takes the others from cells near it (Chebyshev
distance in bin indices, nearest first).

**AI feedback.** Each judgement is a question whose answer is one of a few labels. The judge
reads the prompt and we look at the log-probabilities of its next token (the top ``k``): each
label's probability is the sum of the top-k tokens that match it after stripping spaces and
lower-casing (" yes", "Yes" and "yes" all count for "yes"), then renormalised over the labels.
Quality = P(first label) over (yes, no); a diversity measure = P(first label) over its labels
(e.g. positive / negative sentiment). A judge whose top-k holds none of the labels raises
:class:`JudgeError`.

Backends: :class:`LocalLM` (ankus' generation engine for mutations, one batched forward for all
judgements) and :class:`HTTPLM` (any OpenAI-compatible ``/v1/completions`` with ``logprobs: k``,
e.g. ``ankus serve``). Both take a list of prompts per call, so a generation of the search is one
batched generate and one batched judgement; ``batched=False`` runs them one prompt at a time
(the benchmark's baseline).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from ankus.chat import HTTPChat, LocalChat
from ankus.config import ConfigError
from ankus.generation.engine import GenerationConfig, cut_text, generate, left_pad

__all__ = ["JudgeError", "label_distribution", "lmx_prompt", "near_parents", "LocalLM", "HTTPLM", "judge"]


class JudgeError(ConfigError):
    """The judge's top-k next tokens hold none of a question's labels."""


def _norm(token: str) -> str:
    return token.strip().lower()


def label_distribution(top: dict[str, float], labels: Sequence[str]) -> np.ndarray:
    """Top-k next-token log-probs (token -> logprob) -> (L,) probabilities over ``labels``.

    p(label) = sum of exp(logprob) over the top-k tokens equal to the label after strip+lower;
    the result is renormalised to sum to 1. None of the labels in the top-k -> :class:`JudgeError`.
    """
    want = [_norm(lab) for lab in labels]
    mass = np.zeros(len(labels))  # (L,)
    for token, logprob in top.items():
        key = _norm(token)
        if key in want:
            mass[want.index(key)] += math.exp(logprob)
    total = mass.sum()
    if not total > 0:
        shown = ", ".join(repr(t) for t in list(top)[:8])
        raise JudgeError(f"the judge's top-{len(top)} next tokens hold none of the labels {list(labels)} "
                         f"(top tokens: {shown}); raise judge.top_logprobs, reword the question so the answer "
                         "starts with a label, or use a stronger judge")
    return mass / total


def lmx_prompt(parents: Sequence[str], header: str, separator: str) -> str:
    """LMX's few-shot prompt: each parent after the header and before the separator, then the header."""
    return "".join(f"{header}{p.strip()}{separator}" for p in parents) + header


def near_parents(elites: list[dict], k: int, radius: int, rng: np.random.Generator) -> list[str]:
    """LMX-near: one elite drawn uniformly, the other ``k - 1`` parents from elites whose bins lie
    within Chebyshev ``radius`` of it (drawn in random order); cells further away fill up when
    too few are near (nearest first)."""
    anchor = elites[int(rng.integers(len(elites)))]
    others = [e for e in elites if e is not anchor]
    dist = [max(abs(a - b) for a, b in zip(e["bin"], anchor["bin"])) for e in others]
    order = rng.permutation(len(others))
    ranked = sorted(order.tolist(), key=lambda i: (dist[i] > radius, dist[i] if dist[i] > radius else 0))
    return [anchor["text"]] + [others[i]["text"] for i in ranked[:k - 1]]


def _clean(text: str, separator: str) -> str:
    return cut_text(text, [separator.strip()] if separator.strip() else []).strip()


class LocalLM:
    """Mutations and judgements on a local model (a :class:`ankus.chat.LocalChat`'s model)."""

    def __init__(self, chat: LocalChat) -> None:
        self.chat, self.model, self.tokenizer = chat, chat.model, chat.tokenizer
        self.name = chat.name
        self._pieces: list[str] | None = None  # token id -> its decoded text, built on first use

    def piece(self, token_id: int) -> str:
        if self._pieces is None:
            self._pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return self._pieces[token_id] if token_id < len(self._pieces) else ""

    def reseed(self, seed: int) -> None:
        self.chat.generator.manual_seed(seed)

    def complete(self, prompts: Sequence[str], config: GenerationConfig, batched: bool = True) -> list[str]:
        """One completion per raw-text prompt (no chat template)."""
        config = replace(config, chat_template=False)
        if not batched:
            return [t for p in prompts for t in self.complete([p], config)]
        out = generate(self.model, self.tokenizer, list(prompts), config, generator=self.chat.generator,
                       batch_size=self.chat.batch_size)
        return list(out.texts)

    def encode(self, prompt: str, chat_template: bool, prefix: str = "") -> list[int]:
        """A judge prompt's ids: the question as a user turn (or raw text), then ``prefix``
        (the start of the answer, e.g. "Answer:") as raw text."""
        if not chat_template:
            return self.tokenizer(prompt + prefix)["input_ids"]
        ids = self.chat.encode([{"role": "user", "content": prompt}])
        return ids + (self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])

    @torch.no_grad()
    def top_logprobs(self, prompts: Sequence[str], k: int, chat_template: bool = False, batched: bool = True,
                     prefixes: Sequence[str] | None = None) -> list[dict[str, float]]:
        """The top-``k`` next-token log-probs after each prompt (+ its answer prefix): one
        left-padded forward for all."""
        prefixes = list(prefixes or [""] * len(prompts))
        if not batched:
            return [t for p, x in zip(prompts, prefixes) for t in self.top_logprobs([p], k, chat_template, True, [x])]
        from ankus.data.tokens import pad_id

        ids, mask = left_pad([self.encode(p, chat_template, x) for p, x in zip(prompts, prefixes)],
                             pad_id(self.tokenizer))  # (B, T)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                logits_to_keep=1).logits[:, -1].float()  # (B, V)
        finally:
            self.model.train(was_training)
        values, index = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), dim=-1)  # (B, k)
        out = []
        for b in range(len(prompts)):  # tokens decoding to the same text (rare) add up, as labels do
            top: dict[str, float] = {}
            for t, v in zip(index[b].tolist(), values[b].tolist()):
                p = self.piece(t)
                top[p] = float(np.logaddexp(top[p], v)) if p in top else v
            out.append(top)
        return out


class HTTPLM:
    """Mutations and judgements through an OpenAI-compatible ``/v1/completions`` endpoint."""

    MAX_PROMPTS = 64  # prompts per request (ankus serve's limit on rows)

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0
                 ) -> None:
        self.http = HTTPChat(base_url, model, api_key=api_key, timeout=timeout)
        self.name, self.seed = self.http.name, None

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def _choices(self, prompts: Sequence[str], body: dict, batched: bool) -> list[dict]:
        size = self.MAX_PROMPTS if batched else 1
        choices = []
        for s in range(0, len(prompts), size):
            req = {**body, "prompt": list(prompts[s:s + size])}
            if self.http.model:
                req["model"] = self.http.model
            answer = self.http._post("/completions", req)
            got = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
            if len(got) != len(req["prompt"]):
                raise JudgeError(f"{self.http.base_url}/completions answered {len(got)} choices for "
                                 f"{len(req['prompt'])} prompts")
            choices.extend(got)
        return choices

    def complete(self, prompts: Sequence[str], config: GenerationConfig, batched: bool = True) -> list[str]:
        body = {"max_tokens": config.max_new_tokens, "temperature": config.temperature if config.do_sample else 0.0,
                "top_p": config.top_p}
        if config.stop_strings:
            body["stop"] = list(config.stop_strings)
        if self.seed is not None:
            body["seed"] = self.seed
        return [str(c.get("text", "")) for c in self._choices(prompts, body, batched)]

    def top_logprobs(self, prompts: Sequence[str], k: int, chat_template: bool = False, batched: bool = True,
                     prefixes: Sequence[str] | None = None) -> list[dict[str, float]]:
        if chat_template:
            raise ConfigError("judge.chat_template: true needs a local judge; over HTTP the prompt goes out as raw "
                              "text (/v1/completions), so write the template into judge prompts or set it false")
        out = []
        prompts = [p + x for p, x in zip(prompts, prefixes or [""] * len(prompts))]
        for c in self._choices(prompts, {"max_tokens": 1, "temperature": 0.0, "logprobs": k}, batched):
            top = ((c.get("logprobs") or {}).get("top_logprobs") or [None])[0]
            if not isinstance(top, dict):
                raise JudgeError(f"{self.http.base_url}/completions returned no top_logprobs; the server must "
                                 "support the completions 'logprobs' parameter (ankus serve does)")
            out.append({str(t): float(v) for t, v in top.items()})
        return out


def judge(lm, texts: Sequence[str], questions: Sequence[dict], k: int, chat_template: bool, batched: bool = True
          ) -> np.ndarray:
    """(N, Q) P(first label) of each question (``{"prompt": "...{text}...", "labels": [...],
    "prefix": "Answer:"}``; the prefix starts the judge's answer, after the chat template's
    assistant header) for each text; all N*Q prompts go to the judge in one call (one batched
    forward)."""
    prompts = [q["prompt"].replace("{text}", t.strip()) for t in texts for q in questions]  # text-major
    prefixes = [q.get("prefix", "") for _ in texts for q in questions]
    tops = lm.top_logprobs(prompts, k, chat_template, batched, prefixes) if prompts else []
    probs = [label_distribution(top, questions[i % len(questions)]["labels"])[0] for i, top in enumerate(tops)]
    return np.asarray(probs, dtype=np.float64).reshape(len(texts), len(questions))  # (N, Q)


def mutate(lm, prompts: Sequence[str], config: GenerationConfig, separator: str, batched: bool = True
           ) -> list[str]:
    """Completions of LMX prompts, each cut at the separator and stripped."""
    return [_clean(t, separator) for t in lm.complete(prompts, config, batched)]
