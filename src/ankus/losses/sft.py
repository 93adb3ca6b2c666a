"""Supervised fine-tuning loss: next-token cross-entropy on completion tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sft_loss"]


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the tokens selected by ``loss_mask``.

    Shift convention (the HF one): ``logits`` is the model output on ``labels`` itself
    (``labels = input_ids``), so ``logits[:, t]`` predicts ``labels[:, t + 1]``. This
    function does the shift: it scores ``labels[:, 1:]`` with ``logits[:, :-1]`` and
    keeps the positions where ``loss_mask[:, 1:]`` is 1. ``loss_mask`` therefore marks
    the *target tokens* (completion tokens, 0 on prompt and padding), with the same
    (B, T) layout as ``labels``; ``loss_mask[:, 0]`` is never used.

    The mean is taken over all masked tokens of the batch (a token-level mean, not a
    mean of per-sequence means), so every completion token weighs the same.

    Args:
        logits: (B, T, V).
        labels: (B, T) token ids; any value (e.g. -100) is allowed where the mask is 0.
        loss_mask: (B, T) 1 on tokens to learn.

    Returns:
        ``(loss, stats)``: scalar loss (0 if no token is selected) and detached
        ``loss/sft`` and ``tokens`` (number of tokens that entered the mean).
    """
    shift_logits = logits[:, :-1]  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = loss_mask[:, 1:].to(torch.bool)  # (B, T-1)
    # Masked positions may carry ignore_index; give gather/cross_entropy a valid id.
    safe_labels = torch.where(mask, shift_labels, torch.zeros_like(shift_labels))
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()  # half-precision log-softmax loses digits that matter here
    token_losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), safe_labels.reshape(-1), reduction="none"
    ).view_as(safe_labels)  # (B, T-1)
    n_tokens = mask.sum()
    # where() rather than a multiply: a masked position with inf logits would give 0·inf = nan.
    loss = torch.where(mask, token_losses, torch.zeros_like(token_losses)).sum() / n_tokens.clamp(min=1)
    stats = {"loss/sft": loss.detach(), "tokens": n_tokens.detach()}
    return loss, stats
