"""Supervised rows (prompt/completion or chat) read from their source and tokenized into
:class:`~ankus.data.batching.Example` s whose loss mask covers the completion / assistant tokens.

Sources: JSONL rows ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``, a built-in
set (``randomwalks``, ``sft_tiny``), a ``datasets`` ``save_to_disk`` directory, or the name of a
``datasets`` dataset already in the local cache. :class:`SFTData` is the ``data`` section of the
SFT trainer's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from ankus.data.batching import Example
from ankus.data.io import DataError

__all__ = ["SFTData", "load_rows", "tokenize_prompt_completion", "tokenize_chat", "tokenize_row"]


@dataclass
class SFTData:
    name: str = "randomwalks"
    """Built-in set (randomwalks, sft_tiny), a JSONL file, a datasets save_to_disk directory, or a cached datasets name."""
    split: str = "train"
    """Split to read from a datasets dataset."""
    kwargs: dict = field(default_factory=dict)
    """Options of a built-in set (randomwalks: seed, n_nodes, n_walks, ...)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (prompt/completion rows)."""
    completion_field: str = "completion"
    """Field holding the completion (prompt/completion rows)."""
    messages_field: str = "messages"
    """Field holding a chat as a list of {role, content} (chat rows)."""
    template: str = "{prompt}"
    """Format string applied to the prompt of prompt/completion rows; {prompt} is the raw prompt."""
    chat_template: bool = False
    """Render prompt/completion rows as a user turn and an assistant turn of the chat template."""
    add_eos: bool = True
    """Append the EOS token to plain completions (it is a target, so the model learns to stop)."""
    score_field: str = ""
    """With min_score: keep only rows whose value in this field is >= min_score (e.g. a scored sample set)."""
    min_score: float | None = None
    """Threshold for score_field; null = keep every row."""
    max_length: int = 1024
    """Tokens per example; longer examples are cut from the right (examples left with no target are dropped)."""
    limit: int = 0
    """Use only the first this many rows; 0 = all."""
    eval_fraction: float = 0.05
    """Share of the examples held out for the eval loss (a seeded random split)."""
    batching: Literal["pack", "bucket", "pad"] = "pack"
    """pack: examples end to end with restarting positions; bucket: similar lengths per batch; pad: plain."""
    pack_length: int = 1024
    """Most tokens in one packed row (attention cost grows with its square; at least max_length)."""



def _read_datasets(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"data '{name}': reading it needs the 'datasets' package ({e})") from None
    path = Path(name)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"data '{name}': not a built-in set, a JSONL file, or a dataset available offline "
                        f"({type(e).__name__}: {e})") from None
    return [dict(row) for row in ds]


def load_rows(data: SFTData) -> list[dict]:
    """Raw rows of the configured data source, filtered by score and limited."""
    from ankus.data.io import read_jsonl

    if data.name == "randomwalks":
        from ankus.rewards.randomwalks import randomwalk_rows

        rows = randomwalk_rows(**data.kwargs)
    elif data.name == "sft_tiny":
        from ankus.data.assets import asset_path

        rows = read_jsonl(Path(str(asset_path("sft_tiny.jsonl"))))
    elif data.name.endswith(".jsonl") or Path(data.name).is_file():
        rows = read_jsonl(data.name)
    else:
        rows = _read_datasets(data.name, data.split)
    if data.min_score is not None:
        if not data.score_field:
            raise DataError("data.min_score needs data.score_field (the field holding each row's score)")
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(data.score_field), (int, float))]
        if missing:
            raise DataError(f"data '{data.name}': row {missing[0] + 1} has no numeric '{data.score_field}' field")
        rows = [r for r in rows if r[data.score_field] >= data.min_score]
    if data.limit:
        rows = rows[: data.limit]
    if not rows:
        raise DataError(f"data '{data.name}': no rows left to train on")
    return rows


def tokenize_prompt_completion(tok, prompt: str, completion: str, add_eos: bool = True,
                               max_length: int | None = None) -> Example | None:
    """Prompt tokens (mask 0), then completion tokens and EOS (mask 1). The two texts are
    tokenized apart, so the boundary tokens are those a model sees when it is prompted with
    ``prompt`` alone. None if no target token survives truncation."""
    prompt_ids = tok(prompt, add_special_tokens=True).input_ids if prompt else []
    completion_ids = tok(completion, add_special_tokens=False).input_ids
    if add_eos:
        completion_ids = completion_ids + [tok.eos_token_id]
    ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    return _finish(ids, mask, max_length)


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tok, messages: Sequence[dict], max_length: int | None = None) -> Example | None:
    """A chat rendered with the tokenizer's template; targets are the assistant turns.

    The template is rendered on growing prefixes of the conversation: the text an assistant turn
    adds (``render(msgs[:i+1])`` minus ``render(msgs[:i], add_generation_prompt=True)``) is a
    target, everything else is context. Each piece is tokenized on its own, which for
    ChatML-style templates splits exactly at the special tokens. Turns after the last assistant
    turn teach nothing and are dropped.
    """
    messages = [dict(m) for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}"[:200])
    if messages and messages[0]["role"] == "assistant":
        raise DataError("a conversation must not open with an assistant turn (there is nothing to condition on)")
    pieces: list[tuple[str, int]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:i], add_generation_prompt=True)
        full = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                            "cannot tell assistant tokens apart (use prompt/completion rows instead)")
        pieces += [(head[len(done):], 0), (full[len(head):], 1)]
        done = full
    if not pieces:
        return None
    ids: list[int] = []
    mask: list[int] = []
    for text, target in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [target] * len(piece)
    return _finish(ids, mask, max_length)


def _finish(ids: list[int], mask: list[int], max_length: int | None) -> Example | None:
    if max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0  # nothing precedes the first token, so it cannot be a target
    if not any(mask):
        return None
    return Example(ids, mask)


def tokenize_row(tok, row: dict, data: SFTData) -> Example | None:
    """A chat row (``messages_field`` present) or a prompt/completion row -> :class:`Example`."""
    if data.messages_field in row:
        msgs = row[data.messages_field]
        if not isinstance(msgs, list):
            raise DataError(f"field '{data.messages_field}' must be a list of messages, got {type(msgs).__name__}")
        return tokenize_chat(tok, msgs, data.max_length)
    for key in (data.prompt_field, data.completion_field):
        if not isinstance(row.get(key), str):
            raise DataError(f"row needs string fields '{data.prompt_field}' and '{data.completion_field}', "
                            f"or a '{data.messages_field}' list; got fields {sorted(row)}")
    prompt, completion = data.template.format(prompt=row[data.prompt_field]), row[data.completion_field]
    if data.chat_template:
        return tokenize_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             data.max_length)
    return tokenize_prompt_completion(tok, prompt, completion, data.add_eos, data.max_length)
