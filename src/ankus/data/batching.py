"""Batches of token sequences without padding waste, for trainers that learn from fixed texts
(SFT, reward models).

Two exact ways to avoid padding:

* **length bucketing** (:func:`bucketed_batches` + :func:`pad_batch`): examples of similar length
  share a batch, so the right-padding that remains is short;
* **packing** (:func:`pack_batch`): the examples of a batch are laid end to end in as few rows as
  fit ``pack_length`` tokens. Position ids restart at 0 for every example; called with
  ``attention_mask=None`` and no cache, transformers reads the restarts as sequence boundaries
  and builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so
  no token attends across examples. :func:`packing_is_exact` checks that a given model honours
  this before a trainer relies on it.

Right padding needs no attention mask either: in a causal LM a real token only attends to
earlier positions, which are all real, so the pads at the end of a row change nothing before
them. Leaving ``attention_mask=None`` keeps attention on the fast ``is_causal`` path.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

__all__ = ["Example", "Batch", "bucketed_batches", "shuffled_batches", "pad_batch", "pack_batch",
           "make_batch", "pack_rows", "packing_is_exact", "BatchingMode", "step_batches", "split_eval",
           "micro_batches"]

BatchingMode = Literal["pack", "bucket", "pad"]


@dataclass
class Example:
    """One tokenized sequence."""

    input_ids: list[int]
    loss_mask: list[int]
    """1 on *target* tokens (the tokens a loss learns to predict; sft_loss's convention), else 0.
    The first token of a sequence has no context inside it, so its mask must be 0."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """Model inputs for a list of examples, and where each example ended."""

    input_ids: torch.Tensor  # (R, T) long
    position_ids: torch.Tensor  # (R, T) long; restart at 0 for each packed example
    loss_mask: torch.Tensor  # (R, T) long; 0 on padding
    last_index: torch.Tensor  # (N, 2) long: (row, column) of each example's last token, in example order
    n_tokens: int  # real (non-pad) tokens
    n_examples: int

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for the model's forward (use with ``use_cache=False``, which packing needs)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": None}

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch with its tensors on ``device`` (itself when they are there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.loss_mask.to(device),
                     self.last_index.to(device), self.n_tokens, self.n_examples)

    @property
    def pad_fraction(self) -> float:
        """Share of the (R, T) grid that is padding."""
        return 1.0 - self.n_tokens / max(self.input_ids.numel(), 1)


# ---------------------------------------------------------------------------------------------
# which examples share a batch


def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices 0..n-1 in a seeded random order, cut into batches (the last may be smaller)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, group_batches: int = 32) -> list[list[int]]:
    """Batches of indices whose lengths are close, in a seeded random order.

    The shuffled indices are cut into groups of ``group_batches`` batches; each group is sorted by
    length and cut into batches, and the batch order is shuffled. Sorting within groups rather than
    globally keeps batches random enough for SGD while keeping lengths within a batch close.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * max(group_batches, 1)
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def step_batches(lengths: Sequence[int], batch_size: int, mode: BatchingMode, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch (bucketed for ``bucket``, else shuffled); a function of (seed,
    epoch) only, so a resumed run sees the same order."""
    epoch_seed = seed * 100003 + epoch
    if mode == "bucket":
        return bucketed_batches(lengths, batch_size, epoch_seed)
    return shuffled_batches(len(lengths), batch_size, epoch_seed)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random (train, eval) split; eval gets round(fraction * n) items."""
    n_eval = int(round(fraction * len(items)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_ix = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in eval_ix], [x for i, x in enumerate(items) if i in eval_ix]


def micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    """``indices`` cut into at most ``grad_accum`` contiguous, near-equal micro-batches."""
    if not indices:
        return []
    n = max(1, min(grad_accum, len(indices)))
    size = math.ceil(len(indices) / n)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------------------------------------
# collation


def _check(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    for i, ex in enumerate(examples):
        if len(ex.input_ids) == 0 or len(ex.input_ids) != len(ex.loss_mask):
            raise ValueError(f"example {i}: input_ids ({len(ex.input_ids)}) and loss_mask "
                             f"({len(ex.loss_mask)}) must be non-empty and of equal length")
        if ex.loss_mask[0]:
            raise ValueError(f"example {i}: loss_mask[0] must be 0 (the first token has no context to be predicted from)")


def pad_batch(examples: Sequence[Example], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest."""
    _check(examples)
    width = max(len(ex) for ex in examples)
    R = len(examples)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((R, width), dtype=torch.long)
    for r, ex in enumerate(examples):
        input_ids[r, :len(ex)] = torch.tensor(ex.input_ids)
        loss_mask[r, :len(ex)] = torch.tensor(ex.loss_mask)
    position_ids = torch.arange(width).expand(R, width).clone()
    last = torch.tensor([[r, len(ex) - 1] for r, ex in enumerate(examples)], dtype=torch.long)
    return Batch(input_ids, position_ids, loss_mask, last, sum(len(ex) for ex in examples), R)


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``pack_length`` tokens (an example longer than
    that gets a row of its own): first-fit decreasing, then balanced.

    Rows are padded to the longest, so after first-fit finds how many rows are needed, the
    capacity is lowered towards ``total / rows`` as far as the same number of rows still holds
    every example: [6, 2, 2, 2] in rows of 8 is [6, 2] + [2, 2] (4 pads), balanced [6] + [2, 2, 2].
    """
    rows = _first_fit_decreasing(lengths, pack_length)
    if len(rows) > 1:
        capacity = max(max(lengths), -(-sum(lengths) // len(rows)))
        while capacity < pack_length:
            trial = _first_fit_decreasing(lengths, capacity)
            if len(trial) <= len(rows):
                return trial
            capacity += max(1, capacity // 50)
    return rows


def pack_batch(examples: Sequence[Example], pad_id: int, pack_length: int) -> Batch:
    """Examples laid end to end in rows of at most ``pack_length`` tokens; rows right-padded to
    the longest row. Position ids restart at 0 for every example (see the module docstring)."""
    _check(examples)
    rows = pack_rows([len(ex) for ex in examples], pack_length)
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.full((R, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((R, width), dtype=torch.long)
    position_ids = torch.zeros((R, width), dtype=torch.long)
    last = torch.zeros((len(examples), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            ex = examples[i]
            n = len(ex)
            input_ids[r, col:col + n] = torch.tensor(ex.input_ids)
            loss_mask[r, col:col + n] = torch.tensor(ex.loss_mask)
            position_ids[r, col:col + n] = torch.arange(n)
            last[i] = torch.tensor([r, col + n - 1])
            col += n
        # The padding tail continues the last example's positions: it sits after every real
        # token, so under the causal mask nothing real ever attends to it.
        position_ids[r, col:] = torch.arange(position_ids[r, col - 1] + 1, position_ids[r, col - 1] + 1 + width - col)
    return Batch(input_ids, position_ids, loss_mask, last, sum(len(ex) for ex in examples), len(examples))


def make_batch(examples: Sequence[Example], pad_id: int, mode: BatchingMode, pack_length: int) -> Batch:
    """``pack`` -> :func:`pack_batch`; ``bucket`` and ``pad`` -> :func:`pad_batch` (they differ in
    which examples share a batch, not in how a batch is laid out)."""
    if mode == "pack":
        return pack_batch(examples, pad_id, pack_length)
    if mode in ("bucket", "pad"):
        return pad_batch(examples, pad_id)
    raise ValueError(f"unknown batching mode '{mode}'; expected pack, bucket or pad")


@torch.no_grad()
def packing_is_exact(model, atol: float = 1e-4) -> bool:
    """True if ``model`` keeps packed examples apart: the logits of two short sequences packed in
    one row (position ids restarting) equal their logits run separately. Three tiny forwards."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        a = torch.tensor([[11, 12, 13, 14]], device=device)
        b = torch.tensor([[15, 16, 17]], device=device)
        packed = torch.cat([a, b], 1)
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
        la = model(input_ids=a, use_cache=False).logits.float()
        lb = model(input_ids=b, use_cache=False).logits.float()
        lp = model(input_ids=packed, position_ids=pos, attention_mask=None, use_cache=False).logits.float()
        scale = max(float(la.abs().max()), float(lb.abs().max()), 1.0)
        return bool((lp[:, :4] - la).abs().max() <= atol * scale and (lp[:, 4:] - lb).abs().max() <= atol * scale)
    finally:
        model.train(was_training)
