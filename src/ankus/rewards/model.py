"""A trained reward model as a reward function: ``reward: model:<run dir>``.

A reward model is a causal LM trunk plus a scalar head (:class:`ankus.models.heads.ValueHead`)
that reads the final hidden state at the last token of ``prompt + response + EOS``. The
reward-model trainer (:mod:`ankus.trainers.reward_model`) saves it as

    <run>/model/                     the trunk, Hugging Face format (+ tokenizer)
    <run>/model/value_head.safetensors   the head's weights
    <run>/model/reward_head.json     how to read it: input layout, hidden state, score statistics

    reward_fn = reward_model_fn("runs/rm_synthetic")
    reward_fn(samples=[...], prompts=[...], outputs=[...])   # -> list[float]

The tokenization and the read-out live here, and the trainer uses these same functions, so a
score at PPO time is computed exactly as during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ankus.data.tokens import pad_id
from ankus.data.batching import Batch, Example, make_batch
from ankus.models.heads import ValueHead

__all__ = ["HEAD_FILE", "META_FILE", "tokenize_response", "sequence_rewards", "load_reward_model", "score_texts",
           "reward_model_fn"]

HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_head.json"
FORMAT = "ankus.reward_model/1"


def tokenize_response(tok, prompt: str, response: str, max_length: int | None = None) -> Example:
    """``tokens(prompt) + tokens(response) + [EOS]``, the reward read at the EOS.

    The two texts are tokenized apart (as a policy sees them: prompt tokens, then its own
    tokens), and the EOS gives every sequence the same final token to summarise it. Too long:
    the *first* tokens are cut, so the read-out position survives.
    """
    ids = (tok(prompt, add_special_tokens=True).input_ids if prompt else []) + \
        tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    if max_length and len(ids) > max_length:
        ids = ids[-max_length:]
    return Example(ids, [0] * len(ids))


def sequence_rewards(trunk, head: ValueHead, batch: Batch) -> torch.Tensor:
    """One scalar per example of ``batch``: the head on the final hidden state at the example's
    last token. Returns (N,) in the batch's example order."""
    batch = batch.to(next(trunk.parameters()).device)
    # logits_to_keep=1: the LM head's logits are not needed, keep that cost to one position per row
    out = trunk(**batch.model_inputs(), output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]  # (R, T, H)
    last = hidden[batch.last_index[:, 0], batch.last_index[:, 1]]  # (N, H)
    return head(last.unsqueeze(1)).squeeze(1)  # (N,)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(trunk, head, tokenizer, meta)`` from a run directory or its ``model/`` directory."""
    from ankus.models.loading import ModelLoadError, load_model
    from safetensors.torch import load_file

    path = Path(path)
    model_dir = path / "model" if (path / "model" / META_FILE).exists() else path
    meta_path = model_dir / META_FILE
    if not meta_path.exists():
        raise ModelLoadError(f"{path} holds no trained reward model (no {META_FILE} in it or in its model/ "
                             "directory); train one with `ankus train rm_synthetic`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{meta_path}: unknown reward-model format {meta.get('format')!r}, expected {FORMAT!r}")
    trunk, tok = load_model(str(model_dir), device=device)
    head = ValueHead(meta["hidden_size"])
    head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
    head.to(device).eval()
    trunk.eval()
    return trunk, head, tok, meta


@torch.no_grad()
def score_texts(trunk, head, tok, prompts: Sequence[str], responses: Sequence[str], max_length: int | None = None,
                batch_size: int = 32) -> list[float]:
    """Raw reward-model scores of (prompt, response) pairs."""
    pad = pad_id(tok)
    examples = [tokenize_response(tok, p, r, max_length) for p, r in zip(prompts, responses)]
    # Batches of similar lengths (sorted), right-padded: no attention across a long packed row,
    # little padding. Scores go back to the input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    scores = [0.0] * len(examples)
    device = next(head.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = make_batch([examples[i] for i in idx], pad, "pad", 0)
        batch.input_ids, batch.position_ids = batch.input_ids.to(device), batch.position_ids.to(device)
        batch.last_index = batch.last_index.to(device)
        for i, r in zip(idx, sequence_rewards(trunk, head, batch).float().tolist()):
            scores[i] = r
    return scores


def reward_model_fn(run_dir: str | Path, normalize: bool = True, batch_size: int = 32,
                    device: str = "cpu") -> Callable[..., list[float]]:
    """A reward function (trlX's protocol) backed by the reward model trained in ``run_dir``.

    ``normalize``: subtract the mean and divide by the std of the model's scores on its held-out
    responses (stored at training time), so PPO sees rewards of unit scale whatever the head's
    offset. The order of scores, hence every preference, is unchanged.
    """
    trunk, head, tok, meta = load_reward_model(run_dir, device)
    mean, std = (meta.get("score_mean", 0.0), meta.get("score_std", 1.0)) if normalize else (0.0, 1.0)
    std = std if std and std > 0 else 1.0

    def reward_fn(samples: Sequence[str], prompts: Sequence[str] | None = None,
                  outputs: Sequence[str] | None = None, **metadata: Any) -> list[float]:
        if prompts is not None and outputs is not None:
            pairs_p, pairs_r = list(prompts), list(outputs)
        else:  # only full texts: score them whole (the boundary may tokenize slightly differently)
            pairs_p, pairs_r = [""] * len(samples), list(samples)
        raw = score_texts(trunk, head, tok, pairs_p, pairs_r, meta.get("max_length"), batch_size)
        return [(r - mean) / std for r in raw]

    return reward_fn
