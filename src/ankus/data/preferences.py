"""Preference pairs for DPO: reading, tokenizing, a resumable batch order, and the packed
``[prompt | chosen | rejected]`` layout with its prefix-sharing attention mask.

Each pair is laid out as prompt, chosen, rejected, with the rejected tokens taking the positions
that follow the prompt; :func:`prefix_shared_mask` lets each token see the prompt and its own
completion only, so one forward computes what two separate ``prompt + completion`` forwards
would. Pairs are packed back to back into rows (:func:`pack_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ankus.data.io import DataError, read_jsonl

__all__ = ["Pair", "PackedRows", "load_pairs", "tokenize_pairs", "batch_order", "pack_rows", "prefix_shared_mask"]

_ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class Pair:
    """One tokenized preference pair; the completions exclude the prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __len__(self) -> int:  # tokens in the packed layout
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def load_pairs(path: str) -> list[dict]:
    """Rows of a preference JSONL file (or of a built-in set), with file/line/field errors."""
    source = Path(path)
    if not source.exists() and (_ASSETS / f"{path}.jsonl").exists():
        source = _ASSETS / f"{path}.jsonl"
    return read_jsonl(source, required=("prompt", "chosen", "rejected"))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def tokenize_pairs(rows: Sequence[dict], tok, chat_template: bool | None = None, max_length: int = 1024,
                   where: str = "data") -> list[Pair]:
    """Token ids of prompt, chosen and rejected for each row.

    The prompt alone and prompt + completion are tokenized separately and split where they first
    differ: a chat template may render the end of the prompt differently once an answer follows,
    and plain-text tokens may merge across the boundary. Completions longer than ``max_length``
    minus the prompt are cut.
    """
    use_chat = bool(getattr(tok, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tok, "chat_template", None):
        raise DataError("data.chat_template is true but the tokenizer has no chat template")
    pairs = []
    for i, row in enumerate(rows):
        if use_chat:
            head = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
            head.append({"role": "user", "content": row["prompt"]})
            prompt = _chat_ids(tok, head, True)
            full = [_chat_ids(tok, head + [{"role": "assistant", "content": row[k]}], False)
                    for k in ("chosen", "rejected")]
        else:
            prompt = tok(row["prompt"])["input_ids"]
            full = [tok(row["prompt"] + row[k] + tok.eos_token)["input_ids"] for k in ("chosen", "rejected")]
        n = min(_common_prefix(prompt, f) for f in full)
        if n == 0:
            raise DataError(f"{where}, row {i + 1}: the prompt shares no token with prompt + completion, so the "
                            "first completion token has nothing to condition on")
        if n >= max_length:
            raise DataError(f"{where}, row {i + 1}: the prompt has {n} tokens, leaving no room for a completion in "
                            f"data.max_length={max_length}; shorten it or raise data.max_length")
        chosen, rejected = (f[n:max_length] for f in full)
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            if not ids:
                raise DataError(f"{where}, row {i + 1}: field '{name}' adds no token after the prompt")
        pairs.append(Pair(prompt[:n], chosen, rejected))
    return pairs


def batch_order(n: int, batch_size: int, step: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of the pairs in optimizer step ``step`` (0-based). The stream is one permutation
    per epoch, seeded by (seed, epoch), so any step's batch is known without replaying the run:
    a resumed run sees exactly the batches the uninterrupted one would have."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        if shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        else:
            perm = list(range(n))
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


# ---------------------------------------------------------------------------------------------
# packed layout: [prompt | chosen | rejected] per pair, pairs back to back


@dataclass
class PackedRows:
    """Pairs packed into rows (usually one row per micro-batch).

    Attributes:
        input_ids, position_ids: (R, L); padding only where rows differ in length.
        segment: (R, L) pair index of each token (-1 for padding).
        part: (R, L) 0 prompt, 1 chosen, 2 rejected (-1 padding).
        keep: (R, L) bool, positions whose logits are needed (they predict a completion token).
        predictor: (K,) for each completion token, its predicting position among ``keep``'s True
            entries (row-major); the last prompt token predicts both first completion tokens.
        labels: (K,) the completion tokens.
        seq_index: (K,) output sequence of each token: pair i's chosen is i, its rejected n + i.
        n_pairs: n.
    """

    input_ids: Tensor
    position_ids: Tensor
    segment: Tensor
    part: Tensor
    keep: Tensor
    predictor: Tensor
    labels: Tensor
    seq_index: Tensor
    n_pairs: int

    @property
    def n_tokens(self) -> int:
        return int((self.segment >= 0).sum())


def pack_rows(pairs: Sequence[Pair], pad_id: int, max_row_tokens: int = 0) -> PackedRows:
    """Lay pairs out as ``[prompt | chosen | rejected]`` back to back, in rows of at most
    ``max(max_row_tokens, longest pair)`` tokens (0 = everything in one row).

    Rows are filled first-fit, longest pair first, so they end up nearly equally long and little
    padding is left. Why rows at all: attention over a row costs its length squared, and a
    token only needs its own pair, so eight 58-token pairs in two rows cost half the attention
    of one 464-token row (measured ~13% faster per step on SmolLM2-135M, CPU).
    """
    capacity = max(max_row_tokens, max(len(p) for p in pairs)) if max_row_tokens else sum(len(p) for p in pairs)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda j: -len(pairs[j])):
        r = next((r for r, free in enumerate(room) if free >= len(pairs[i])), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= len(pairs[i])
    rows = [sorted(row) for row in rows]  # file order inside a row (only cosmetic)
    L = max(sum(len(pairs[j]) for j in row) for row in rows)
    R, n = len(rows), len(pairs)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    segment = torch.full((R, L), -1, dtype=torch.long)
    part = torch.full((R, L), -1, dtype=torch.long)
    keep = torch.zeros((R, L), dtype=torch.bool)
    # (row, position) of the predicting token, completion token, output sequence
    pred_at, labels, seq_index = [], [], []
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            p = pairs[i]
            P = len(p.prompt_ids)
            t_prompt_end = t + P - 1  # the prompt's last token predicts each completion's first
            for k, ids in enumerate((p.prompt_ids, p.chosen_ids, p.rejected_ids)):
                m = len(ids)
                start_pos = 0 if k == 0 else P  # both completions continue the prompt
                input_ids[r, t:t + m] = torch.tensor(ids)
                position_ids[r, t:t + m] = torch.arange(start_pos, start_pos + m)
                segment[r, t:t + m] = i
                part[r, t:t + m] = k
                if k > 0:
                    # token j of the completion is predicted by the token before it in its own
                    # sequence: the prompt's last token for j = 0, else completion token j - 1
                    preds = [t_prompt_end] + list(range(t, t + m - 1))
                    for j, q in enumerate(preds):
                        pred_at.append((r, q))
                        labels.append(ids[j])
                        seq_index.append(i if k == 1 else n + i)
                        keep[r, q] = True
                t += m
    # rank of each kept position in row-major order = its row in the logits the model returns
    rank = torch.full((R, L), -1, dtype=torch.long)
    rank[keep] = torch.arange(int(keep.sum()))
    predictor = torch.tensor([int(rank[r, q]) for r, q in pred_at], dtype=torch.long)
    return PackedRows(input_ids, position_ids, segment, part, keep, predictor,
                      torch.tensor(labels, dtype=torch.long), torch.tensor(seq_index, dtype=torch.long), n)


def prefix_shared_mask(segment: Tensor, part: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask (R, 1, L, L): query i sees key j iff both belong to the same pair,
    j <= i, and j is a prompt token or in i's own completion. A padding token sees only itself
    (a row with no visible key would give NaNs)."""
    R, L = segment.shape
    idx = torch.arange(L)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    same_pair = segment[:, :, None] == segment[:, None, :]  # (R, L, L)
    visible_part = (part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])  # (R, L, L)
    allowed = causal & same_pair & visible_part & (segment[:, None, :] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool)  # padding rows: attend to self
    bias = torch.zeros((R, 1, L, L), dtype=dtype)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
