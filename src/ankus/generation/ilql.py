"""ILQL-guided sampling (Snell et al. 2022): tokens drawn from
``log_softmax(logits) + β·(min_i Q̂_i − V)`` with the engine's sampler (temperature, top-k,
top-p), where Q̂ are the target Q heads and V the value head of :class:`ankus.models.heads.ILQLHeads`
on the current state. β = 0 is plain sampling from the LM.

The engine's fast paths (packed linear layers, CUDA graphs) do not apply: the heads need the
last hidden state at every step, so this loop runs the model's own forward on a dynamic KV cache.
Prompts, padding, EOS ids, stop strings and the output layout are the engine's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ankus.data.tokens import pad_id as pad_token, position_ids_from_mask
from ankus.generation.engine import (GenerationConfig, GenerationOutput, concat_outputs, cut_text, encode_prompts,
                                     eos_token_ids, left_pad)
from ankus.generation.sampling import sample_tokens, token_logps
from ankus.losses.ilql import ilql_sample_scores
from ankus.models.heads import ILQLHeads

__all__ = ["ilql_generate"]


def _last_hidden_and_logits(model, **kw) -> tuple[Tensor, Tensor]:
    out = model(**kw, use_cache=True, logits_to_keep=1, output_hidden_states=True)
    return out.logits[:, -1], out.hidden_states[-1][:, -1]  # (B, V), (B, H)


def _guided_scores(logits: Tensor, hidden: Tensor, heads: ILQLHeads | None, beta: float) -> Tensor:
    """(B, V) log_softmax(logits) + β·(min_i Q̂_i − V) on the current states."""
    if beta == 0 or heads is None:
        return torch.log_softmax(logits.float(), dim=-1)
    h = hidden.to(heads.v_head[0].weight.dtype)
    q_min = torch.stack([q(h) for q in heads.target_q_heads]).amin(0)  # (B, V)
    v = heads.v_head(h).squeeze(-1)  # (B,)
    return ilql_sample_scores(logits, q_min, v, beta)


@torch.no_grad()
def ilql_generate(model, heads: ILQLHeads | None, tok, prompts: Sequence[str] | Sequence[Sequence[int]],
                  config: GenerationConfig, beta: float = 1.0, *, generator: torch.Generator | None = None,
                  batch_size: int | None = None) -> GenerationOutput:
    """Sample from the ILQL policy softmax((log_softmax(logits) + β·(Q̂ − V)) / temperature),
    after top-k / top-p, one token at a time on a KV cache.

    Prompts are encoded, left-padded and the outputs joined as in
    :func:`ankus.generation.engine.generate`, and a token is drawn for every row at every step
    (finished rows are padded, not dropped), so with β = 0 and ``ignore_eos`` the draws are those
    of the plain engine under the same generator. Rows end at EOS or a stop string (the text is
    cut before it). ``logprobs`` are the raw LM's log-probs of the drawn tokens.
    """
    prompt_ids = encode_prompts(tok, prompts, config.chat_template)
    eos = [] if config.ignore_eos else eos_token_ids(model, tok)
    pad_id = pad_token(tok)
    was_training = model.training
    model.eval()
    try:
        size = batch_size or len(prompt_ids)
        outputs = [_generate_chunk(model, heads, tok, prompt_ids[s:s + size], config, beta, eos, pad_id, generator)
                   for s in range(0, len(prompt_ids), size)]
    finally:
        model.train(was_training)
    return concat_outputs(outputs, pad_id)


def _generate_chunk(model, heads: ILQLHeads | None, tok, chunk: list[list[int]], config: GenerationConfig,
                    beta: float, eos: list[int], pad_id: int, generator: torch.Generator | None) -> GenerationOutput:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    B, N = len(chunk), config.max_new_tokens
    ids, mask = (t.to(device) for t in left_pad(chunk, pad_id))
    response = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, N), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos or [-1], device=device)
    positions = position_ids_from_mask(mask)  # left padding: first real token at 0
    cache = DynamicCache(config=model.config)
    if N:
        logits, hidden = _last_hidden_and_logits(model, input_ids=ids, attention_mask=mask, position_ids=positions,
                                                 cache=cache)
    positions = positions[:, -1:]
    tokens_so_far: list[list[int]] = [[] for _ in range(B)]
    for t in range(N):
        scores = _guided_scores(logits, hidden, heads, beta)  # (B, V)
        tokens = sample_tokens(scores, config, generator)  # (B,)
        live = ~done
        response[:, t] = torch.where(live, tokens, torch.full_like(tokens, pad_id))
        response_mask[:, t] = live.long()
        logprobs[:, t] = torch.where(live, token_logps(logits, tokens), torch.zeros((), device=device))
        done = done | torch.isin(tokens, eos_t)
        for r in range(B) if config.stop_strings else ():
            if live[r]:
                tokens_so_far[r].append(int(tokens[r]))
                text = tok.decode(tokens_so_far[r], skip_special_tokens=True)
                done[r] |= any(st in text for st in config.stop_strings)
        if bool(done.all()) or t == N - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
        positions = positions + 1
        logits, hidden = _last_hidden_and_logits(model, input_ids=tokens[:, None], attention_mask=mask,
                                                 position_ids=positions, cache=cache)
    texts = [cut_text(tok.decode(response[r, : int(response_mask[r].sum())].tolist(), skip_special_tokens=True),
                      config.stop_strings) for r in range(B)]
    return GenerationOutput(ids, mask[:, : ids.shape[1]], response, response_mask, logprobs, texts)
