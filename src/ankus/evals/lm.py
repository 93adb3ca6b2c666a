"""The one model interface every evaluation task uses: ``EvalLM``.

    lm = EvalLM.load("smollm2-135m-instruct", chat_template=True)
    lm.loglikelihood(["Is it raining? The answer is"], [" yes"])      # [summed log-prob]
    lm.generate(["Say hi."], max_new_tokens=8, guidance_scale=2.0)   # [text]

A prompt or context is a string or a conversation (a list of ``{"role", "content"}`` messages).
With ``chat_template=True`` it is formatted as the user's turn (a conversation as it is) followed
by the assistant header, and a continuation is the start of the assistant's reply (its leading
whitespace dropped: a reply does not start with a space). Without, a conversation is rendered as
plain ``Role: content`` lines and a trailing ``Assistant:``.

Scoring (``score``): each (context, continuation) becomes the row ``context + continuation[:-1]``;
requests whose rows are equal (e.g. the same question scored with " yes" and with " no") share
one forward. Rows are left-padded (position ids from the mask, as everywhere in ankus) so every
continuation ends at the right edge and only the last few positions' logits are computed
(``logits_to_keep``). Generation goes through :func:`ankus.generation.engine.generate`, with
classifier-free guidance when ``guidance_scale != 1``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from transformers import DynamicCache

from ankus.data.tokens import pad_id, position_ids_from_mask
from ankus.generation.engine import GenerationConfig, generate, left_pad
from ankus.generation.hooks import add_direction
from ankus.generation.steering import Direction, check_direction

__all__ = ["EvalLM", "Prompt", "render_plain", "row_logprobs", "common_prefix"]

Prompt = Union[str, Sequence[dict]]


def render_plain(messages: Sequence[dict]) -> str:
    """A conversation as plain text for a model without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all rows share, leaving every row at least one token."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _forward_kept(model, rows: Sequence[Sequence[int]], pad: int, keep: int, shared: int) -> torch.Tensor:
    """Logits (B, keep, V) of the last ``keep`` positions of each row. The first ``shared``
    tokens (the same in every row) run once; their cache is repeated for the rows, which then run
    only their own left-padded suffixes (mask: prefix ones, padding zeros, suffix ones)."""
    device = next(model.parameters()).device
    if shared < 16 or len(rows) == 1:
        ids, mask = left_pad(rows, pad)  # (B, T)
        return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                     position_ids=position_ids_from_mask(mask).to(device), logits_to_keep=keep).logits
    prefix = torch.as_tensor([list(rows[0][:shared])], device=device)  # (1, S)
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(torch.zeros(len(rows), dtype=torch.long, device=device))
    ids, mask = left_pad([r[shared:] for r in rows], pad)  # (B, T')
    full_mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), mask], 1)  # (B, S + T')
    positions = shared + position_ids_from_mask(mask)  # (B, T')
    return model(input_ids=ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
                 cache=cache, use_cache=True, logits_to_keep=keep).logits


def row_logprobs(model, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[Sequence[int]]], pad: int
                 ) -> list[list[tuple[list[float], list[bool]]]]:
    """For each row of ids and each of its targets (token lists that follow the row's last
    ``len(target) - 1`` tokens, the target's last token after the row's end): the log-prob of each
    target token and whether it is the argmax there. One batched forward (a prefix every row
    shares runs once)."""
    keep = max(len(t) for ts in targets for t in ts)
    with torch.inference_mode():
        logits = _forward_kept(model, rows, pad, keep, common_prefix(rows))
    logps = torch.log_softmax(logits[:, -keep:].float(), dim=-1)  # (B, keep, V)
    argmax = logps.argmax(-1)  # (B, keep)
    result = []
    for i, ts in enumerate(targets):
        per_row = []
        for tgt in ts:
            pos = torch.arange(keep - len(tgt), keep)  # (L,) positions predicting the targets
            t = torch.as_tensor(list(tgt), dtype=torch.long, device=logps.device)
            per_row.append((logps[i, pos, t].tolist(), (argmax[i, pos] == t).tolist()))
        result.append(per_row)
    return result


@dataclass
class EvalLM:
    """A causal LM with its tokenizer, seen by tasks as scores and generations."""

    model: object
    tokenizer: object
    chat_template: bool = False
    batch_size: int = 16
    seed: int = 0
    direction: Direction | None = None
    """Steering: ``alpha`` times this direction's unit vector is added after its layer in every
    forward, scores and generations alike (``ankus audit directions`` writes directions)."""
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.direction is not None:
            check_direction(self.direction, self.model)

    def steered(self) -> contextlib.AbstractContextManager:
        """The steering hook for the duration of a ``with`` (nothing when unsteered)."""
        if self.direction is None or self.alpha == 0:
            return contextlib.nullcontext()
        return add_direction(self.model, self.direction.layer, self.direction.unit(), self.alpha)

    @classmethod
    def load(cls, spec: str, chat_template: bool = False, **kwargs) -> "EvalLM":
        from ankus.models.loading import load_model

        model, tokenizer = load_model(spec)
        model.eval()
        if chat_template and not getattr(tokenizer, "chat_template", None):
            from ankus.config import ConfigError

            raise ConfigError(f"model {spec} has no chat template; run without --chat-template")
        return cls(model, tokenizer, chat_template=chat_template, **kwargs)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a context or prompt (see the module docstring for the formats)."""
        tok = self.tokenizer
        if self.chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        text = prompt if isinstance(prompt, str) else render_plain(prompt)
        ids = tok(text)["input_ids"]
        return ids or [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]

    def _continuation_ids(self, text: str) -> list[int]:
        text = text.lstrip() if self.chat_template else text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"continuation {text!r} encodes to no tokens")
        return ids

    def score(self, contexts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation's tokens, whether greedy decoding would emit it)
        for each (context, continuation)."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts for {len(continuations)} continuations")
        cache: dict[tuple, list[int]] = {}
        requests = []
        for ctx, cont in zip(contexts, continuations):
            key = ctx if isinstance(ctx, str) else repr(ctx)
            c_ids = cache[key] if key in cache else cache.setdefault(key, self.encode(ctx))
            requests.append((c_ids, self._continuation_ids(cont)))
        return self.score_ids(requests)

    def score_ids(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``score`` on token ids: (context ids, continuation ids) pairs."""
        rows: dict[tuple, list[int]] = {}  # row ids -> indices of the requests it serves
        for i, (ctx, cont) in enumerate(requests):
            rows.setdefault(tuple(ctx) + tuple(cont[:-1]), []).append(i)
        order = sorted(rows)  # rows with a common prefix (few-shot examples) land in one batch
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        pad = pad_id(self.tokenizer)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            with self.steered():
                results = row_logprobs(self.model, [list(r) for r in chunk],
                                       [[requests[i][1] for i in rows[r]] for r in chunk], pad)
            for r, per_row in zip(chunk, results):
                for i, (lps, greedy) in zip(rows[r], per_row):
                    out[i] = (float(sum(lps)), bool(all(greedy)))
        return out

    def loglikelihood(self, contexts: Sequence[Prompt], continuations: Sequence[str]) -> list[float]:
        """Summed log-prob of each continuation's tokens given its context."""
        return [lp for lp, _ in self.score(contexts, continuations)]

    def loglikelihood_rolling(self, texts: Sequence[str], window: int | None = None) -> list[float]:
        """Summed log-prob of each whole text (every token after the first BOS / first token), in
        disjoint windows of at most ``window`` tokens (default: the model's context)."""
        window = window or int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048))
        out = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            start = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            if not start:
                ids, start = ids[1:], ids[:1]
            total, pos = 0.0, 0
            while pos < len(ids):
                piece = ids[pos:pos + window - 1]
                ctx = start if pos == 0 else ids[pos - 1:pos]
                total += self.score_ids([(ctx, piece)])[0][0]
                pos += len(piece)
            out.append(total)
        return out

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 48, guidance_scale: float = 1.0,
                 negative_prompts: Sequence[Prompt] | None = None, stop: Sequence[str] = (),
                 do_sample: bool = False, temperature: float = 1.0) -> list[str]:
        """Greedy (or sampled) replies; CFG against ``negative_prompts`` (one per prompt; default:
        the last prompt token) when ``guidance_scale != 1``."""
        if not prompts:
            return []
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  guidance_scale=guidance_scale, stop_strings=list(stop), chat_template=False,
                                  cuda_graph=self.direction is None or self.alpha == 0)  # a hook needs eager steps
        ids = [self.encode(p) for p in prompts]
        neg = [self.encode(p) for p in negative_prompts] if negative_prompts is not None else None
        with self.steered():
            out = generate(self.model, self.tokenizer, ids, config, negative_prompts=neg,
                           generator=torch.Generator().manual_seed(self.seed), batch_size=self.batch_size)
        return [t.strip() for t in out.texts]
