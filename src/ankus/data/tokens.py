"""Token-batch conventions every trainer, the engine and the pipelines share."""

from __future__ import annotations

from torch import Tensor

__all__ = ["pad_id", "position_ids_from_mask"]


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS token, else 0.

    Padding is always masked out, so the choice never changes a number; one rule keeps batches
    built by different modules identical.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else 0


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) positions counting real tokens only, so a left-padded row starts at 0 as it does
    unpadded; padding gets 0. Generation and every training forward use this rule."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
