"""Classifier-free guidance for language models (Sanchez et al. 2023, "Stay on topic with
Classifier-Free Guidance", arXiv:2306.17806).

The guided next-token distribution reweights the conditional model by how much the condition
(the prompt) raises each token's probability over an unconditional context:

    log P_cfg(w | c) = log P(w) + gamma * (log P(w | c) - log P(w))

gamma = 1 is the plain model; gamma > 1 sharpens towards what the prompt asks for. The result
is a score, not a normalised log-probability; sampling applies temperature / top-k / top-p and a
softmax to it. The engine feeds both branches the same sampled tokens, each with its own KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cfg_scores(logits: Tensor, uncond_logits: Tensor, gamma: float) -> Tensor:
    """Guided scores ``gamma * (logp_cond - logp_uncond) + logp_uncond``.

    logits, uncond_logits: (B, V) raw next-token logits of the conditional and unconditional
    branches. Returns (B, V) float32 scores. Both are log-softmaxed first: the paper mixes
    log-probabilities, and the two branches' logits have unrelated offsets.
    """
    logps = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    uncond_logps = torch.log_softmax(uncond_logits.float(), dim=-1)  # (B, V)
    return gamma * (logps - uncond_logps) + uncond_logps


def unconditional_prompts(prompt_ids: list[list[int]], negative_ids: list[list[int]] | None) -> list[list[int]]:
    """The token ids of each row's unconditional branch.

    With negative prompts, those (one per row). Without, only the last prompt token: the paper's
    default (and transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``), which keeps
    the continuation's own context in both branches and drops only the prompt.
    """
    if negative_ids is None:
        return [ids[-1:] for ids in prompt_ids]
    if len(negative_ids) != len(prompt_ids):
        raise ValueError(f"got {len(negative_ids)} negative prompts for {len(prompt_ids)} prompts; "
                         "pass one per prompt, or a single config.negative_prompt")
    for i, ids in enumerate(negative_ids):
        if not ids:
            raise ValueError(f"negative prompt {i} encodes to no tokens; use None for the last-token default")
    return [list(ids) for ids in negative_ids]
