"""ILQL's offline samples, from rows to the inputs of :func:`ankus.losses.ilql.ilql_loss`:
(prompt, completion, reward) rows, standardized returns, token ids, right-padded batches in the
loss's step convention (:func:`ilql_collate`) and the forward of the LM and heads on them
(:func:`ilql_forward`); for a frozen LM, its per-sample hidden states computed once
(:func:`cache_trunk`), batches over them (:func:`cached_collate`) and the heads alone on those
(:func:`cached_forward`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ankus.data.io import DataError, read_jsonl
from ankus.generation.engine import encode_prompts
from ankus.models.heads import ILQLHeads, q_at

__all__ = ["read_samples", "standardize_returns", "tokenize_samples", "batch_indices", "ilql_collate", "ilql_forward",
           "cache_trunk", "cached_collate", "cached_forward"]


def read_samples(dataset: str, walks_seed: int = 1000) -> tuple[list[str], list[str], list[float]]:
    """(prompts, completions, rewards) of an offline dataset (raw prompts, no template): the
    built-in ``randomwalks`` (each walk as [first node, the rest] with its optimality, the walks
    built with ``walks_seed``) or a JSONL file of ``{prompt, completion, reward}`` rows."""
    if dataset == "randomwalks":
        from ankus.rewards.randomwalks import generate_random_walks

        task = generate_random_walks(seed=walks_seed)
        # Nodes space-separated: the same text works with per-node and BPE tokenizers.
        prompts = [w[0] for w in task.walks]
        completions = [" " + " ".join(w[1:]) for w in task.walks]
        return prompts, completions, [task.optimality(w) for w in task.walks]
    path = Path(dataset)
    if not path.exists():
        hint = (" Build the offline sentiment set with: ankus make-sentiment-dataset --out " + str(path)
                if "sentiment" in path.name else "")
        raise FileNotFoundError(f"ILQL dataset not found: {path} (or use the built-in 'randomwalks').{hint}")
    rows = read_jsonl(path, required=("prompt", "completion"), non_empty=("prompt",))
    rewards = []
    for i, row in enumerate(rows):
        r = row.get("reward")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise DataError(f"{path}: row {i + 1} needs a finite number 'reward', got {r!r}")
        rewards.append(float(r))
    if not rows:
        raise DataError(f"{path}: no samples")
    return [r["prompt"] for r in rows], [r["completion"] for r in rows], rewards


def standardize_returns(rewards: Sequence[float]) -> list[float]:
    """(r − mean)/std over the dataset, std with Bessel's correction (torch's default, as trlX);
    a constant or single reward is only centred."""
    r = torch.tensor(list(rewards), dtype=torch.float64)
    centred = r - r.mean()
    std = float(r.std()) if len(r) > 1 else 0.0
    return (centred / std if std > 0 else centred).tolist()


def tokenize_samples(tok, prompts: Sequence[str], completions: Sequence[str], *, template: str = "{prompt}",
                     chat_template: bool | None = False, seq_length: int = 64, append_eos: bool = True,
                     eos_id: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt (templated, encoded like generation prompts, so training states
    match sampling states) and each completion (plus EOS). Completions are cut so that prompt +
    completion fit ``seq_length``; a prompt that alone does not fit keeps its last tokens."""
    prompt_ids = encode_prompts(tok, [template.format(prompt=p) for p in prompts], chat_template)
    eos_id = tok.eos_token_id if eos_id is None else eos_id
    out_p, out_c = [], []
    for p, c in zip(prompt_ids, completions):
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + ([eos_id] if append_eos else [])
        if not c_ids:
            raise ValueError(f"an empty completion with append_eos=False (prompt {len(out_p)}) has no action to train")
        p = p[-(seq_length - 1):] if seq_length > 1 else p[-1:]
        out_p.append(list(p))
        out_c.append(c_ids[: max(1, seq_length - len(p))])
    return out_p, out_c


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Row indices of the batch for 0-based ``step``: epoch e is a fixed permutation seeded by
    (seed, e), cut into full batches (the remainder is dropped; it changes from epoch to epoch).
    Determined by the step alone, so a resumed run sees the same data."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[pos * batch_size:(pos + 1) * batch_size]


def ilql_collate(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                 returns: Sequence[float], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors in the step convention of :func:`ankus.losses.ilql.ilql_loss`.

    Row i is prompt p (n_p tokens) then completion c (n_c tokens, EOS included), padded to L.
    Step t is the state after tokens 0..t and the action ``input_ids[t + 1]``, so

    * ``actions[:, t] = input_ids[:, t + 1]``                                  (B, L − 1)
    * ``mask`` = 1 on the completion's actions, t ∈ [n_p − 1, n_p + n_c − 2]   (B, L − 1)
    * ``rewards`` = the return on the last action t = n_p + n_c − 2, else 0  (B, L − 1)
    * ``dones`` = 1 on that same last action (no bootstrap after it)           (B, L − 1)
    """
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    B, L = len(lengths), max(lengths)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.float32)
    rewards = torch.zeros((B, L - 1), dtype=torch.float32)
    dones = torch.zeros((B, L - 1), dtype=torch.float32)
    for i, (p, c, ret) in enumerate(zip(prompt_ids, completion_ids, returns)):
        n_p, n_c = len(p), len(c)
        input_ids[i, : n_p + n_c] = torch.tensor(list(p) + list(c))
        attention_mask[i, : n_p + n_c] = 1
        mask[i, n_p - 1: n_p + n_c - 1] = 1
        last = n_p + n_c - 2
        rewards[i, last] = ret
        dones[i, last] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "actions": input_ids[:, 1:],
            "mask": mask, "rewards": rewards, "dones": dones}


def ilql_forward(model, heads: ILQLHeads, batch: dict[str, Tensor]):
    """The loss inputs of one batch, trimmed to the steps from the first action of any row.

    Returns ``(logits, qs, target_qs, vs, actions, rewards, dones, mask)``: logits (B, T, V),
    qs a tuple of (B, T, V), vs (B, T + 1) (V of the state after the last step included), the
    rest (B, T). Skipping the prompt-only steps saves the vocabulary-sized Q heads most of their
    work on long prompts. ``target_qs`` are (B, T, V) *views* that hold Q̂(s_t, a_t) in every
    column: :func:`ankus.losses.ilql.ilql_loss` only reads the taken token's column, so the loss
    is the same as with the full target heads, for 2H multiply-adds per step instead of 2H·V
    (:func:`ankus.models.heads.q_at`; on a 49k vocabulary the two full target heads were half the
    cost of a step).
    """
    ids, am = batch["input_ids"], batch["attention_mask"]
    L = ids.shape[1]
    first_action = int(batch["mask"].argmax(1).min())  # mask is 0 on every prompt step
    keep = L - first_action  # positions t0..L-1
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, logits_to_keep=keep, use_cache=False)
    hidden = out.hidden_states[-1][:, first_action:]  # (B, T + 1, H)
    hidden = hidden.to(heads.v_head[0].weight.dtype)
    sl = slice(first_action, None)
    actions = batch["actions"][:, sl]  # (B, T)
    states = hidden[:, :-1]  # (B, T, H): Q at states t0..L-2 only
    qs = tuple(q(states) for q in heads.q_heads)  # each (B, T, V)
    V = qs[0].shape[-1]
    with torch.no_grad():
        target_qs = tuple(q_at(q, states, actions).unsqueeze(-1).expand(-1, -1, V)
                          for q in heads.target_q_heads)
    vs = heads.v_head(hidden).squeeze(-1)  # (B, T + 1)
    logits = out.logits[:, :-1]  # (B, T, V)
    return logits, qs, target_qs, vs, actions, batch["rewards"][:, sl], batch["dones"][:, sl], batch["mask"][:, sl]


@torch.no_grad()
def cache_trunk(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int,
                *, batch_size: int = 16, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
    """What a frozen LM contributes to every sample, computed once: per sample i with n_p prompt
    and n_c completion tokens, ``hidden`` (n_c + 1, H), the last-layer hidden states of the
    states from the first action on (positions n_p − 1 .. n_p + n_c − 1, the last one the state
    after the final action, for V), and ``lm_ce`` (n_c,), −log π_LM of each completion token.

    With the LM frozen (``num_layers_unfrozen: 0``) the ILQL step then runs only the heads
    (:func:`cached_forward`); samples are batched by length so padding stays small."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    out: list[dict[str, Tensor] | None] = [None] * len(order)
    try:
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            batch = ilql_collate([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], [0.0] * len(rows),
                                 pad_id)
            res = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        output_hidden_states=True, use_cache=False)
            hidden = res.hidden_states[-1]  # (b, L, H)
            for j, i in enumerate(rows):
                n_p, n_c = len(prompt_ids[i]), len(completion_ids[i])
                logits = res.logits[j, n_p - 1: n_p + n_c - 1].float()  # (n_c, V)
                target = torch.tensor(list(completion_ids[i]), device=logits.device)
                out[i] = {"hidden": hidden[j, n_p - 1: n_p + n_c].to(dtype).cpu(),
                          "lm_ce": torch.nn.functional.cross_entropy(logits, target, reduction="none").cpu()}
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def cached_collate(cache: Sequence[dict[str, Tensor]], completion_ids: Sequence[Sequence[int]],
                   returns: Sequence[float]) -> dict[str, Tensor]:
    """A batch over :func:`cache_trunk`'s samples, each row starting at its first action (the
    losses are masked means, so the alignment of rows does not matter): ``hidden`` (B, T + 1, H),
    ``lm_ce``, ``actions``, ``mask``, ``rewards``, ``dones`` (B, T), as :func:`ilql_collate`
    gives them on the completion steps (return and done on each row's last action)."""
    B, T = len(cache), max(len(c) for c in completion_ids)
    H = cache[0]["hidden"].shape[-1]
    hidden = torch.zeros((B, T + 1, H), dtype=cache[0]["hidden"].dtype)
    lm_ce = torch.zeros((B, T))
    actions = torch.zeros((B, T), dtype=torch.long)
    mask, rewards, dones = (torch.zeros((B, T)) for _ in range(3))
    for i, (c, ids, ret) in enumerate(zip(cache, completion_ids, returns)):
        n = len(ids)
        hidden[i, : n + 1] = c["hidden"]
        lm_ce[i, :n] = c["lm_ce"]
        actions[i, :n] = torch.tensor(list(ids))
        mask[i, :n] = 1
        rewards[i, n - 1] = ret
        dones[i, n - 1] = 1
    return {"hidden": hidden, "lm_ce": lm_ce, "actions": actions, "mask": mask, "rewards": rewards, "dones": dones}


def cached_forward(heads: ILQLHeads, batch: dict[str, Tensor], full_q: bool = True):
    """:func:`ilql_forward` on a :func:`cached_collate` batch: the heads only. Returns the same
    tuple with ``logits`` None, plus ``lm_ce`` (B, T) for the AWAC term. The target Q̂ come as
    (B, T) values at the taken tokens, and so do the online Q unless ``full_q`` (the CQL term
    needs all V tokens; without it a step never projects onto the vocabulary)."""
    hidden = batch["hidden"].to(heads.v_head[0].weight.dtype)  # (B, T + 1, H)
    states, actions = hidden[:, :-1], batch["actions"]  # (B, T, H), (B, T)
    if full_q:
        qs = tuple(q(states) for q in heads.q_heads)  # each (B, T, V)
    else:
        qs = tuple(q_at(q, states, actions) for q in heads.q_heads)  # each (B, T)
    with torch.no_grad():
        target_qs = tuple(q_at(q, states, actions) for q in heads.target_q_heads)  # each (B, T)
    vs = heads.v_head(hidden).squeeze(-1)  # (B, T + 1)
    return None, qs, target_qs, vs, actions, batch["rewards"], batch["dones"], batch["mask"], batch["lm_ce"]
