"""ILQL: offline RL from scored samples, as trlX does it (Snell et al. 2022, "Offline RL for
Natural Language Generation with Implicit Language Q Learning").

Data: (prompt, completion, reward) samples -- a JSONL file of ``{prompt, completion, reward}``
rows, or the built-in ``randomwalks`` set (each walk split as [first node, the rest], reward =
its optimality, trlX's ``examples/randomwalks/ilql_randomwalks.py`` setup). Rewards become
standardized returns placed on the last action (the EOS appended to each completion).

One step: a forward of the LM gives logits and last-layer hidden states; ILQL heads on those give
Q (two heads), target Q (Polyak copies) and V; :func:`ankus.losses.ilql.ilql_loss` combines the
Bellman, expectile, CQL and AWAC terms; after every ``steps_for_target_q_sync`` optimizer steps
the target heads move toward the online ones by ``alpha``.

With the LM frozen (``num_layers_unfrozen: 0``, no LoRA) the trunk's hidden states and the LM's
cross-entropy of every sample are computed once (:func:`cache_trunk`) and a step runs the heads
alone; with ``cql_scale`` 0 too, the Q heads are read at the taken tokens only and a step never
projects onto the vocabulary. ``q_head: unembedding`` swaps trlX's vocabulary-wide Q heads for
ones read out through the LM's frozen unembedding (:class:`ankus.models.heads.UnembeddingQHead`).

Generation samples from ``log_softmax(logits) + β·(min_i Q̂_i − V)`` with top-k (trlX uses the
min over the *target* heads); β = 0 is plain sampling from the LM. Evaluation sweeps β.

Under several processes (torchrun, accelerate launch) each takes its block of one global batch of
``trainer.batch_size`` x processes samples; every loss term is a mean over the global batch's
masked steps, gradients are summed over processes (:mod:`ankus.distributed`), so every replica
takes the same step and the Polyak sync of the target heads, a function of the (identical)
online heads, stays identical too. Rank 0 evaluates and writes the run directory.

Loss math lives in ankus.losses.ilql; this file only prepares data and wires it together.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ankus import distributed
from ankus.config import ModelConfig, RunConfig, TrainerConfig
from ankus.generation.engine import (GenerationConfig, GenerationOutput, encode_prompts, eos_token_ids, left_pad,
                                     sample_tokens, token_logps)
from ankus.losses.ilql import ilql_loss, ilql_sample_scores
from ankus.models.heads import ILQLHeads, q_at

__all__ = ["ILQLMethod", "ILQLData", "ILQLEval", "Config", "train", "train_step", "standardize_returns",
           "tokenize_samples", "ilql_collate", "ilql_forward", "ilql_generate", "load_samples", "letter_tokenizer",
           "randomwalks_gpt2", "save_ilql", "load_ilql"]

RANDOMWALKS_SPEC = "randomwalks-gpt2"


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class ILQLMethod:
    tau: float = 0.7
    """Expectile of the V regression (IQL); > 0.5 pulls V toward the better actions' Q."""
    gamma: float = 0.99
    """Discount of the Bellman target r + γ·V(s')."""
    cql_scale: float = 0.1
    """Weight of the CQL term (Q values read as logits, cross-entropy on the data token)."""
    awac_scale: float = 1.0
    """Weight of the AWAC term (the LM's cross-entropy on the data tokens)."""
    awac_beta: float = 0.0
    """Temperature of the AWAC weight exp(β(Q̂ − V)); 0 = plain cross-entropy (trlX)."""
    alpha: float = 0.001
    """Polyak weight of the online heads: target ← α·Q + (1 − α)·target."""
    steps_for_target_q_sync: int = 5
    """Optimizer steps between Polyak updates of the target Q heads."""
    two_qs: bool = True
    """Two Q heads (clipped double Q: V and generation use the min of their targets)."""
    standardize_returns: bool = True
    """Standardize the rewards over the dataset, (r − mean)/std (trlX)."""
    num_layers_unfrozen: int = -1
    """Top decoder blocks of the LM trained (with the final norm); -1 = all, 0 = LM frozen (heads only)."""
    lora_r: int = 0
    """LoRA rank on every linear layer of the LM; 0 = no LoRA (then num_layers_unfrozen applies)."""
    lora_alpha: int = 16
    """LoRA alpha."""
    q_head: str = "mlp"
    """Q heads: 'mlp' (trlX: h → 2h → vocab) or 'unembedding' (h → 2h → d read out through the LM's
    frozen unembedding, zero at init; see ankus.models.heads.UnembeddingQHead)."""


@dataclass
class ILQLData:
    dataset: str = "randomwalks"
    """'randomwalks' (built-in, trlX's) or a JSONL file of {prompt, completion, reward} rows."""
    template: str = "{prompt}"
    """Format string applied to every prompt (training rows and eval prompts); {prompt} is the raw prompt."""
    seq_length: int = 64
    """Most tokens per sample (prompt + completion + EOS); longer completions are cut."""
    append_eos: bool = True
    """End each completion with EOS, which then carries the reward (trlX)."""
    walks_seed: int = 1000
    """Seed of the random-walks graph and walks (trlX: train.seed = 1000)."""
    eval_prompts: str = ""
    """Held-out prompts: review_openings (eval split), randomwalks (start nodes), a .txt/.jsonl file; empty = by dataset."""
    num_eval: int = 0
    """Use only the first this many eval prompts; 0 = all."""


@dataclass
class ILQLEval:
    betas: list[float] = field(default_factory=lambda: [1.0])
    """β values every evaluation samples with (trlX sweeps [0, 1, 100] on random walks)."""
    reward: str = ""
    """Scorer of eval samples: sentiment, randomwalks, or 'module:function'; empty = by dataset."""
    samples_per_prompt: int = 1
    """Samples drawn per eval prompt and β."""
    every: int = 0
    """Evaluate every this many steps (plus before and after training); 0 = before and after only."""
    batch_size: int = 64
    """Generation batch size."""
    seed: int = 12345
    """Sampling seed of evaluations (the same for every β and every evaluation)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LM: a load_model spec, or 'randomwalks-gpt2' (trlX's from-scratch GPT-2 with a per-node tokenizer)."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=5e-5, batch_size=128, total_steps=1000))
    """Optimisation (trlX's ILQL defaults: lr 5e-5, batch 128); total_steps counts optimizer steps."""
    method: ILQLMethod = field(default_factory=ILQLMethod)
    """ILQL hyper-parameters (trlX's defaults)."""
    data: ILQLData = field(default_factory=ILQLData)
    """Offline samples and eval prompts."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=56, top_k=20))
    """Eval sampling (trlX: max_new_tokens 56, top_k 20); β comes from eval.betas."""
    eval: ILQLEval = field(default_factory=ILQLEval)
    """The β sweep and its scorer."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# the random-walks model: trlX's GPT2Config(n_layer=6, n_embd=144) and one token per node


def letter_tokenizer():
    """A tokenizer with one token per letter a-z, '|' and ``<|endoftext|>`` (EOS = pad = BOS).

    Whitespace is dropped before splitting, so "d f a", "d|f|a" and "dfa" all encode as the three
    node tokens (SmolLM2's BPE would merge "dfa"); decoding joins tokens with spaces.
    """
    from string import ascii_lowercase

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(ascii_lowercase)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Replace(Regex(r"\s+"), "")
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<unk>")


def randomwalks_gpt2(seed: int = 0):
    """(model, tokenizer): trlX's from-scratch ``GPT2Config(n_layer=6, n_embd=144)`` (12 heads,
    ~1.5M parameters) over :func:`letter_tokenizer`'s 29 tokens. A vocabulary-sized Q head on
    SmolLM2's 49k tokens would cost ~100x more per step for the same 21-node task."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = letter_tokenizer()
    config = GPT2Config(n_layer=6, n_embd=144, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _load_lm(mc: ModelConfig):
    if mc.spec == RANDOMWALKS_SPEC:
        model, tok = randomwalks_gpt2(mc.seed)
        return model.to(getattr(torch, mc.dtype)), tok
    from ankus.models.loading import load_model

    model, tok = load_model(mc.spec, dtype=mc.dtype, seed=mc.seed)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _prepare_trainable(model, method: ILQLMethod):
    """LoRA adapters, or trlX-style top-N unfreezing; returns the model to train."""
    if method.lora_r > 0:
        from ankus.config import LoRAConfig
        from ankus.models.lora import apply_lora

        return apply_lora(model, LoRAConfig(True, method.lora_r, method.lora_alpha))
    from ankus.models.hydra import freeze_for_hydra

    freeze_for_hydra(model, method.num_layers_unfrozen)
    return model


# ---------------------------------------------------------------------------------------------
# data


def load_samples(data: ILQLData) -> tuple[list[str], list[str], list[float]]:
    """(prompts, completions, rewards) of the offline dataset (raw prompts, template not applied)."""
    if data.dataset == "randomwalks":
        from ankus.rewards.randomwalks import generate_random_walks

        task = generate_random_walks(seed=data.walks_seed)
        # Nodes space-separated: the same text works with per-node and BPE tokenizers.
        prompts = [w[0] for w in task.walks]
        completions = [" " + " ".join(w[1:]) for w in task.walks]
        return prompts, completions, [task.optimality(w) for w in task.walks]
    path = Path(data.dataset)
    if not path.exists():
        hint = (" Build the offline sentiment set with: ankus make-sentiment-dataset --out " + str(path)
                if "sentiment" in path.name else "")
        raise FileNotFoundError(f"ILQL dataset not found: {path} (or use the built-in 'randomwalks').{hint}")
    from ankus.data.io import DataError, read_jsonl

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


# ---------------------------------------------------------------------------------------------
# forward, step


def _target_q_at(head: torch.nn.Module, hidden: Tensor, actions: Tensor) -> Tensor:
    """A target Q head's value at the taken tokens only: (B, T, H), (B, T) -> (B, T).

    The loss reads target Q̂(s, a) at the data token alone, so instead of the (B, T, V) output
    this takes the rows of the last layer's weight for those tokens: 2H multiply-adds per step
    instead of 2H·V (on a 49k vocabulary the two target heads were half the cost of a step)."""
    return q_at(head, hidden, actions)


def ilql_forward(model, heads: ILQLHeads, batch: dict[str, Tensor]):
    """The loss inputs of one batch, trimmed to the steps from the first action of any row.

    Returns ``(logits, qs, target_qs, vs, actions, rewards, dones, mask)``: logits (B, T, V),
    qs a tuple of (B, T, V), vs (B, T + 1) (V of the state after the last step included), the
    rest (B, T). Skipping the prompt-only steps saves the vocabulary-sized Q heads most of their
    work on long prompts. ``target_qs`` are (B, T, V) *views* that hold Q̂(s_t, a_t) in every
    column (see :func:`_target_q_at`): :func:`ankus.losses.ilql.ilql_loss` only reads the taken
    token's column, so the loss is the same as with the full target heads.
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
        target_qs = tuple(_target_q_at(q, states, actions).unsqueeze(-1).expand(-1, -1, V)
                          for q in heads.target_q_heads)
    vs = heads.v_head(hidden).squeeze(-1)  # (B, T + 1)
    logits = out.logits[:, :-1]  # (B, T, V)
    return logits, qs, target_qs, vs, actions, batch["rewards"][:, sl], batch["dones"][:, sl], batch["mask"][:, sl]


def _trunk_frozen(model) -> bool:
    return not any(p.requires_grad for p in model.parameters())


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


def train_step(model, heads: ILQLHeads, batch: dict[str, Tensor], opt: torch.optim.Optimizer, params: list[Tensor],
               method: ILQLMethod, step: int, *, max_grad_norm: float = 1.0, grad_accum: int = 1,
               scheduler=None, guard=None) -> dict[str, float]:
    """One optimizer step on ``batch`` (split into ``grad_accum`` micro-batches), then the Polyak
    sync of the target heads when ``step`` (1-based count of optimizer steps) is a multiple of
    ``steps_for_target_q_sync``. Returns float stats; ``skipped`` = 1 when the guard refused.

    Under several processes ``batch`` is this process's block of the global batch: each
    micro-batch is weighted by its share of the *global* count of masked steps, gradients are
    summed over processes before clipping, and the returned stats are the global batch's.
    A :func:`cached_collate` batch (frozen LM) runs the heads alone (``model`` is unused)."""
    B = batch["mask"].shape[0]
    n_total = max(distributed.sum_floats(float(batch["mask"].sum()))[0], 1.0)  # masked steps, all processes
    size = max(1, math.ceil(B / grad_accum))
    chunks = [range(s, min(B, s + size)) for s in range(0, B, size)]
    totals: dict[str, float] = {}
    losses = []
    for rows in chunks:
        idx = torch.tensor(list(rows))
        micro = {k: v[idx] for k, v in batch.items()}
        if "hidden" in micro:
            logits, qs, target_qs, vs, actions, rewards, dones, mask, lm_ce = cached_forward(
                heads, micro, full_q=method.cql_scale != 0)
        else:
            (logits, qs, target_qs, vs, actions, rewards, dones, mask), lm_ce = ilql_forward(model, heads, micro), None
        loss, stats = ilql_loss(logits, qs, target_qs, vs, actions, rewards, dones, mask, gamma=method.gamma,
                                tau=method.tau, cql_scale=method.cql_scale, awac_scale=method.awac_scale,
                                awac_beta=method.awac_beta, lm_ce=lm_ce)
        # every term is a mean over masked steps: weighting by the share of steps gives the full-batch mean
        share = float(mask.sum()) / n_total
        (loss * share).backward()
        losses.append(float(loss.detach()) * share)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v) * share
    distributed.sync_gradients(params)
    # each process's share-weighted sums add up to the global batch's means (one collective)
    keys = sorted(totals)
    reduced = distributed.sum_floats(sum(losses), *(totals[k] for k in keys))
    total_loss, totals = reduced[0], dict(zip(keys, reduced[1:]))
    grad_norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0
                 else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
    ok = guard.check(total_loss, grad_norm) if guard is not None else bool(torch.isfinite(grad_norm))
    if ok:
        opt.step()
        if scheduler is not None:
            scheduler.step()
    opt.zero_grad(set_to_none=True)
    if ok and step % method.steps_for_target_q_sync == 0:
        heads.sync_target_q_heads(method.alpha)
    totals["grad_norm"] = float(grad_norm)
    totals["skipped"] = 0.0 if ok else 1.0
    return totals


# ---------------------------------------------------------------------------------------------
# generation


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

    Prompts are encoded and left-padded as in :func:`ankus.generation.engine.generate`, and a
    token is drawn for every row at every step (finished rows are padded, not dropped), so with
    β = 0 and ``ignore_eos`` the draws are those of the plain engine under the same generator.
    Rows end at EOS or a stop string. ``logprobs`` are the raw LM's log-probs of the drawn tokens.
    """
    from transformers import DynamicCache

    prompt_ids = encode_prompts(tok, prompts, config.chat_template)
    eos = [] if config.ignore_eos else eos_token_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    try:
        size = batch_size or len(prompt_ids)
        for s in range(0, len(prompt_ids), size):
            chunk = prompt_ids[s:s + size]
            B, N = len(chunk), config.max_new_tokens
            ids, mask = (t.to(device) for t in left_pad(chunk, pad_id))
            response = torch.full((B, N), pad_id, dtype=torch.long, device=device)
            response_mask = torch.zeros((B, N), dtype=torch.long, device=device)
            logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            eos_t = torch.tensor(eos or [-1], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: first real token at 0
            cache = DynamicCache(config=model.config)
            if N:
                logits, hidden = _last_hidden_and_logits(model, input_ids=ids, attention_mask=mask,
                                                         position_ids=positions, cache=cache)
            positions = positions[:, -1:]
            texts_so_far: list[list[int]] = [[] for _ in range(B)]
            for t in range(N):
                scores = _guided_scores(logits, hidden, heads, beta)  # (B, V)
                tokens = sample_tokens(scores, config, generator)  # (B,)
                live = ~done
                response[:, t] = torch.where(live, tokens, torch.full_like(tokens, pad_id))
                response_mask[:, t] = live.long()
                logprobs[:, t] = torch.where(live, token_logps(logits, tokens), torch.zeros((), device=device))
                done = done | torch.isin(tokens, eos_t)
                if config.stop_strings:
                    for r in range(B):
                        if live[r]:
                            texts_so_far[r].append(int(tokens[r]))
                            text = tok.decode(texts_so_far[r], skip_special_tokens=True)
                            done[r] |= any(st in text for st in config.stop_strings)
                if bool(done.all()) or t == N - 1:
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
                positions = positions + 1
                logits, hidden = _last_hidden_and_logits(model, input_ids=tokens[:, None], attention_mask=mask,
                                                         position_ids=positions, cache=cache)
            texts = []
            for r in range(B):
                text = tok.decode(response[r, : int(response_mask[r].sum())].tolist(), skip_special_tokens=True)
                cut = min((i for i in (text.find(st) for st in config.stop_strings) if i >= 0), default=-1)
                texts.append(text[:cut] if cut >= 0 else text)
            outputs.append(GenerationOutput(ids, mask[:, : ids.shape[1]], response, response_mask, logprobs, texts))
    finally:
        model.train(was_training)
    if len(outputs) == 1:
        return outputs[0]
    P = max(o.prompt_ids.shape[1] for o in outputs)
    N = max(o.response_ids.shape[1] for o in outputs)

    def pad(x: Tensor, width: int, value, left: bool) -> Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value) if extra else x

    return GenerationOutput(torch.cat([pad(o.prompt_ids, P, pad_id, True) for o in outputs]),
                            torch.cat([pad(o.prompt_mask, P, 0, True) for o in outputs]),
                            torch.cat([pad(o.response_ids, N, pad_id, False) for o in outputs]),
                            torch.cat([pad(o.response_mask, N, 0, False) for o in outputs]),
                            torch.cat([pad(o.logprobs, N, 0.0, False) for o in outputs]),
                            [t for o in outputs for t in o.texts])


# ---------------------------------------------------------------------------------------------
# evaluation


def _eval_prompts(data: ILQLData) -> list[str]:
    source = data.eval_prompts or ("randomwalks" if data.dataset == "randomwalks" else "review_openings")
    if source == "review_openings":
        from ankus.data.assets import review_openings

        prompts = review_openings("eval")
    elif source == "randomwalks":
        from ankus.rewards.randomwalks import generate_random_walks

        prompts = generate_random_walks(seed=data.walks_seed).prompts
    else:
        from ankus.data.prompts import load_prompts

        prompts = load_prompts(source, "eval")
    return prompts[: data.num_eval] if data.num_eval else prompts


def _eval_scorer(cfg: Config) -> Callable:
    from ankus.rewards import get_reward_fn

    name = cfg.eval.reward or ("randomwalks" if cfg.data.dataset == "randomwalks" else "sentiment")
    return get_reward_fn(name, seed=cfg.data.walks_seed) if name == "randomwalks" else get_reward_fn(name)


def _beta_key(beta: float) -> str:
    return f"beta={beta:g}"


def evaluate(model, heads, tok, prompts: list[str], cfg: Config, betas: Sequence[float], scorer: Callable
             ) -> tuple[dict[str, float], list[dict]]:
    """Mean score of samples at each β (same seed for every β); returns ({"beta=1": mean}, rows)."""
    from ankus.rewards import check_rewards

    raw = [p for p in prompts for _ in range(cfg.eval.samples_per_prompt)]
    templated = [cfg.data.template.format(prompt=p) for p in raw]
    means, rows = {}, []
    for beta in betas:
        gen = torch.Generator().manual_seed(cfg.eval.seed)
        out = ilql_generate(model, heads, tok, templated, cfg.generation, beta, generator=gen,
                            batch_size=cfg.eval.batch_size)
        # walks are scored on "start rest"; texts join with a space (delimiters are ignored there)
        scores = scorer(samples=[p + " " + o for p, o in zip(templated, out.texts)], prompts=templated,
                        outputs=out.texts)
        check_rewards(scores, len(templated), batch_index="eval")
        means[_beta_key(beta)] = sum(float(s) for s in scores) / len(scores)
        rows += [{"beta": beta, "prompt": p, "output": o, "score": float(s)}
                 for p, o, s in zip(raw, out.texts, scores)]
    return means, rows


# ---------------------------------------------------------------------------------------------
# saving and loading


def _make_heads(m: ILQLMethod, hidden_size: int, vocab_size: int, model) -> ILQLHeads:
    if m.q_head not in ("mlp", "unembedding"):
        raise ValueError(f"method.q_head must be 'mlp' or 'unembedding', got {m.q_head!r}")
    unembedding = model.get_output_embeddings().weight.float() if m.q_head == "unembedding" else None
    return ILQLHeads(hidden_size, vocab_size, two_qs=m.two_qs, alpha=m.alpha, unembedding=unembedding)


def save_ilql(model, heads: ILQLHeads, tok, path: str | Path) -> Path:
    """The LM in Hugging Face format (LoRA merged) plus ``ilql_heads.safetensors`` and
    ``ilql_heads.json`` (its shape) in the same directory."""
    from safetensors.torch import save_file

    from ankus.runs import save_hf_model

    path = save_hf_model(model, tok, path)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()},
              str(path / "ilql_heads.safetensors"))
    first = heads.v_head[0]
    (path / "ilql_heads.json").write_text(json.dumps({
        "hidden_size": first.in_features, "vocab_size": heads.vocab_size, "two_qs": len(heads.q_heads) == 2, "alpha": heads.alpha,
        "q_head": "mlp" if isinstance(heads.q_heads[0], torch.nn.Sequential) else "unembedding"}))
    return path


def load_ilql(path: str | Path):
    """(model, tokenizer, heads) from a directory written by :func:`save_ilql`."""
    from safetensors.torch import load_file

    from ankus.models.loading import load_model

    path = Path(path)
    model, tok = load_model(str(path))
    meta = json.loads((path / "ilql_heads.json").read_text())
    method = ILQLMethod(two_qs=meta["two_qs"], alpha=meta["alpha"], q_head=meta.get("q_head", "mlp"))
    heads = _make_heads(method, meta["hidden_size"], meta["vocab_size"], model)
    heads.load_state_dict(load_file(str(path / "ilql_heads.safetensors")))
    heads.eval()
    return model, tok, heads


# ---------------------------------------------------------------------------------------------
# training


def _batches(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Row indices of the batch for 0-based ``step``: epoch e is a fixed permutation seeded by
    (seed, e), cut into full batches (the remainder is dropped; it changes from epoch to epoch).
    Determined by the step alone, so a resumed run sees the same data."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[pos * batch_size:(pos + 1) * batch_size]


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ILQL on the configured offline samples; returns a summary (run_dir, eval means per β,
    the base model's mean, wall time)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint
    from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, truncate_metrics
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    m, tc = cfg.method, cfg.trainer
    if m.steps_for_target_q_sync < 1:
        raise ValueError("method.steps_for_target_q_sync must be >= 1")
    ds = distributed.setup()
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "ilql", cfg, exist_ok=resume)

    device = distributed.resolve_device(tc.device)
    model, tok = _load_lm(cfg.model)
    model.to(device)
    prompts, completions, rewards = load_samples(cfg.data)
    returns = standardize_returns(rewards) if m.standardize_returns else list(rewards)
    p_ids, c_ids = tokenize_samples(tok, prompts, completions, template=cfg.data.template,
                                    chat_template=cfg.generation.chat_template, seq_length=cfg.data.seq_length,
                                    append_eos=cfg.data.append_eos)
    pad_id = tok.pad_token_id
    eval_prompts = _eval_prompts(cfg.data)
    scorer = distributed.main_only(lambda: _eval_scorer(cfg))  # rank 0 evaluates

    hidden_size = model.config.get_text_config().hidden_size
    vocab_size = model.get_output_embeddings().weight.shape[0]
    heads = _make_heads(m, hidden_size, vocab_size, model).to(device)
    policy = _prepare_trainable(model, m)
    params = [p for p in policy.parameters() if p.requires_grad] + [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    warmup = max(tc.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    guard = NonFiniteGuard(tc.max_bad_steps)
    modules = {"model": policy, "heads": heads}

    start, base = 0, None
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules=modules, optimizer=opt, scheduler=scheduler)
        distributed.restore_rank_rng(ckpt)
        start, base = state["step"], state.get("base")
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)
    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    samples_path = run_dir / "eval_samples.jsonl"
    frozen = _trunk_frozen(policy)
    # β = 0 ignores the heads: with a frozen LM its samples (same seed) never change, so the base
    # evaluation's stand for every later β = 0 instead of being sampled again
    beta0_rows: list[dict] = []
    ses: dict[str, float] = {}  # standard error of each β's latest mean

    def eval_on_main(step: int, betas: Sequence[float], tag: str) -> dict[str, float]:
        reuse = frozen and bool(beta0_rows)
        todo = [b for b in betas if not (reuse and b == 0)]
        heads.eval()
        try:
            means, rows = evaluate(policy, heads, tok, eval_prompts, cfg, todo, scorer) if todo else ({}, [])
        finally:
            heads.train()
        if frozen and not beta0_rows:
            beta0_rows.extend(r for r in rows if r["beta"] == 0)
        if reuse and len(todo) < len(betas):
            rows = [dict(r) for r in beta0_rows] + rows
        by_beta = {_beta_key(b): [r["score"] for r in rows if r["beta"] == b] for b in betas}
        means = {k: sum(v) / len(v) for k, v in by_beta.items()}
        for k, v in by_beta.items():
            sd = math.sqrt(sum((x - means[k]) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            ses[k] = sd / math.sqrt(len(v))
        logger.log(step, {**{f"eval/{tag}{k}": v for k, v in means.items()},
                          **{f"eval_se/{tag}{k}": ses[k] for k in means}})
        with open(samples_path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "tag": tag, **r}) + "\n")
        return means

    def run_eval(step: int, betas: Sequence[float], tag: str) -> dict[str, float]:
        # the replicas are identical: rank 0 samples, scores and writes; every rank gets the means
        return distributed.on_main(eval_on_main, step, betas, tag)

    def checkpoint(step: int) -> None:
        rngs = distributed.rank_rng_states()  # collective: every rank's RNG, saved by rank 0
        distributed.on_main(save_checkpoint, run_dir, step, modules=modules, optimizer=opt, scheduler=scheduler,
                            generators=rngs, extra={"base": base}, keep_last=tc.keep_last)

    if base is None:  # the untrained LM (β = 0; the heads are random): the baseline to beat
        base = run_eval(0, [0.0], "base_")[_beta_key(0.0)]
    n_trainable = sum(p.numel() for p in params)
    cache = None
    if frozen:  # the LM never changes: its hidden states are computed once, steps run the heads alone
        t0 = time.perf_counter()
        cache = cache_trunk(policy, p_ids, c_ids, pad_id, dtype=heads.v_head[0].weight.dtype)
        if ds.is_main:
            print(f"cached the frozen LM's hidden states of {len(cache)} samples in {time.perf_counter() - t0:.0f} s")
    policy.train()
    heads.train()
    step = start
    stopped = False
    bar = tqdm(range(start, tc.total_steps), desc="ilql", disable=not cfg.run.progress or not ds.is_main)
    global_batch = min(tc.batch_size * ds.world_size, len(p_ids))  # batch_size samples per process
    with GracefulExit() as stop:
        for step0 in bar:
            step = step0 + 1
            # one global batch, the same on every process; this process takes its block
            idx = distributed.shard(_batches(len(p_ids), global_batch, step0, tc.seed))
            if cache is not None:
                batch = cached_collate([cache[i] for i in idx], [c_ids[i] for i in idx], [returns[i] for i in idx])
            else:
                batch = ilql_collate([p_ids[i] for i in idx], [c_ids[i] for i in idx], [returns[i] for i in idx],
                                     pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            t0 = time.perf_counter()
            stats = train_step(policy, heads, batch, opt, params, m, step, max_grad_norm=tc.max_grad_norm,
                               grad_accum=tc.grad_accum, scheduler=scheduler, guard=guard)
            stats.update({"lr": scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0,
                          "perf/trainable_params": n_trainable})
            if step % tc.log_every == 0 or step == tc.total_steps:
                logger.log(step, stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", adv=f"{stats['values/advantage']:.3f}")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < tc.total_steps:
                run_eval(step, cfg.eval.betas, "")
                policy.train()
            last = step == tc.total_steps
            stopping = distributed.any_rank(stop.requested)  # a signal that reached one process stops all
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0 and not last) or stopping:
                checkpoint(step)
            if stopping:
                stopped = True
                break
    policy.eval()
    final = {} if stopped else run_eval(step, cfg.eval.betas, "")
    logger.close()
    keys = ["loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "values/advantage"]
    keys += [f"eval/{_beta_key(b)}" for b in cfg.eval.betas]
    distributed.on_main(plot_metrics, run_dir, keys, title="ILQL")
    if cfg.run.save_model and not stopped:
        distributed.on_main(save_ilql, policy, heads, tok, run_dir / "model")
    wall = time.perf_counter() - t_start
    summary = {"run_dir": str(run_dir), "steps": step, "base": base, "eval": final,
               "eval_se": {k: ses[k] for k in final if k in ses}, "wall_time_s": wall,
               "stopped_early": stopped, "skipped_steps": guard.skipped}
    distributed.on_main((run_dir / "summary.json").write_text, json.dumps(summary, indent=2))
    if final and ds.is_main:
        sweep = "  ".join(f"{k}: {v:+.3f}" + (f" ± {ses[k]:.3f}" if k in ses else "") for k, v in final.items())
        print(f"\nILQL: base {base:+.3f}   {sweep}   ({wall:.0f} s)   run: {run_dir}")
    return summary
