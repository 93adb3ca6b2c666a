"""PPO's rollouts: sampling them, scoring them (reward function, behaviour and reference
log-probs, values) and the policy forwards the update reuses.

Unlike the rest of ``ankus.rl`` this module runs models; it holds no loss math. A batch of
rollouts is one :class:`Rollouts` (tensors over the same B rows); ``rollouts[idx]`` takes rows,
so a PPO minibatch is a ``Rollouts`` too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ankus import distributed
from ankus.data.tokens import pad_id, position_ids_from_mask
from ankus.generation.engine import GenerationConfig, GenerationOutput, concat_outputs, generate
from ankus.generation.onednn import PACKED, PACKED_BF16, PLAIN, linear_path
from ankus.generation.packing import release_packed
from ankus.generation.path_timing import fastest_path
from ankus.losses.ppo import head_logprobs, logprobs_from_logits, rows_per_chunk, token_entropy
from ankus.models.heads import output_head_bypassed
from ankus.models.prefix import head_is_plain, shared_prompt_hidden, shared_prompt_states
from ankus.rewards import RewardError, check_rewards

logger = logging.getLogger("ankus.rl")

__all__ = ["Rollouts", "Scored", "policy_forward", "shared_forward", "response_logprobs", "score_rollouts",
           "scored_rollouts", "rollout_config", "generate_rollouts", "call_reward", "call_reward_here_or_on_main",
           "rewards_everywhere", "scores_tensor", "scalar", "has_dropout", "update_forward", "shares_prompts",
           "behaviour_from_update"]


@dataclass
class Rollouts:
    """One batch of scored rollouts, B rows (P prompt and N response positions)."""

    input_ids: Tensor
    """(B, P+N) prompt (left padded) then response (right padded)."""
    attention_mask: Tensor
    """(B, P+N) long."""
    response_ids: Tensor
    """(B, N)."""
    mask: Tensor
    """(B, N) float: response tokens (an empty response keeps its first position)."""
    scores: Tensor
    """(B,) sequence scores or (B, N) per-token scores, clipped (scaled later)."""
    ref_logps: Tensor
    """(B, N) reference log-probs."""
    logps: Tensor | None = None
    """(B, N) behaviour log-probs; None when the update's own forward supplies them."""
    values: Tensor | None = None
    """(B, N) value estimates (GAE only)."""
    hidden: Tensor | None = None
    """(B, P+N, H) policy hidden state at the Hydra split (the trunk cache), or None."""
    advantages: Tensor | None = None
    """(B, N), set after scoring."""
    returns: Tensor | None = None
    """(B, N) value targets (GAE only)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> "Rollouts":
        """The rows ``idx`` (a LongTensor or slice) of every tensor."""
        return Rollouts(**{f.name: None if (v := getattr(self, f.name)) is None else v[idx]
                           for f in dataclasses.fields(self)})

    @property
    def n_resp(self) -> int:
        return self.response_ids.shape[1]

    def gathered(self) -> "Rollouts":
        """Every process's rows, concatenated in rank order (a collective; itself with one process)."""
        if not distributed.state().enabled:
            return self
        return Rollouts(**{f.name: None if (v := getattr(self, f.name)) is None else distributed.all_gather_cat(v)
                           for f in dataclasses.fields(self)})


class Scored(NamedTuple):
    """What the scoring forward gives, each (B, N) but ``hidden`` (B, P+N, H); None where not asked."""

    logps: Tensor | None
    values: Tensor | None
    ref_logps: Tensor
    hidden: Tensor | None


# ---------------------------------------------------------------------------------------------
# forwards


def policy_forward(model, value_head, input_ids, attention_mask, n_resp: int, need_hidden_at: int | None = None):
    """Forward over prompt+response; returns the response tokens' logits (B, N, V), values (B, N)
    and, when asked, the hidden state entering decoder layer ``need_hidden_at`` (for Hydra)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True, logits_to_keep=n_resp + 1, use_cache=False)
    logits = out.logits[:, :-1]  # (B, N, V): position t predicts response token t
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, -n_resp - 1:-1])  # (B, N): state before each token
    hidden = out.hidden_states[need_hidden_at] if need_hidden_at is not None else None
    return logits, values, hidden


def shared_forward(policy, value_head, ids, am, resp, n_resp: int):
    """Log-probs of ``resp`` (b, N), next-token entropies (b, N, no grad) and values (or None),
    each distinct prompt run once (:func:`ankus.models.prefix.shared_prompt_hidden`)."""
    P = ids.shape[1] - n_resp
    hidden = shared_prompt_hidden(policy, ids[:, :P], am[:, :P], resp, am[:, P:])  # (b, N, H)
    logps, entropy = head_logprobs(hidden, policy.get_output_embeddings(), resp)
    return logps, entropy, (value_head(hidden) if value_head is not None else None)


def response_logprobs(policy, forward: Callable, resp: Tensor):
    """``forward() -> (logits, values)`` run with the policy's output head bypassed, so that its
    (b, N, V) logits are never held at once: log-probs of ``resp`` (b, N), with grad, next-token
    entropies (b, N), without, and the values, from ``head_logprobs``. A model that transforms its
    logits after the head (soft-capping, scaling) runs ``forward`` again, as it is."""
    with output_head_bypassed(policy) as untouched:
        final_hidden, values = forward()  # (b, N, H) where the logits would be
    if untouched(final_hidden):
        logps, entropy = head_logprobs(final_hidden, policy.get_output_embeddings(), resp)
        return logps, entropy, values
    del final_hidden, values  # (and the first forward's graph) before the second forward
    logits, values = forward()
    with torch.no_grad():
        entropy = token_entropy(logits)
    return logprobs_from_logits(logits, resp), entropy, values


def update_forward(policy, value_head, trunk, mb: Rollouts, shared: bool):
    """The PPO update's forward over the rows ``mb``: log-probs of the responses (b, N), with grad,
    next-token entropies (b, N), without, and values (b, N) or None. From the trunk cache's split
    state where ``mb.hidden`` holds it (Hydra: only the top blocks run), else each distinct prompt
    once (``shared``), else a full forward with the output head run in row chunks."""
    if trunk is not None and mb.hidden is not None:
        return response_logprobs(policy, lambda: trunk.forward(value_head, mb.hidden, mb.attention_mask, mb.n_resp),
                                 mb.response_ids)
    if shared:  # each distinct prompt once (k responses per prompt)
        return shared_forward(policy, value_head, mb.input_ids, mb.attention_mask, mb.response_ids, mb.n_resp)
    return response_logprobs(
        policy, lambda: policy_forward(policy, value_head, mb.input_ids, mb.attention_mask, mb.n_resp)[:2],
        mb.response_ids)


# ---------------------------------------------------------------------------------------------
# scoring


def score_rollouts(policy, value_head, reference, input_ids, attn, response_ids, n_resp: int, chunk: int,
                   keep_hidden: bool = False, behaviour: bool = True, shared: bool = False) -> Scored:
    """Behaviour log-probs, values and reference log-probs, in chunks, without grad.

    ``keep_hidden`` (Hydra) adds the hidden state at the split, (B, T, H), for ``TrunkCache``.
    ``behaviour=False`` (no value head, no Hydra): only the reference runs; ``logps`` is None.
    ``shared``: each distinct prompt runs once per chunk of ``chunk`` rows (no (rows, N + 1, V)
    logits are made by the policy). Otherwise a chunk is at most ``chunk`` rows, and fewer where
    its (rows, N + 1, V) logits would pass ``rows_per_chunk``'s budget; a row's numbers do not
    depend on the rows beside it (bit for bit for SmolLM2 in fp32 on the CPU; at most float
    rounding in the matrix products elsewhere)."""
    if not behaviour and (value_head is not None or keep_hidden or reference.hidden_index is not None):
        raise ValueError("the policy forward can be skipped only without a value head and a Hydra reference")
    logit_rows = min(chunk, rows_per_chunk(n_resp + 1, policy.get_output_embeddings().weight.shape[0]))
    step = chunk if shared else logit_rows
    parts = [_score_chunk(policy, value_head, reference, input_ids[s:s + step], attn[s:s + step],
                          response_ids[s:s + step], n_resp, logit_rows, behaviour, shared)
             for s in range(0, input_ids.shape[0], step)]
    logps, values, ref_logps, hidden = zip(*parts)
    return Scored(torch.cat(logps) if behaviour else None, torch.cat(values) if value_head is not None else None,
                  torch.cat(ref_logps), torch.cat(hidden) if keep_hidden else None)


@torch.no_grad()
def reference_shared_prompt_logps(reference, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                                  response_mask: Tensor) -> Tensor:
    """The reference's log-probs of the response tokens (B, N), float32, each distinct prompt run
    once (:func:`ankus.models.prefix.shared_prompt_hidden`); a ``"copy"`` or ``"lora"`` reference."""
    with reference.frozen_model() as base:
        hidden = shared_prompt_hidden(base, prompt_ids, prompt_mask, response_ids, response_mask)  # (B, N, H)
        return head_logprobs(hidden, base.get_output_embeddings(), response_ids)[0]


def _score_chunk(policy, value_head, reference, ids, am, resp, n_resp: int, logit_rows: int, behaviour: bool,
                 shared: bool) -> Scored:
    """:func:`score_rollouts` on one chunk of rows (``hidden`` is returned whenever computed)."""
    P = ids.shape[1] - n_resp
    if shared and reference.hidden_index is not None:  # Hydra: the branch starts from the rows' state at the split
        final, at_split = shared_prompt_states(policy, ids[:, :P], am[:, :P], resp, am[:, P:],
                                               reference.hidden_index)  # (b, N, H), (b, P + N, H)
        logps = head_logprobs(final, policy.get_output_embeddings(), resp)[0]
        values = value_head(final) if value_head is not None else None
        # the branch makes (rows, N + 1, V) logits: at most ``logit_rows`` rows at a time
        ref = torch.cat([reference.logps(ids[r:r + logit_rows], am[r:r + logit_rows], at_split[r:r + logit_rows],
                                         n_resp) for r in range(0, ids.shape[0], logit_rows)])
        return Scored(logps, values, ref, at_split)
    if shared:
        logps, _, values = shared_forward(policy, value_head, ids, am, resp, n_resp) if behaviour else (None,) * 3
        return Scored(logps, values, reference_shared_prompt_logps(reference, ids[:, :P], am[:, :P], resp, am[:, P:]), None)
    logps = values = hidden = None
    if behaviour:
        logits, values, hidden = policy_forward(policy, value_head, ids, am, n_resp, reference.hidden_index)
        logps = logprobs_from_logits(logits, resp)
        del logits  # before the reference makes its own
    return Scored(logps, values, reference.logps(ids, am, hidden, n_resp), hidden)


def scored_rollouts(policy, value_head, reference, out: GenerationOutput, raw: list, *, cliprange_reward: float,
                    chunk: int, keep_hidden: bool = False, behaviour: bool = True, shared: bool = False) -> Rollouts:
    """Every process's rollouts, scored: ``out`` (this process's samples) and ``raw`` (their
    validated rewards, clipped to ±``cliprange_reward``), with the log-probs and values of
    :func:`score_rollouts` (same keywords), gathered over processes (the global batch)."""
    mask = out.response_mask.float()  # (B, N)
    if not bool((mask.sum(1) > 0).all()):
        mask[:, 0] = 1.0  # an empty response still carries its score on one token
    scores = scores_tensor(raw, mask).clamp(-cliprange_reward, cliprange_reward)
    input_ids = torch.cat([out.prompt_ids, out.response_ids], 1)  # (B, P+N)
    attn = torch.cat([out.prompt_mask, mask.long()], 1)
    with torch.no_grad(), distributed.full_params(policy):
        scored = score_rollouts(policy, value_head, reference, input_ids, attn, out.response_ids,
                                out.response_ids.shape[1], chunk, keep_hidden=keep_hidden, behaviour=behaviour,
                                shared=shared)
    return Rollouts(input_ids, attn, out.response_ids, mask, scores, scored.ref_logps, scored.logps, scored.values,
                    scored.hidden).gathered()


def shares_prompts(policy, m) -> bool:
    """Whether forwards run each distinct prompt once (``m``: the PPO method section): k responses
    per prompt, ``m.share_prompts``, and logits that are the output head's alone (checked once).
    Under Hydra the scoring forward shares prompts and rebuilds the whole rows' state at the split
    for the branch and the trunk cache; the update runs the top blocks from that cache over rows."""
    return m.share_prompts and m.samples_per_prompt > 1 and head_is_plain(policy)


def behaviour_from_update(m, batch_size: int, reference, policy) -> bool:
    """Whether the behaviour log-probs are taken from the update's own forward (``m``: the PPO
    method section, ``m.reuse_update_forward``). Exact when nothing reads them before the update
    and that update is the first and only one on these rollouts (GRPO: advantages do not use
    them; one epoch of one minibatch), the reference needs no policy hidden state (not Hydra), and
    the no-grad (eval) and training forwards compute the same function (no dropout)."""
    return (m.reuse_update_forward and m.estimator == "grpo" and m.ppo_epochs == 1 and m.num_rollouts <= batch_size
            and reference.hidden_index is None and not has_dropout(policy))


def has_dropout(model) -> bool:
    """Whether a training-mode forward may differ from an eval-mode one (dropout modules, or a
    config's attention/hidden dropout probability above 0)."""
    if any(isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in model.modules()):
        return True
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in (vars(config).items() if config is not None else ())
               if (k.endswith("dropout") or k.endswith("_pdrop")) and not k.startswith(("classifier", "summary")))


# ---------------------------------------------------------------------------------------------
# sampling and rewards


def rollout_config(policy, gen_cfg: GenerationConfig, bf16: bool | str, rows: int = 16) -> GenerationConfig:
    """``gen_cfg`` with bf16 packed linears where asked for and this machine runs them (CPU
    oneDNN). ``bf16=True``: wherever they run, else fp32 with a warning saying why. ``"auto"``: only
    where the policy's linear layers at ``rows`` rows are measured ``BF16_MARGIN`` faster in bf16
    than in fp32 (:func:`ankus.generation.path_timing.fastest_path`, the times combined over the
    processes so that all choose alike); else unchanged, without a warning."""
    if not bf16 or gen_cfg.bf16 or (bf16 == "auto" and not gen_cfg.packed_linears):
        return gen_cfg
    try:
        linear_path(policy, gen_cfg.packed_linears, bf16=True)
    except ValueError as e:
        if bf16 is True:
            logger.warning("method.rollout_bf16: rollouts are sampled in fp32 here (%s)", e)
        return gen_cfg
    if bf16 == "auto":
        path, _ = fastest_path(policy, min(rows, 64), (PACKED, PLAIN, PACKED_BF16), reduce=distributed.all_reduce_max)
        if path != PACKED_BF16:
            return gen_cfg
    return dataclasses.replace(gen_cfg, bf16=True)


def generate_rollouts(policy, tok, prompts: list[str], gen_cfg: GenerationConfig, chunk_size: int,
                      gen: torch.Generator) -> GenerationOutput:
    """Sample ``prompts`` in chunks of ``chunk_size``. Chunk j of the global batch is sampled with
    the seed (s + j), s drawn once per iteration from ``gen`` (the same stream on every process),
    so one process sampling every chunk and N processes sampling theirs produce the same rollouts.
    The result is padded to the longest prompt and response over all processes, so that the
    processes' tensors can be gathered into one batch (laid out as one process would lay it out).
    The generation engine's packed weights are released after the last chunk: scoring and the
    update do not use them, and they would hold as much memory as the weights until next time."""
    size = chunk_size
    base = int(torch.randint(0, 2 ** 62, (), generator=gen))
    first = distributed.rank() * math.ceil(len(prompts) / size)  # this process's first global chunk
    outs = [generate(policy, tok, prompts[s:s + size], gen_cfg, batch_size=size,
                     generator=torch.Generator().manual_seed(base + first + j))
            for j, s in enumerate(range(0, len(prompts), size))]
    release_packed(policy)
    widths = torch.tensor([max(o.prompt_ids.shape[1] for o in outs), max(o.response_ids.shape[1] for o in outs)])
    P, N = distributed.all_reduce_max(widths).tolist()
    return concat_outputs(outs, pad_id(tok), P, N)


def call_reward(reward_fn: Callable, prompts: list[str], outputs: list[str], batch) -> list:
    """Call a reward function and validate what it returns; any failure becomes a RewardError naming the batch."""
    try:
        scores = reward_fn(samples=[p + o for p, o in zip(prompts, outputs)], prompts=prompts, outputs=outputs)
    except Exception as e:
        raise RewardError(f"the reward function raised on batch {batch}: {type(e).__name__}: {e}") from e
    return check_rewards(scores, len(prompts), batch_index=batch)


def call_reward_here_or_on_main(reward_fn: Callable, prompts: list[str], outputs: list[str], batch,
                                on_main: bool) -> list:
    """Scores of this process's samples: computed here, or (``on_main``, several processes) by the
    main process over every process's samples and sent back."""
    if not on_main or not distributed.state().enabled:
        return call_reward(reward_fn, prompts, outputs, batch)
    parts = distributed.all_gather_objects((list(prompts), list(outputs)))

    def score_everything() -> list[list]:
        scores = call_reward(reward_fn, [p for ps, _ in parts for p in ps], [o for _, os_ in parts for o in os_], batch)
        bounds = [0]
        for ps, _ in parts:
            bounds.append(bounds[-1] + len(ps))
        return [scores[a:b] for a, b in zip(bounds, bounds[1:])]

    return distributed.on_main(score_everything)[distributed.rank()]


def rewards_everywhere(reward_fn: Callable, prompts: list[str], outputs: list[str], batch,
                       on_main: bool) -> tuple[list | None, RewardError | None]:
    """(scores, None), or (None, the error) on every process when the reward failed on any."""
    try:
        return_value, error = call_reward_here_or_on_main(reward_fn, prompts, outputs, batch, on_main), None
    except RewardError as e:
        return_value, error = None, e
    if distributed.any_rank(error is not None):  # every process stops, not only the one that failed
        return None, error or RewardError(f"the reward function failed on another process (batch {batch})")
    return return_value, None


def scores_tensor(raw: list, mask: Tensor) -> Tensor:
    """Validated reward-function scores as a tensor: (B,) for one score per sample, or (B, N) for
    per-token scores aligned with the response tokens (0 on padding)."""
    if not isinstance(raw[0], (list, tuple)):
        return torch.tensor([float(s) for s in raw], dtype=torch.float32, device=mask.device)
    out = torch.zeros_like(mask)
    for i, row in enumerate(raw):  # align per-token scores with the response tokens
        n = min(len(row), out.shape[1])
        out[i, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return out * mask


def scalar(score) -> float:
    """One number for a sample's score (per-token scores summed)."""
    return float(sum(score)) if isinstance(score, (list, tuple)) else float(score)
