"""Prompts run once: the forward of k responses to one prompt, sharing the prompt's computation.

GRPO and RLOO sample k responses per prompt, and PPO's scoring and update forwards then run every
prompt k times. Here each distinct prompt row is run once with a KV cache, the cache is expanded
to the batch (row i gets its prompt's keys and values), and the responses run on top of it. A
causal model's prompt positions do not depend on what follows, so this is the same function as
the forward over ``[prompt, response]`` rows, up to float rounding. Gradients flow through the
expanded cache into the shared prompt computation, and sum there as they would over k copies.

With k = 4, 47-token prompts and 32-token responses (benchmarks/ppo.py), a SmolLM2-135M training
forward + backward takes 14.0 s instead of 23.8 s on one CPU core.

Nothing here is architecture-specific: the model's own forward runs twice (prompts, then
responses with ``cache=``). It returns hidden states, not logits, so the caller applies the
output head in row chunks (:func:`ankus.losses.ppo.head_logprobs`). :func:`head_is_plain` checks
that the head alone makes the logits, e.g. that there is no soft-capping after it.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ankus.data.tokens import position_ids_from_mask

__all__ = ["shared_prompt_hidden", "shared_prompt_states", "head_is_plain"]


def shared_prompt_hidden(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                         response_mask: Tensor) -> Tensor:
    """Final hidden states that predict each response token, (B, N, H): row i, position t is the
    state after ``prompt_i + response_i[:t]``, whose output-head logits give response token t.

    ``prompt_ids``/``prompt_mask`` (B, P) left-padded, ``response_ids``/``response_mask`` (B, N)
    right-padded, as the generation engine returns them. Equal prompt rows (ids and mask) are run
    once. Positions skip the left padding (``cumsum(mask) - 1``), as in generation and in
    :func:`ankus.data.tokens.position_ids_from_mask`. Positions whose response token is
    padding hold meaningless states. Runs with or without grad.
    """
    from transformers import DynamicCache


    P, N = prompt_ids.shape[1], response_ids.shape[1]
    distinct, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    u_ids, u_mask = distinct[:, :P], distinct[:, P:]  # (U, P)
    cache = DynamicCache(config=model.config)
    first = model(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask), cache=cache,
                  use_cache=True, output_hidden_states=True, logits_to_keep=1)
    last = first.hidden_states[-1][:, -1:]  # (U, 1, H): predicts the first response token
    if N == 1:
        return last[inverse]
    cache.batch_select_indices(inverse)  # every layer's (U, heads, P, d) keys and values -> (B, ...)
    mask = torch.cat([prompt_mask, response_mask], 1)  # (B, P + N)
    rest = model(input_ids=response_ids[:, :-1], attention_mask=mask[:, :-1],
                 position_ids=position_ids_from_mask(mask)[:, P:-1], cache=cache, use_cache=True,
                 output_hidden_states=True, logits_to_keep=1)
    return torch.cat([last[inverse], rest.hidden_states[-1]], 1)  # (B, 1 + N - 1, H)


def shared_prompt_states(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                         response_mask: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """:func:`shared_prompt_hidden`'s final states (B, N, H), and the hidden state entering decoder
    layer ``layer`` over the whole rows, (B, P + N, H): what ``hidden_states[layer]`` of the
    forward over ``[prompt, response]`` rows holds, with each distinct prompt run once. For
    PPO's Hydra, whose reference branch and cached trunk start from that state."""
    from transformers import DynamicCache


    P = prompt_ids.shape[1]
    distinct, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    u_ids, u_mask = distinct[:, :P], distinct[:, P:]  # (U, P)
    cache = DynamicCache(config=model.config)
    first = model(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask), cache=cache,
                  use_cache=True, output_hidden_states=True, logits_to_keep=1)
    cache.batch_select_indices(inverse)  # (U, heads, P, d) -> (B, ...) in every layer
    mask = torch.cat([prompt_mask, response_mask], 1)  # (B, P + N)
    # every response token runs (the last one too): its state at ``layer`` completes the row
    rest = model(input_ids=response_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, P:],
                 cache=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    final = torch.cat([first.hidden_states[-1][:, -1:][inverse], rest.hidden_states[-1][:, :-1]], 1)  # (B, N, H)
    at_layer = torch.cat([first.hidden_states[layer][inverse], rest.hidden_states[layer]], 1)  # (B, P + N, H)
    return final, at_layer


_PLAIN: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_is_plain(model: nn.Module) -> bool:
    """Whether the model's logits are its output head applied to ``hidden_states[-1]`` (not true
    under logit soft-capping or scaling, or if the last hidden state is not the head's input).
    Checked once per model on a 4-token forward."""
    if model not in _PLAIN:
        head = model.get_output_embeddings()
        device = head.weight.device
        ids = torch.tensor([[11, 12, 13, 14]], device=device)
        was_training = model.training
        model.eval()
        try:
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        finally:
            model.train(was_training)
        made = head(out.hidden_states[-1]).float()
        logits = out.logits.float()
        _PLAIN[model] = bool((made - logits).abs().max() <= 1e-4 * max(float(logits.abs().max()), 1.0))
    return _PLAIN[model]
