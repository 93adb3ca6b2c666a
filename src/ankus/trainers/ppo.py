"""PPO for language models, as trlX does it (Havrilla et al. 2023), plus critic-free RLOO/GRPO.

One iteration:
  1. rollouts: ``num_rollouts`` responses sampled by the generation engine in chunks of
     ``chunk_size`` (``samples_per_prompt`` per prompt), scored by the reward function;
  2. one no-grad forward gives the behaviour log-probs, values and the reference log-probs
     (Hydra branch, LoRA-disabled model, or a frozen copy); with k samples per prompt each
     distinct prompt runs once, its KV cache shared by its k responses (``method.share_prompts``,
     ankus.models.prefix; also in the update's forward, except under Hydra, whose top blocks
     run over whole rows from the cached state at the split); when nothing reads the behaviour
     log-probs before the one and only update (GRPO, one epoch, one minibatch) they are taken from
     that update's forward instead (``method.reuse_update_forward``);
  3. rewards = clipped score at the last response token − β·(logp − logp_ref) per token;
     advantages by GAE (critic) or RLOO / GRPO (critic-free), whitened over response tokens only;
  4. ``ppo_epochs`` passes over the rollouts in shuffled minibatches of ``trainer.batch_size``:
     clipped policy loss + ``vf_coef`` × clipped value loss (+ β·k3 KL loss for GRPO);
  5. the KL controller updates β.
Loss math lives in ankus.losses / ankus.rl; this file only wires it together.

Several processes (torchrun, accelerate launch; see ankus.distributed): each samples
``num_rollouts`` from its block of one global prompt list, scores its own samples (or sends them
to the main process, ``reward.on_main``), and the rollouts are then shared, so advantages,
whitening, reward scaling, the KL fed to the controller and the logged metrics are the global
batch's. Each PPO minibatch is ``trainer.batch_size`` rollouts per process, split evenly;
gradients are summed over processes. N processes train as one process with N times the rollouts
and the batch size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tqdm.auto import tqdm

from ankus import distributed
from ankus.config import ModelConfig, RunConfig, TrainerConfig
from ankus.generation.engine import GenerationConfig, GenerationOutput, concat_outputs, generate, release_packed
from ankus.losses.ppo import (head_logprobs, logprobs_from_logits, policy_loss, rows_per_chunk, token_entropy,
                              value_loss)
from ankus.models.heads import ValueHead, output_head_bypassed
from ankus.models.loading import load_model
from ankus.models.prefix import head_is_plain, shared_prompt_hidden, shared_prompt_states
from ankus.data.prompts import load_prompts
from ankus.data.tokens import position_ids_from_mask
from ankus.models.reference import make_reference
from ankus.rewards import RewardError, check_rewards, get_reward_fn
from ankus.rl.estimators import grpo_advantages, rloo_advantages, sequence_to_token_advantages
from ankus.rl.gae import gae_advantages
from ankus.rl.kl import AdaptiveKLController, FixedKLController, kl_k3, per_token_rewards
from ankus.rl.stats import RunningMoments, masked_mean, masked_whiten
from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics


@dataclass
class PPOMethod:
    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """Advantage estimator: gae (value head, trlX), rloo or grpo (critic-free, k samples per prompt)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (k); rloo and grpo need at least 2."""
    num_rollouts: int = 32
    """Responses collected per iteration (per process)."""
    chunk_size: int = 16
    """Generation batch size. Each chunk has its own seed, so rollouts do not depend on the number of
    processes as long as num_rollouts is a multiple of chunk_size."""
    ppo_epochs: int = 4
    """Passes over each iteration's rollouts."""
    init_kl_coef: float = 0.001
    """Initial KL coefficient beta."""
    target: float | None = None
    """Target KL for the adaptive controller; null = fixed beta."""
    horizon: int = 10000
    """Adaptive KL controller horizon."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip range."""
    cliprange_value: float = 0.2
    """Value clip range."""
    vf_coef: float = 1.0
    """Value loss weight."""
    cliprange_reward: float = 10.0
    """Scores are clipped to +-this."""
    scale_reward: Literal["none", "running", "ref"] = "none"
    """Divide scores by the running std ('running') or by the first batch's std ('ref')."""
    whiten_advantages: bool = True
    """Whiten advantages over response tokens."""
    reference: Literal["hydra", "lora", "copy"] = "hydra"
    """Where reference log-probs come from: hydra (frozen top-N branch), lora (adapters off), copy."""
    num_layers_unfrozen: int = 2
    """Top decoder blocks trained (hydra/copy); -1 = all (then the reference is a copy)."""
    lora_r: int = 8
    """LoRA rank (reference: lora)."""
    lora_alpha: int = 16
    """LoRA alpha (reference: lora)."""
    cache_trunk: bool = True
    """Hydra: keep each rollout's hidden state at the split (B x T x H floats) from the scoring
    forward, so every PPO step runs only the top N blocks instead of the whole frozen trunk again
    (same numbers; false = recompute, less memory)."""
    share_prompts: bool = True
    """Run each distinct prompt once per forward, its keys and values shared by its k responses
    (samples_per_prompt > 1): the same numbers up to float rounding, and ~1.7x less work at k=4
    (ankus.models.prefix). Under Hydra the scoring forward shares prompts and the update's top
    blocks run over whole rows from the trunk cache. false = every row runs its whole prompt."""
    reuse_update_forward: bool = True
    """GRPO with ppo_epochs 1 and one minibatch (each rollout batch gets one optimizer step, TRL's
    num_iterations=1), reference lora/copy: the behaviour log-probs equal the update's own forward,
    detached, so the separate no-grad policy forward of the scoring phase is skipped (same numbers;
    false = run it anyway)."""


@dataclass
class PromptData:
    prompts: str = "review_openings"
    """Built-in prompt set (review_openings, randomwalks) or a .txt/.jsonl file of prompts."""
    template: str = "{prompt}"
    """Format string applied to each prompt before generation; {prompt} is the raw prompt."""
    eval_prompts: str = ""
    """Held-out prompts (same forms as prompts); empty = the built-in set's eval split."""
    num_eval: int = 20
    """Held-out prompts scored before and after training."""
    eval_samples: int = 1
    """Responses sampled per held-out prompt, before and after alike (same seed); the reported
    standard errors treat each prompt's mean as one observation."""


@dataclass
class RewardConfig:
    name: str = "sentiment"
    """Built-in reward (sentiment, randomwalks) or 'module:function'."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the reward factory."""
    on_main: bool = False
    """Several processes: score every process's samples on the main one and send the scores back
    (trlX's way: one reward model in memory); false = each process scores its own samples."""


@dataclass
class WarmStart:
    steps: int = 0
    """Supervised steps on the task's demonstration texts before PPO (randomwalks); 0 = none."""
    lr: float = 1e-3
    """Learning rate of the warm start."""
    batch_size: int = 32
    """Batch size of the warm start."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(total_steps=20))
    """Optimisation; total_steps counts PPO iterations (rollout + update phases)."""
    method: PPOMethod = field(default_factory=PPOMethod)
    """PPO hyper-parameters (trlX's defaults)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    data: PromptData = field(default_factory=PromptData)
    """Prompts."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    warm_start: WarmStart = field(default_factory=WarmStart)
    """Optional supervised warm start."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# prompts and rewards


# ---------------------------------------------------------------------------------------------
# the policy forward


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


class TrunkCache:
    """The policy's top N blocks run on a cached hidden state at the split (Hydra only).

    Under Hydra the bottom L−N blocks and the embeddings are frozen, so a rollout's hidden state
    entering block L−N cannot change during the PPO epochs: the scoring forward already computed
    it (``hidden_states[L−N]``). ``view`` is the policy's own module tree with the bottom blocks
    swapped for stand-ins that return that state (ankus.models.hydra's construction, but with
    the top blocks, final norm and head *shared* with the policy rather than copied), so the
    model's own mask/rotary code runs and gradients reach the policy's parameters."""

    def __init__(self, model, split_index: int):
        from torch import nn

        from ankus.models.hydra import _restructure, _Split, _StandIn
        from ankus.models.layers import find_decoder_layers as _find_layers

        name, layers = _find_layers(model)
        self.split = _Split()
        stand_ins = [_StandIn(layer, self.split if i == split_index - 1 else None)
                     for i, layer in enumerate(layers[:split_index])]
        self.view = _restructure(model, {name: nn.ModuleList(stand_ins + list(layers[split_index:]))})

    def forward(self, value_head, hidden, attention_mask, n_resp: int):
        """Same as ``policy_forward(model, value_head, ...)[:2]``, from ``hidden`` (B, T, H)."""
        self.split.hidden = hidden
        try:
            out = self.view(inputs_embeds=hidden, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask),
                            output_hidden_states=value_head is not None, logits_to_keep=n_resp + 1, use_cache=False)
        finally:
            self.split.hidden = None
        values = value_head(out.hidden_states[-1][:, -n_resp - 1:-1]) if value_head is not None else None
        return out.logits[:, :-1], values


# ---------------------------------------------------------------------------------------------
# training


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _has_dropout(model) -> bool:
    """Whether a training-mode forward may differ from an eval-mode one (dropout modules, or a
    config's attention/hidden dropout probability above 0)."""
    if any(isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in model.modules()):
        return True
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               for k, v in (vars(config).items() if config is not None else ())
               if (k.endswith("dropout") or k.endswith("_pdrop")) and not k.startswith(("classifier", "summary")))


def _make_reference(model, method: PPOMethod):
    mode = method.reference
    if method.num_layers_unfrozen == -1 and mode == "hydra":
        mode = "copy"  # nothing is shared to branch from: train everything, compare to a frozen copy
    ref = make_reference(model, mode=mode, num_layers_unfrozen=method.num_layers_unfrozen,
                         lora_r=method.lora_r, lora_alpha=method.lora_alpha)
    return ref, mode


def _warm_start(model, tok, cfg: Config, texts: list[str]) -> float:
    """A short supervised fit on demonstration texts (trlX's random-walks model is pretrained
    on walks; we fit ours here in a few seconds)."""
    from ankus.losses.sft import sft_loss

    ws = cfg.warm_start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ws.lr)
    model.train()
    rng = random.Random(cfg.trainer.seed)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(ws.steps), desc="warm start", disable=not cfg.run.progress):
        batch = rng.sample(texts, min(ws.batch_size, len(texts)))
        enc = tok([t + tok.eos_token for t in batch], return_tensors="pt", padding=True, padding_side="right")
        enc = enc.to(next(model.parameters()).device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        loss, _ = sft_loss(logits, enc.input_ids, enc.attention_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, tok, prompts: list[str], cfg: Config, reward_fn: Callable, seed: int) -> list[dict]:
    """``data.eval_samples`` scored responses per held-out prompt -> one row per response, a
    prompt's samples side by side (``sample`` 0..k-1). The same ``seed`` before and after training
    (common random numbers: the before/after difference is less noisy than either score)."""
    gen = torch.Generator().manual_seed(seed)
    k = cfg.data.eval_samples
    prompts = [p for p in prompts for _ in range(k)]
    templated = [cfg.data.template.format(prompt=p) for p in prompts]
    out = generate(model, tok, templated, cfg.generation, generator=gen, batch_size=cfg.method.chunk_size)
    scores = call_reward(reward_fn, templated, out.texts, batch="eval")
    return [{"prompt": p, "sample": i % k, "output": o, "score": _scalar(s)}
            for i, (p, o, s) in enumerate(zip(prompts, out.texts, scores))]


def call_reward(reward_fn: Callable, prompts: list[str], outputs: list[str], batch) -> list:
    """Call a reward function and validate what it returns; any failure becomes a RewardError naming the batch."""
    try:
        scores = reward_fn(samples=[p + o for p, o in zip(prompts, outputs)], prompts=prompts, outputs=outputs)
    except Exception as e:
        raise RewardError(f"the reward function raised on batch {batch}: {type(e).__name__}: {e}") from e
    return check_rewards(scores, len(prompts), batch_index=batch)


def _tuple_state(state):
    """JSON turned random.Random's state tuples into lists; turn them back."""
    return tuple(_tuple_state(x) if isinstance(x, list) else x for x in state)


def _scalar(score) -> float:
    return float(sum(score)) if isinstance(score, (list, tuple)) else float(score)


def _call_reward_here_or_on_main(reward_fn: Callable, prompts: list[str], outputs: list[str], batch,
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


def _generate_rollouts(policy, tok, prompts: list[str], cfg: Config, gen: torch.Generator) -> GenerationOutput:
    """Sample ``prompts`` in chunks of ``chunk_size``. Chunk j of the global batch is sampled with
    the seed (s + j), s drawn once per iteration from ``gen`` (the same stream on every process),
    so one process sampling every chunk and N processes sampling theirs produce the same rollouts.
    The result is padded to the longest prompt and response over all processes, so that the
    processes' tensors can be gathered into one batch (laid out as one process would lay it out).
    The generation engine's packed weights are released after the last chunk: scoring and the
    update do not use them, and they would hold as much memory as the weights until next time."""
    size = cfg.method.chunk_size
    base = int(torch.randint(0, 2 ** 62, (), generator=gen))
    first = distributed.rank() * math.ceil(len(prompts) / size)  # this process's first global chunk
    outs = [generate(policy, tok, prompts[s:s + size], cfg.generation, batch_size=size,
                     generator=torch.Generator().manual_seed(base + first + j))
            for j, s in enumerate(range(0, len(prompts), size))]
    release_packed(policy)
    widths = torch.tensor([max(o.prompt_ids.shape[1] for o in outs), max(o.response_ids.shape[1] for o in outs)])
    P, N = distributed.all_reduce_max(widths).tolist()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return concat_outputs(outs, pad_id, P, N)


def train(cfg: Config, reward_fn: Callable | None = None, resume: bool = False) -> dict[str, Any]:
    """Run PPO; returns a summary (run_dir, before/after eval scores)."""
    m, tc = cfg.method, cfg.trainer
    if m.estimator in ("rloo", "grpo") and m.samples_per_prompt < 2:
        raise ValueError(f"estimator '{m.estimator}' needs method.samples_per_prompt >= 2")
    if m.num_rollouts % m.samples_per_prompt:
        raise ValueError("method.num_rollouts must be a multiple of method.samples_per_prompt")
    if cfg.data.eval_samples < 1:
        raise ValueError(f"data.eval_samples must be >= 1, got {cfg.data.eval_samples}")
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    device = distributed.resolve_device(tc.device)
    sharded = distributed.use_fsdp(tc.fsdp)
    if sharded and m.reference == "lora":
        raise ValueError("trainer.fsdp with method.reference=lora is not supported: LoRA adapters are small, train "
                         "them data parallel (trainer.fsdp=false), or shard with method.reference=hydra or copy")
    _set_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "ppo", cfg, exist_ok=resume)
    if reward_fn is None and (ds.is_main or not cfg.reward.on_main):  # on_main: one copy, on rank 0
        reward_fn = get_reward_fn(cfg.reward.name, **cfg.reward.kwargs)

    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    train_prompts = load_prompts(cfg.data.prompts, "train", walks_seed=cfg.reward.kwargs.get("seed", 1000))
    eval_prompts = (load_prompts(cfg.data.eval_prompts, "eval", walks_seed=cfg.reward.kwargs.get("seed", 1000)) if cfg.data.eval_prompts
                    else _default_eval(cfg, train_prompts))[: cfg.data.num_eval]
    if cfg.warm_start.steps:
        from ankus.rewards.randomwalks import generate_random_walks

        walks = generate_random_walks(seed=cfg.reward.kwargs.get("seed", 1000)).walks
        # one token per node: a letter tokenizer takes "bha" as is; SmolLM2's would merge it into "bh"+"a"
        spaced = len(tok(walks[0], add_special_tokens=False).input_ids) != len(walks[0])
        _warm_start(model, tok, cfg, [" ".join(w) if spaced else w for w in walks])
    distributed.broadcast_parameters(model)  # every process starts from rank 0's weights, bit for bit

    reference, ref_mode = _make_reference(model, m)  # its copies are taken before any sharding
    policy = reference.policy  # the model to train (a peft model under LoRA)
    head_is_plain(policy)  # checked (and remembered) while every process still holds the whole model
    if sharded:
        # FSDP2: each process holds 1/N of every layer; the updates run sharded. Sampling and
        # scoring run inside distributed.full_params (the whole policy gathered once), where
        # processes may decode for different numbers of steps and the Hydra branch can read the
        # frozen head it shares with the policy.
        distributed.fsdp_wrap(policy)
    # (under FSDP the trunk cache's view would bypass the root unit that gathers the final norm and head)
    trunk = (TrunkCache(policy, reference.hidden_index) if ref_mode == "hydra" and m.cache_trunk and not sharded
             else None)
    # Behaviour log-probs from the update's own forward: exact when nothing reads them before the
    # update and that update is the first and only one on these rollouts (GRPO: advantages do not
    # use them; one epoch of one minibatch), the reference needs no policy hidden state (not Hydra),
    # and the no-grad (eval) and training forwards compute the same function (no dropout).
    reuse_forward = (m.reuse_update_forward and m.estimator == "grpo" and m.ppo_epochs == 1
                     and m.num_rollouts <= tc.batch_size and reference.hidden_index is None
                     and not _has_dropout(policy))
    # each prompt once per forward: k responses per prompt, and logits that are the output head's
    # alone (checked once). Under Hydra the scoring forward shares prompts and rebuilds the whole
    # rows' state at the split for the branch and the trunk cache; the update runs the top blocks
    # from that cache over whole rows
    shared = m.share_prompts and m.samples_per_prompt > 1 and head_is_plain(policy)
    hidden_size = model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden_size).to(device) if m.estimator == "gae" else None
    if value_head is not None:
        distributed.broadcast_parameters(value_head)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    head_params = list(value_head.parameters()) if value_head else []
    params = policy_params + head_params
    # under FSDP the policy's parameters are sharded (DTensors) and the value head's are not: two
    # groups with the same settings, since a fused (foreach) CUDA step cannot mix the two kinds
    groups = [{"params": policy_params}, {"params": head_params}] if sharded and head_params else params
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    kl_ctl = (AdaptiveKLController(m.init_kl_coef, m.target, m.horizon) if m.target is not None
              else FixedKLController(m.init_kl_coef))
    running = RunningMoments()
    ref_std = None

    prompt_rng = random.Random(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    # under FSDP the optimizer state is gathered by parameter name, over the policy and the value head
    owner = torch.nn.ModuleDict({"policy": policy, "value_head": value_head}) if value_head is not None else policy

    def views(gather: bool) -> tuple[dict, Any]:
        """The modules and optimizer as checkpoints see them (gathered stand-ins under FSDP)."""
        policy_view, opt_view = distributed.checkpoint_views(policy, opt, gather=gather, optimizer_owner=owner)
        return {"policy": policy_view, **({"value_head": value_head} if value_head is not None else {})}, opt_view

    start, ckpt = 0, latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:  # the reference was built from the initial model above, as in the first run
        modules, opt_view = views(gather=False)
        state = load_checkpoint(ckpt, modules=modules, optimizer=opt_view, generators={"rollouts": gen})
        distributed.restore_rank_rng(ckpt)
        start, before, ref_std = state["step"], state["before"], state["ref_std"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        running.load_state_dict(state["running"])
        prompt_rng.setstate(_tuple_state(state["prompt_rng"]))
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)
        if ds.is_main:
            print(f"resuming {run_dir} from iteration {start} ({ckpt.name})")
    else:
        with distributed.full_params(policy):
            before = distributed.on_main(evaluate, policy, tok, eval_prompts, cfg, reward_fn, seed=tc.seed + 12345)

    def checkpoint(step: int) -> Path:
        extra = {"before": before, "ref_std": ref_std, "kl_ctl": kl_ctl.state_dict(), "running": running.state_dict(),
                 "prompt_rng": prompt_rng.getstate()}
        generators = {"rollouts": gen, **distributed.rank_rng_states()}
        modules, opt_view = views(gather=True)  # a collective under FSDP: every process
        return distributed.on_main(save_checkpoint, run_dir, step, modules=modules, optimizer=opt_view,
                                   generators=generators, extra=extra, keep_last=tc.keep_last)

    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    guard = NonFiniteGuard(tc.max_bad_steps)
    n_trainable = sum(p.numel() for p in params)
    bar = tqdm(range(start, tc.total_steps), desc="ppo", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    with GracefulExit() as stop:  # SIGTERM/SIGINT: finish the iteration, checkpoint, stop
        for it in bar:
            # ---- 1. rollouts ----------------------------------------------------------------
            t0 = time.perf_counter()
            n_prompts = m.num_rollouts // m.samples_per_prompt
            # one global prompt list from the shared stream; each process takes its block
            prompts = [prompt_rng.choice(train_prompts) for _ in range(n_prompts * ds.world_size)]
            prompts = [p for p in distributed.shard(prompts) for _ in range(m.samples_per_prompt)]  # k copies
            templated = [cfg.data.template.format(prompt=p) for p in prompts]
            policy.eval()
            with torch.no_grad(), distributed.full_params(policy):
                out = _generate_rollouts(policy, tok, templated, cfg, gen)
            t_gen = time.perf_counter() - t0
            try:
                raw, error = _call_reward_here_or_on_main(reward_fn, templated, out.texts, it, cfg.reward.on_main), None
            except RewardError as e:
                raw, error = None, e
            if distributed.any_rank(error is not None):  # every process stops, not only the one that failed
                saved = _save_policy(policy, tok, run_dir / f"checkpoint-{it}")
                error = error or RewardError(f"the reward function failed on another process (batch {it})")
                raise RewardError(f"{error}. The model so far was saved to {saved}") from error.__cause__
            mask = out.response_mask.float()  # (B, N)
            if not bool((mask.sum(1) > 0).all()):
                mask[:, 0] = 1.0  # an empty response still carries its score on one token
            dense = isinstance(raw[0], (list, tuple))
            scores = _scores_tensor(raw, mask, dense).clamp(-m.cliprange_reward, m.cliprange_reward)

            input_ids = torch.cat([out.prompt_ids, out.response_ids], 1)  # (B, P+N)
            attn = torch.cat([out.prompt_mask, mask.long()], 1)
            response_ids = out.response_ids
            n_resp = out.response_ids.shape[1]
            with torch.no_grad(), distributed.full_params(policy):
                old_logps, old_values, ref_logps, *split_hidden = _score_rollouts(
                    policy, value_head, reference, input_ids, attn, out.response_ids, n_resp, m.chunk_size,
                    keep_hidden=trunk is not None, behaviour=not reuse_forward, shared=shared)
            split_hidden = split_hidden[0] if split_hidden else None  # (B, P+N, H) or None
            if ds.enabled:  # every process gets every rollout: what follows sees the global batch
                input_ids, attn, response_ids, mask, scores, ref_logps = (
                    distributed.all_gather_cat(t) for t in (input_ids, attn, response_ids, mask, scores, ref_logps))
                old_logps = None if old_logps is None else distributed.all_gather_cat(old_logps)
                old_values = None if old_values is None else distributed.all_gather_cat(old_values)
                split_hidden = None if split_hidden is None else distributed.all_gather_cat(split_hidden)
            seq_scores = scores if scores.dim() == 1 else scores.sum(1)
            if m.scale_reward == "running":
                running.update(seq_scores)
                scores = scores / max(running.std, 1e-8)
            elif m.scale_reward == "ref":
                ref_std = ref_std or max(float(seq_scores.std()), 1e-8)
                scores = scores / ref_std
            # ---- 2. advantages ---------------------------------------------------------------
            beta = kl_ctl.value
            if m.estimator == "gae":
                rewards, kl = per_token_rewards(scores, old_logps, ref_logps, mask, beta)
                advantages, returns = gae_advantages(rewards, old_values, mask, m.gamma, m.lam)
            else:
                kl = None if old_logps is None else (old_logps - ref_logps) * mask  # None: after the update
                seq = seq_scores if scores.dim() == 1 else scores.sum(1)
                if m.estimator == "rloo":  # KL in the sequence reward (Ahmadian et al. 2024)
                    seq_adv = rloo_advantages(seq - beta * kl.sum(1), m.samples_per_prompt)
                else:  # GRPO: KL goes into the loss instead
                    seq_adv = grpo_advantages(seq, m.samples_per_prompt)
                advantages, returns = sequence_to_token_advantages(seq_adv, mask), None
            if m.whiten_advantages and m.estimator == "gae":
                advantages = masked_whiten(advantages, mask)
            mean_kl = None if kl is None else float(kl.sum(1).mean())
            # ---- 3. PPO epochs ---------------------------------------------------------------
            t1 = time.perf_counter()
            policy.train()
            stats: dict[str, list[float]] = {}
            B = input_ids.shape[0]
            mb_size = tc.batch_size * ds.world_size  # a global minibatch: batch_size rollouts per process
            behaviour: list[torch.Tensor] = []  # reuse_forward: the update's own log-probs, detached
            for _ in range(m.ppo_epochs):
                order = torch.randperm(B, generator=gen)
                for s in range(0, B, mb_size):
                    minibatch = order[s:s + mb_size]
                    idx = minibatch[slice(*distributed.shard_bounds(len(minibatch)))]  # this process's block
                    # its losses count with its share of the minibatch's tokens (1 for one process)
                    share = float(mask[idx].sum()) / max(float(mask[minibatch].sum()), 1.0)
                    step_stats = _ppo_step(policy, value_head, opt, params, cfg, beta, guard, input_ids[idx], attn[idx],
                                           response_ids[idx], mask[idx],
                                           None if old_logps is None else old_logps[idx], ref_logps[idx],
                                           None if old_values is None else old_values[idx], advantages[idx],
                                           None if returns is None else returns[idx], n_resp, share,
                                           trunk=trunk, hidden=None if split_hidden is None else split_hidden[idx],
                                           behaviour=behaviour, shared=shared)
                    for k, v in step_stats.items():
                        stats.setdefault(k, []).append(v)
            if mean_kl is None:  # the behaviour log-probs came from the update: the KL over every process's rows
                idx = order[slice(*distributed.shard_bounds(B))]  # one minibatch: this process's rows
                kl_sum = ((behaviour[0] - ref_logps[idx]) * mask[idx]).sum()
                mean_kl = float(distributed.all_reduce_sum(kl_sum.double().reshape(1))) / B
            kl_ctl.update(mean_kl, n_steps=B)
            t_train = time.perf_counter() - t1
            n_tokens = float(mask.sum())
            metrics = {
                "reward/mean": float(seq_scores.mean()), "reward/std": float(seq_scores.std()) if B > 1 else 0.0,
                "kl/mean": mean_kl, "kl/beta": beta, **{k: sum(v) / len(v) for k, v in stats.items()},
                "response/length": n_tokens / B, "time/generate_s": t_gen, "time/train_s": t_train,
                "perf/tokens_per_s": n_tokens / max(t_gen, 1e-9), "perf/trainable_params": n_trainable,
            }
            if (it + 1) % tc.log_every == 0 or it == tc.total_steps - 1:
                logger.log(it + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{mean_kl:.3f}")
            stopping = distributed.any_rank(stop.requested)  # a signal that reached one process stops all
            if stopping or (tc.checkpoint_every and (it + 1) % tc.checkpoint_every == 0):
                path = checkpoint(it + 1)
                if stopping:
                    logger.close()
                    if ds.is_main:
                        print(f"stopped by signal after iteration {it + 1}; resume with --resume (checkpoint {path})")
                    return {"run_dir": str(run_dir), "stopped_at": it + 1}
    logger.close()

    with distributed.full_params(policy):
        after = distributed.on_main(evaluate, policy, tok, eval_prompts, cfg, reward_fn, seed=tc.seed + 12345)
    distributed.on_main(plot_metrics, run_dir, ["reward/mean", "kl/mean", "loss/pg", "loss/vf", "policy/entropy"],
                        title="PPO")
    if cfg.run.save_model:
        _save_policy(policy, tok, run_dir / "model")
    summary = distributed.on_main(_write_eval, run_dir, before, after)
    summary.update(run_dir=str(run_dir), reference=ref_mode)
    return summary


def _save_policy(policy, tok, path: Path):
    """Save the policy in Hugging Face format from the main process (under FSDP an ordinary copy
    is gathered there first: a collective, call on every process). Returns the path."""
    return distributed.on_main(save_hf_model, distributed.unsharded_copy(policy), tok, path)


def _default_eval(cfg: Config, train_prompts: list[str]) -> list[str]:
    if cfg.data.prompts == "review_openings":
        from ankus.data.assets import review_openings

        return review_openings("eval")
    return train_prompts  # tasks like randomwalks evaluate on their (few) start nodes


def _scores_tensor(raw, mask: torch.Tensor, dense: bool) -> torch.Tensor:
    if not dense:
        return torch.tensor([float(s) for s in raw], dtype=torch.float32, device=mask.device)
    out = torch.zeros_like(mask)
    for i, row in enumerate(raw):  # align per-token scores with the response tokens
        n = min(len(row), out.shape[1])
        out[i, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return out * mask


def _shared_forward(policy, value_head, ids, am, resp, n_resp: int):
    """Log-probs of ``resp`` (b, N), next-token entropies (b, N, no grad) and values (or None),
    each distinct prompt run once (:func:`ankus.models.prefix.shared_prompt_hidden`)."""
    P = ids.shape[1] - n_resp
    hidden = shared_prompt_hidden(policy, ids[:, :P], am[:, :P], resp, am[:, P:])  # (b, N, H)
    logps, entropy = head_logprobs(hidden, policy.get_output_embeddings(), resp)
    return logps, entropy, (value_head(hidden) if value_head is not None else None)


def _score_rollouts(policy, value_head, reference, input_ids, attn, response_ids, n_resp, chunk,
                    keep_hidden: bool = False, behaviour: bool = True, shared: bool = False):
    """Behaviour log-probs, values and reference log-probs, in chunks, without grad. -> 3 × (B, N);
    ``keep_hidden`` (Hydra) adds the hidden state at the split, (B, T, H), for ``TrunkCache``.
    ``behaviour=False`` (no value head, no Hydra): only the reference runs; log-probs are None.
    A chunk is at most ``chunk`` rows, and fewer where its (rows, N + 1, V) logits would pass
    ``rows_per_chunk``'s budget; a row's numbers do not depend on the rows beside it (bit for bit
    for SmolLM2 in fp32 on the CPU; at most float rounding in the matrix products elsewhere)."""
    if not behaviour and (value_head is not None or keep_hidden or reference.hidden_index is not None):
        raise ValueError("the policy forward can be skipped only without a value head and a Hydra reference")
    chunk_size = chunk
    chunk = min(chunk, rows_per_chunk(n_resp + 1, policy.get_output_embeddings().weight.shape[0]))
    logps, values, ref_logps, hiddens = [], [], [], []
    if shared:  # no (rows, N + 1, V) logits are made: chunks of the configured size, prompts shared within
        P = input_ids.shape[1] - n_resp
        for s in range(0, input_ids.shape[0], chunk_size):
            ids, am, resp = input_ids[s:s + chunk_size], attn[s:s + chunk_size], response_ids[s:s + chunk_size]
            if reference.hidden_index is not None:  # Hydra: the branch starts from the rows' state at the split
                final, at_split = shared_prompt_states(policy, ids[:, :P], am[:, :P], resp, am[:, P:],
                                                       reference.hidden_index)  # (b, N, H), (b, P + N, H)
                logps.append(head_logprobs(final, policy.get_output_embeddings(), resp)[0])
                values.append(value_head(final) if value_head is not None else torch.zeros_like(resp, dtype=torch.float32))
                # the branch makes (rows, N + 1, V) logits: at most ``chunk`` rows at a time
                ref_logps.extend(reference.logps(ids[r:r + chunk], am[r:r + chunk], at_split[r:r + chunk], n_resp)
                                 for r in range(0, ids.shape[0], chunk))
                if keep_hidden:
                    hiddens.append(at_split)
                continue
            if behaviour:
                lp, _, v = _shared_forward(policy, value_head, ids, am, resp, n_resp)
                logps.append(lp)
                values.append(v if v is not None else torch.zeros_like(resp, dtype=torch.float32))
            ref_logps.append(reference.shared_prompt_logps(ids[:, :P], am[:, :P], resp, am[:, P:]))
        out = (torch.cat(logps) if behaviour else None, (torch.cat(values) if value_head is not None else None),
               torch.cat(ref_logps))
        return (*out, torch.cat(hiddens)) if keep_hidden else out
    for s in range(0, input_ids.shape[0], chunk):
        ids, am, resp = input_ids[s:s + chunk], attn[s:s + chunk], response_ids[s:s + chunk]
        hidden = None
        if behaviour:
            logits, v, hidden = policy_forward(policy, value_head, ids, am, n_resp, reference.hidden_index)
            logps.append(logprobs_from_logits(logits, resp))
            values.append(v if v is not None else torch.zeros_like(resp, dtype=torch.float32))
            del logits  # before the reference makes its own
        ref_logps.append(reference.logps(ids, am, hidden, n_resp))
        if keep_hidden:
            hiddens.append(hidden)
    out = (torch.cat(logps) if behaviour else None, (torch.cat(values) if value_head is not None else None),
           torch.cat(ref_logps))
    return (*out, torch.cat(hiddens)) if keep_hidden else out


def _response_logprobs(policy, forward: Callable, resp: torch.Tensor):
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


def _ppo_step(policy, value_head, opt, params, cfg: Config, beta, guard: NonFiniteGuard, ids, am, resp, mask,
              old_logps, ref_logps, old_values, advantages, returns, n_resp, share: float = 1.0,
              trunk: TrunkCache | None = None, hidden: torch.Tensor | None = None,
              behaviour: list | None = None, shared: bool = False) -> dict[str, float]:
    """One optimizer step on this process's block of a minibatch. ``share`` = its fraction of the
    minibatch's response tokens: the token-mean losses are scaled by it, so that the gradients
    summed over processes (and the reported statistics) are those of the whole minibatch.
    With ``trunk`` and ``hidden`` (Hydra), only the top blocks run, from the cached split state.
    ``old_logps=None`` (the first update on these rollouts, nothing changed yet): the behaviour
    log-probs are this forward's, detached (ratio 1, the gradient of ρ), appended to ``behaviour``."""
    m, tc = cfg.method, cfg.trainer

    def forward():  # -> logits (b, N, V), values (b, N) or None
        if trunk is not None and hidden is not None:
            return trunk.forward(value_head, hidden, am, n_resp)
        return policy_forward(policy, value_head, ids, am, n_resp)[:2]

    if shared and not (trunk is not None and hidden is not None):  # each distinct prompt once (k per prompt)
        logps, entropy, values = _shared_forward(policy, value_head, ids, am, resp, n_resp)
    else:
        logps, entropy, values = _response_logprobs(policy, forward, resp)  # (b, N) each; entropy without grad
    if old_logps is None:
        old_logps = logps.detach()
        if behaviour is not None:
            behaviour.append(old_logps)
    pg_loss, pg_stats = policy_loss(logps, old_logps, advantages, mask, m.cliprange)
    loss = pg_loss
    out = {"loss/pg": float(pg_loss.detach()), **{f"policy/{k}": float(v) for k, v in pg_stats.items()}}
    if value_head is not None:
        vf_loss, vf_stats = value_loss(values, old_values, returns, mask, m.cliprange_value)
        loss = loss + m.vf_coef * vf_loss
        out["loss/vf"] = float(vf_loss.detach())
        out.update({f"value/{k}": float(v) for k, v in vf_stats.items()})
    if m.estimator == "grpo" and beta > 0:
        kl_loss = masked_mean(kl_k3(logps, ref_logps), mask)  # reference log-probs from the rollout phase
        loss = loss + beta * kl_loss
        out["loss/kl"] = float(kl_loss.detach())
    out["policy/entropy"] = float(masked_mean(entropy, mask))
    out["loss/total"] = float(loss.detach())
    out = distributed.weighted_stats(out, share, max_keys=("policy/ratio_max",))  # the minibatch's, over processes
    skipped = 1.0
    if guard.check(out["loss/total"]):  # the global loss: every process decides alike
        (loss * share).backward()
        distributed.sync_gradients(params)
        grad_norm = distributed.clip_grad_norm(params, tc.max_grad_norm)  # sharded + replicated under FSDP
        out["grad_norm"] = float(grad_norm)
        if guard.check(grad_norm):  # a NaN/inf gradient skips the step too
            opt.step()
            skipped = 0.0
    out["skipped_steps"] = skipped
    opt.zero_grad(set_to_none=True)
    return out


def eval_summary(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Mean held-out score before and after, their standard errors and the paired difference's.

    A prompt's ``eval_samples`` responses are not independent draws of the held-out mean, so each
    prompt's mean score is one observation: s.e. = std over prompts / sqrt(prompts). The
    difference is paired by prompt (after − before per prompt), which removes the prompts' own
    spread from its error."""
    def per_prompt(rows: list[dict]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r["prompt"], []).append(r["score"])
        return {p: sum(v) / len(v) for p, v in groups.items()}

    def mean_se(xs: list[float]) -> tuple[float, float]:
        n = len(xs)
        mean = sum(xs) / max(n, 1)
        var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
        return mean, math.sqrt(var / n) if n > 1 else float("nan")

    b, a = per_prompt(before), per_prompt(after)
    mb, seb = mean_se(list(b.values()))
    ma, sea = mean_se(list(a.values()))
    diff, sed = mean_se([a[p] - b[p] for p in b if p in a])
    return {"score_before": mb, "score_after": ma, "se_before": seb, "se_after": sea, "diff": diff, "se_diff": sed,
            "eval_prompts": len(b), "eval_samples": len(before) // max(len(b), 1)}


def _write_eval(run_dir: Path, before: list[dict], after: list[dict]) -> dict[str, Any]:
    """A before/after table of held-out samples and scores (printed, and saved as CSV)."""
    import csv

    with open(run_dir / "eval_before_after.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "sample", "before", "score_before", "after", "score_after"])
        for b, a in zip(before, after):
            w.writerow([b["prompt"], b.get("sample", 0), b["output"], f"{b['score']:.4f}", a["output"],
                        f"{a['score']:.4f}"])
    summary = eval_summary(before, after)

    def short(s: str, n: int = 60) -> str:
        s = " ".join(s.split())
        return s if len(s) <= n else s[: n - 1] + "…"

    print(f"\n{'prompt':32s} | {'before':60s} | score | {'after':60s} | score")
    firsts = [(b, a) for b, a in zip(before, after) if b.get("sample", 0) == 0]  # one sample per prompt
    for b, a in firsts[:10]:
        print(f"{short(b['prompt'], 32):32s} | {short(b['output']):60s} | {b['score']:+.2f} | "
              f"{short(a['output']):60s} | {a['score']:+.2f}")
    s = summary
    print(f"\nmean held-out score: {s['score_before']:+.3f} -> {s['score_after']:+.3f}   "
          f"({s['eval_prompts']} prompts x {s['eval_samples']} samples; s.e. {s['se_before']:.3f} -> "
          f"{s['se_after']:.3f}; change {s['diff']:+.3f} +- {s['se_diff']:.3f} paired s.e.)   run: {run_dir}")
    return summary
