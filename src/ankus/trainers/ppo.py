"""PPO for language models, as trlX does it (Havrilla et al. 2023), plus critic-free RLOO/GRPO.

One iteration:
  1. rollouts: ``num_rollouts`` responses sampled in chunks of ``chunk_size`` (``samples_per_prompt``
     per prompt), scored by the reward function;
  2. one no-grad forward gives the behaviour log-probs, values and the reference log-probs
     (Hydra branch, LoRA-disabled model, or a frozen copy), sharing each prompt among its k
     responses (``method.share_prompts``) or skipped where the update supplies the behaviour
     log-probs (``method.reuse_update_forward``) -- ankus.rl.rollouts;
  3. rewards = clipped score at the last response token − β·(logp − logp_ref) per token;
     advantages by GAE (critic, whitened over response tokens) or RLOO / GRPO (critic-free);
  4. ``ppo_epochs`` passes over the rollouts in shuffled minibatches of ``trainer.batch_size``
     (``trainer.grad_accum`` micro-batches each): clipped policy loss + ``vf_coef`` × clipped
     value loss (+ β·k3 KL loss for GRPO);
  5. the KL controller updates β; the learning-rate schedule steps (it counts iterations, as
     ``trainer.total_steps``, ``warmup_steps`` and ``decay_steps`` do).
Loss and KL math live in ankus.losses / ankus.rl (every use of β in ankus.rl.kl).

Several processes (torchrun, accelerate launch; see ankus.distributed): each samples
``num_rollouts`` from its block of one global prompt list, scores its own samples (or sends them
to the main process, ``reward.on_main``), and the rollouts are then shared, so advantages,
whitening, reward scaling, the KL fed to the controller and the logged metrics are the global
batch's. Each PPO minibatch is ``trainer.batch_size`` rollouts per process, split evenly;
gradients are summed over processes. N processes train as one process with N times the rollouts
and the batch size.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from ankus import distributed
from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint
from ankus.config import ConfigError, LoRAConfig, ModelConfig, RunConfig, TrainerConfig, reject_unused
from ankus.generation.engine import GenerationConfig
from ankus.losses.ppo import policy_loss, value_loss
from ankus.models.heads import ValueHead
from ankus.models.hydra import TrunkCache
from ankus.models.loading import load_model
from ankus.models.prefix import head_is_plain
from ankus.models.reference import make_reference
from ankus.optim import make_optimizer
from ankus.rewards import RewardConfig, RewardError, get_reward_fn
from ankus.rewards.randomwalks import WarmStart, warm_start
from ankus.rl.estimators import grpo_advantages, rloo_advantages, sequence_to_token_advantages
from ankus.rl.gae import gae_advantages
from ankus.rl.kl import kl_controller, kl_loss, kl_penalised_scores, per_token_rewards, response_kl
from ankus.rl.heldout import evaluate, train_and_eval_prompts, write_eval
from ankus.rl.rollouts import (Rollouts, behaviour_from_update, generate_rollouts, rewards_everywhere, rollout_config,
                               scored_rollouts, shares_prompts, update_forward)
from ankus.rl.stats import RunningMoments, masked_mean, masked_whiten, scale_scores
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
    """Where reference log-probs come from: hydra (frozen top-N branch), lora (adapters off, the
    top-level ``lora`` section), copy."""
    num_layers_unfrozen: int = 2
    """Top decoder blocks trained (hydra/copy); -1 = all (then the reference is a copy)."""
    cache_trunk: bool = True
    """Hydra: keep each rollout's hidden state at the split (B x T x H floats) from the scoring
    forward, so every PPO step runs only the top N blocks instead of the whole frozen trunk again
    (same numbers; false = recompute, less memory)."""
    share_prompts: bool = True
    """Run each distinct prompt once per forward, its keys and values shared by its k responses
    (samples_per_prompt > 1): the same numbers up to float rounding, ~1.7x less work at k=4
    (ankus.models.prefix; under Hydra the scoring forward only). false = every row runs its prompt."""
    rollout_bf16: bool | Literal["auto"] = "auto"
    """CPU: rollouts sampled with bf16 packed linears; scoring, updates and held-out evaluation stay fp32.
    auto = where measured >= 1.15x faster than fp32 here (ankus.generation.path_timing)."""
    reuse_update_forward: bool = True
    """GRPO with ppo_epochs 1 and one minibatch (TRL's num_iterations=1), reference lora/copy: take
    the behaviour log-probs from the update's own forward, detached, skipping the scoring phase's
    policy forward (same numbers; false = run it anyway)."""


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
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(total_steps=20))
    """Optimisation. total_steps, warmup_steps and decay_steps count PPO iterations: the LR schedule
    steps once per iteration. grad_accum: micro-batches per PPO minibatch (one optimizer step)."""
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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """The adapters of ``method.reference: lora``, which needs ``enabled: true`` (the policy trains
    them, the reference is the model with them off); with any other reference the section stays
    at its defaults (a set field raises)."""


class Nets(NamedTuple):
    """The policy (peft under LoRA), value head (GAE), reference and trunk cache (Hydra, or None)."""

    policy: torch.nn.Module
    value_head: ValueHead | None
    reference: Any
    trunk: TrunkCache | None


def check_config(cfg: Config, sharded: bool = False) -> None:
    """Settings that cannot work together, or that PPO would not read, raise ``ConfigError``."""
    m, tc = cfg.method, cfg.trainer
    if sharded and m.reference == "lora":
        raise ConfigError("trainer.fsdp with method.reference=lora is not supported: LoRA adapters are small, train "
                          "them data parallel (trainer.fsdp=false), or shard with method.reference=hydra or copy")
    if m.estimator in ("rloo", "grpo") and m.samples_per_prompt < 2:
        raise ConfigError(f"estimator '{m.estimator}' needs method.samples_per_prompt >= 2")
    if m.num_rollouts % m.samples_per_prompt:
        raise ConfigError("method.num_rollouts must be a multiple of method.samples_per_prompt")
    if cfg.data.eval_samples < 1:
        raise ConfigError(f"data.eval_samples must be >= 1, got {cfg.data.eval_samples}")
    if tc.grad_accum < 1:
        raise ConfigError(f"trainer.grad_accum must be >= 1 for the ppo trainer, got {tc.grad_accum}")
    if m.reference == "lora" and not cfg.lora.enabled:
        raise ConfigError("method.reference=lora trains LoRA adapters: set lora.enabled=true for the ppo trainer "
                          "(and lora.r, lora.alpha, ... as needed)")
    for unused, section, where, names, why in (
            (m.estimator != "gae", m, "method", ["gamma", "lam", "vf_coef", "cliprange_value", "whiten_advantages"],
             f"with method.estimator={m.estimator} (no value head; they shape GAE's advantages)"),
            (m.reference != "hydra", m, "method", ["cache_trunk"], f"with method.reference={m.reference} (no trunk)"),
            (cfg.generation.guidance_scale == 1.0, cfg.generation, "generation", ["negative_prompt"],
             "with generation.guidance_scale=1 (no guidance)"),
            (not cfg.warm_start.steps, cfg.warm_start, "warm_start", ["lr", "batch_size"], "without warm_start.steps"),
            (m.reference != "lora", cfg.lora, "lora", [f.name for f in fields(LoRAConfig)],
             f"unless method.reference=lora (it is '{m.reference}')")):
        if unused:
            reject_unused(section, names, "ppo", why, where)
    if cfg.warm_start.steps and cfg.data.prompts != "randomwalks":
        raise ConfigError(f"warm_start.steps: the ppo trainer fits random walks, not {cfg.data.prompts} prompts")


def _build_nets(model, cfg: Config, device, sharded: bool) -> Nets:
    """Reference (its copies taken before any sharding), policy, value head and trunk cache."""
    m = cfg.method
    mode = "copy" if m.num_layers_unfrozen == -1 and m.reference == "hydra" else m.reference  # nothing to branch from
    reference = make_reference(model, mode=mode, num_layers_unfrozen=m.num_layers_unfrozen, lora=cfg.lora)
    policy = reference.policy
    head_is_plain(policy)  # checked (and remembered) while every process still holds the whole model
    if sharded:  # FSDP2: the updates run sharded; sampling and scoring inside distributed.full_params
        distributed.fsdp_wrap(policy)
    # (under FSDP the trunk cache's view would bypass the root unit that gathers the final norm and head)
    trunk = TrunkCache(policy, reference.hidden_index) if mode == "hydra" and m.cache_trunk and not sharded else None
    value_head = ValueHead(model.config.get_text_config().hidden_size).to(device) if m.estimator == "gae" else None
    if value_head is not None:
        distributed.broadcast_parameters(value_head)
    return Nets(policy, value_head, reference, trunk)


@dataclass
class LoopState:
    """What an iteration carries to the next besides the networks and optimizer (checkpointed)."""

    kl_ctl: Any
    prompt_rng: random.Random
    gen: torch.Generator
    running: RunningMoments = field(default_factory=RunningMoments)
    ref_std: float | None = None
    before: list | None = None
    rollout_bf16: bool | None = None  # method.rollout_bf16 resolved at the first iteration (auto: measured)

    def extra(self) -> dict:
        return {"before": self.before, "ref_std": self.ref_std, "kl_ctl": self.kl_ctl.state_dict(),
                "running": self.running.state_dict(), "prompt_rng": self.prompt_rng.getstate(),
                "rollout_bf16": self.rollout_bf16}

    def load(self, state: dict) -> int:
        """Restore from a checkpoint's state; -> its iteration."""
        self.before, self.ref_std, self.rollout_bf16 = state["before"], state["ref_std"], state.get("rollout_bf16")
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.running.load_state_dict(state["running"])
        version, internal, gauss = state["prompt_rng"]  # JSON made the tuples lists
        self.prompt_rng.setstate((version, tuple(internal), gauss))
        return state["step"]


def train(cfg: Config, reward_fn: Callable | None = None, resume: bool = False) -> dict[str, Any]:
    """Run PPO; returns a summary (run_dir, before/after eval scores)."""
    m, tc = cfg.method, cfg.trainer
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    device = distributed.resolve_device(tc.device)
    sharded = distributed.use_fsdp(tc.fsdp)
    check_config(cfg, sharded)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "ppo", cfg, exist_ok=resume)
    if reward_fn is None and (ds.is_main or not cfg.reward.on_main):  # on_main: one copy, on rank 0
        reward_fn = get_reward_fn(cfg.reward.name, **cfg.reward.kwargs)
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    train_prompts, eval_prompts = train_and_eval_prompts(cfg.data.prompts, cfg.data.eval_prompts, cfg.data.num_eval,
                                                         walks_seed=cfg.reward.kwargs.get("seed", 1000))
    ws = cfg.warm_start
    if ws.steps:  # a supervised fit on the task's walks
        warm_start(model, tok, steps=ws.steps, lr=ws.lr, batch_size=ws.batch_size, seed=tc.seed,
                   walks_seed=cfg.reward.kwargs.get("seed", 1000), progress=cfg.run.progress)
    distributed.broadcast_parameters(model)  # every process starts from rank 0's weights, bit for bit
    nets = _build_nets(model, cfg, device, sharded)
    opt, sched = _make_optimizer(nets, tc, sharded)
    loop = LoopState(kl_controller(m.init_kl_coef, m.target, m.horizon), random.Random(tc.seed),
                     torch.Generator().manual_seed(tc.seed))
    # under FSDP the optimizer state is gathered by parameter name, over the policy and the value head
    owner = torch.nn.ModuleDict({"policy": nets.policy, "value_head": nets.value_head}) if nets.value_head else \
        nets.policy

    def views(gather: bool) -> tuple[dict, Any]:
        """The modules and optimizer as checkpoints see them (gathered stand-ins under FSDP)."""
        policy_view, opt_view = distributed.checkpoint_views(nets.policy, opt, gather=gather, optimizer_owner=owner)
        return {"policy": policy_view, **({"value_head": nets.value_head} if nets.value_head else {})}, opt_view

    def checkpoint(step: int) -> Path:
        modules, opt_view = views(gather=True)  # a collective under FSDP: every process
        return distributed.on_main(save_checkpoint, run_dir, step, modules=modules, optimizer=opt_view,
                                   scheduler=sched, generators={"rollouts": loop.gen, **distributed.rank_rng_states()},
                                   extra=loop.extra(), keep_last=tc.keep_last)

    start, ckpt = 0, latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:  # the reference was built from the initial model above, as in the first run
        modules, opt_view = views(gather=False)
        state = load_checkpoint(ckpt, modules=modules, optimizer=opt_view, scheduler=sched,
                                generators={"rollouts": loop.gen})
        distributed.restore_rank_rng(ckpt)
        start = loop.load(state)
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)
        if ds.is_main:
            print(f"resuming {run_dir} from iteration {start} ({ckpt.name})")
    else:
        loop.before = _evaluate(nets.policy, tok, eval_prompts, cfg, reward_fn)

    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    guard = NonFiniteGuard(tc.max_bad_steps)
    n_trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    bar = tqdm(range(start, tc.total_steps), desc="ppo", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    with GracefulExit() as stop:  # SIGTERM/SIGINT: finish the iteration, checkpoint, stop
        for it in bar:
            metrics = _iteration(nets, opt, guard, loop, cfg, tok, reward_fn, train_prompts, it, run_dir)
            sched.step()  # the schedule counts iterations
            metrics["perf/trainable_params"] = n_trainable
            if (it + 1) % tc.log_every == 0 or it == tc.total_steps - 1:
                logger.log(it + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.3f}")
            stopping = distributed.any_rank(stop.requested)  # a signal that reached one process stops all
            if stopping or (tc.checkpoint_every and (it + 1) % tc.checkpoint_every == 0):
                path = checkpoint(it + 1)
                if stopping:
                    logger.close()
                    if ds.is_main:
                        print(f"stopped by signal after iteration {it + 1}; resume with --resume (checkpoint {path})")
                    return {"run_dir": str(run_dir), "stopped_at": it + 1}
    logger.close()
    return _finish(nets.policy, tok, eval_prompts, cfg, reward_fn, run_dir, loop.before, nets.reference.mode)


def _make_optimizer(nets: Nets, tc: TrainerConfig, sharded: bool):
    """AdamW and its learning-rate schedule (ankus.optim) over what trains."""
    policy_params = [p for p in nets.policy.parameters() if p.requires_grad]
    head_params = list(nets.value_head.parameters()) if nets.value_head else []
    # FSDP: sharded (DTensor) policy and plain value-head parameters in two groups (one fused step cannot mix them)
    groups = [{"params": policy_params}, {"params": head_params}] if sharded and head_params else \
        policy_params + head_params
    return make_optimizer(groups, tc)


def _iteration(nets: Nets, opt, guard, loop: LoopState, cfg: Config, tok, reward_fn, train_prompts: list[str],
               it: int, run_dir: Path) -> dict[str, float]:
    """One PPO iteration: rollouts, advantages, the PPO epochs, the KL controller. -> metrics."""
    m = cfg.method
    n_prompts = m.num_rollouts // m.samples_per_prompt
    # one global prompt list from the shared stream; each process takes its block, k copies of each
    prompts = [loop.prompt_rng.choice(train_prompts) for _ in range(n_prompts * distributed.world_size())]
    prompts = [cfg.data.template.format(prompt=p) for p in distributed.shard(prompts)
               for _ in range(m.samples_per_prompt)]
    batch, t_gen = _collect(nets, tok, reward_fn, cfg, prompts, loop, it, run_dir)
    seq_scores = batch.scores if batch.scores.dim() == 1 else batch.scores.sum(1)  # (B,) before scaling
    batch.scores, loop.ref_std = scale_scores(batch.scores, m.scale_reward, loop.running, loop.ref_std)
    beta = loop.kl_ctl.value
    kl = _advantages(batch, m, beta)  # (B, N), or None when the update supplies the behaviour log-probs
    t1 = time.perf_counter()
    stats, behaviour_kl = _update(nets, opt, guard, batch, cfg, beta, loop.gen)
    mean_kl = float(kl.sum(1).mean()) if kl is not None else behaviour_kl
    B, n_tokens = len(batch), float(batch.mask.sum())
    loop.kl_ctl.update(mean_kl, n_steps=B)
    t_train = time.perf_counter() - t1
    return {"reward/mean": float(seq_scores.mean()), "reward/std": float(seq_scores.std()) if B > 1 else 0.0,
            "kl/mean": mean_kl, "kl/beta": beta, **stats, "response/length": n_tokens / B, "time/generate_s": t_gen,
            "time/train_s": t_train, "perf/tokens_per_s": n_tokens / max(t_gen, 1e-9), "lr": opt.param_groups[0]["lr"]}


def _collect(nets: Nets, tok, reward_fn, cfg: Config, prompts: list[str], loop: LoopState, it: int,
             run_dir: Path) -> tuple[Rollouts, float]:
    """This iteration's rollouts, sampled and scored, and the sampling's seconds; a reward failure
    anywhere saves the policy and stops every process."""
    m, t0 = cfg.method, time.perf_counter()
    nets.policy.eval()
    with torch.no_grad(), distributed.full_params(nets.policy):
        if loop.rollout_bf16 is None:  # decided once per run and checkpointed: a resumed run samples alike
            loop.rollout_bf16 = rollout_config(nets.policy, cfg.generation, m.rollout_bf16, m.chunk_size).bf16
        gen_cfg = rollout_config(nets.policy, cfg.generation, loop.rollout_bf16, m.chunk_size)
        out = generate_rollouts(nets.policy, tok, prompts, gen_cfg, m.chunk_size, loop.gen)
    t_gen = time.perf_counter() - t0
    raw, error = rewards_everywhere(reward_fn, prompts, out.texts, it, cfg.reward.on_main)
    if error is not None:
        saved = _save_policy(nets.policy, tok, run_dir / f"checkpoint-{it}")
        raise RewardError(f"{error}. The model so far was saved to {saved}") from error.__cause__
    reuse = behaviour_from_update(m, cfg.trainer.batch_size, nets.reference, nets.policy)
    batch = scored_rollouts(nets.policy, nets.value_head, nets.reference, out, raw, cliprange_reward=m.cliprange_reward,
                            chunk=m.chunk_size, keep_hidden=nets.trunk is not None, behaviour=not reuse,
                            shared=shares_prompts(nets.policy, m))
    return batch, t_gen


def _advantages(batch: Rollouts, m: PPOMethod, beta: float):
    """Sets ``batch.advantages`` (and ``returns`` under GAE); returns the per-token KL (B, N), or
    None when the behaviour log-probs come from the update."""
    if m.estimator == "gae":
        rewards, kl = per_token_rewards(batch.scores, batch.logps, batch.ref_logps, batch.mask, beta)
        advantages, batch.returns = gae_advantages(rewards, batch.values, batch.mask, m.gamma, m.lam)
        batch.advantages = masked_whiten(advantages, batch.mask) if m.whiten_advantages else advantages
        return kl
    kl = None if batch.logps is None else response_kl(batch.logps, batch.ref_logps, batch.mask)
    seq = batch.scores if batch.scores.dim() == 1 else batch.scores.sum(1)  # (B,)
    if m.estimator == "rloo":  # KL in the sequence reward (Ahmadian et al. 2024)
        seq_adv = rloo_advantages(kl_penalised_scores(seq, kl, beta), m.samples_per_prompt)
    else:  # GRPO: KL goes into the loss instead
        seq_adv = grpo_advantages(seq, m.samples_per_prompt)
    batch.advantages = sequence_to_token_advantages(seq_adv, batch.mask)
    return kl


def _update(nets: Nets, opt, guard: NonFiniteGuard, batch: Rollouts, cfg: Config, beta: float,
            gen: torch.Generator) -> tuple[dict[str, float], float | None]:
    """``ppo_epochs`` passes in shuffled global minibatches -> (mean statistics, and the KL of the
    behaviour log-probs the update supplied, or None)."""
    nets.policy.train()
    stats: dict[str, list[float]] = {}
    B, mb_size = len(batch), cfg.trainer.batch_size * distributed.world_size()  # batch_size rows per process
    shared = shares_prompts(nets.policy, cfg.method)
    behaviour: list[torch.Tensor] = []  # the update's own log-probs, detached (when batch.logps is None)
    for _ in range(cfg.method.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for s in range(0, B, mb_size):
            minibatch = order[s:s + mb_size]
            idx = minibatch[slice(*distributed.shard_bounds(len(minibatch)))]  # this process's block
            for k, v in _ppo_step(nets, opt, guard, batch, idx, minibatch, cfg, beta, shared, behaviour).items():
                stats.setdefault(k, []).append(v)
    mean_kl = None
    if batch.logps is None:  # the KL over every process's rows (one minibatch: this process's rows)
        idx = order[slice(*distributed.shard_bounds(B))]
        kl_sum = response_kl(torch.cat(behaviour), batch.ref_logps[idx], batch.mask[idx]).sum()
        mean_kl = float(distributed.all_reduce_sum(kl_sum.double().reshape(1))) / B
    return {k: sum(v) / len(v) for k, v in stats.items()}, mean_kl


def _ppo_step(nets: Nets, opt, guard: NonFiniteGuard, batch: Rollouts, idx, minibatch, cfg: Config, beta: float,
              shared: bool, behaviour: list) -> dict[str, float]:
    """One optimizer step on this process's rows ``idx`` of ``minibatch``, in ``trainer.grad_accum``
    micro-batches, each one's token-mean losses scaled by its share of the minibatch's response
    tokens: gradients and statistics summed over micro-batches and processes are the minibatch's."""
    total = max(float(batch.mask[minibatch].sum()), 1.0)
    pieces = min(cfg.trainer.grad_accum, max(len(minibatch) // distributed.world_size(), 1))  # alike on every rank
    out: dict[str, float] = {}
    for piece in idx.tensor_split(pieces):
        mb = batch[piece]
        share = float(mb.mask.sum()) / total
        loss, piece_stats = _losses(nets, mb, cfg.method, beta, shared, behaviour)
        (loss * share).backward()
        for k, v in piece_stats.items():
            out[k] = max(out.get(k, v), v) if k == "policy/ratio_max" else out.get(k, 0.0) + v * share
    out = distributed.weighted_stats(out, 1.0, max_keys=("policy/ratio_max",))  # the minibatch's, over processes
    params = [p for g in opt.param_groups for p in g["params"]]
    skipped = 1.0
    if guard.check(out["loss/total"]):  # the global loss: every process decides alike
        distributed.sync_gradients(params)
        grad_norm = distributed.clip_grad_norm(params, cfg.trainer.max_grad_norm)  # sharded + replicated under FSDP
        out["grad_norm"] = float(grad_norm)
        if guard.check(grad_norm):  # a NaN/inf gradient skips the step too
            opt.step()
            skipped = 0.0
    out["skipped_steps"] = skipped
    opt.zero_grad(set_to_none=True)
    return out


def _losses(nets: Nets, mb: Rollouts, m: PPOMethod, beta: float, shared: bool, behaviour: list):
    """The PPO loss of one micro-batch and its statistics. ``mb.logps is None`` (the first and only
    update on these rollouts): the behaviour log-probs are this forward's, detached (ratio 1, the
    gradient of ρ), appended to ``behaviour``."""
    value_head = nets.value_head
    logps, entropy, values = update_forward(nets.policy, value_head, nets.trunk, mb, shared)  # entropy: no grad
    old_logps = mb.logps if mb.logps is not None else logps.detach()
    if mb.logps is None:
        behaviour.append(old_logps)
    pg_loss, pg_stats = policy_loss(logps, old_logps, mb.advantages, mb.mask, m.cliprange)
    loss = pg_loss
    out = {"loss/pg": float(pg_loss.detach()), **{f"policy/{k}": float(v) for k, v in pg_stats.items()}}
    if value_head is not None:
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.mask, m.cliprange_value)
        loss = loss + m.vf_coef * vf_loss
        out["loss/vf"] = float(vf_loss.detach())
        out.update({f"value/{k}": float(v) for k, v in vf_stats.items()})
    if m.estimator == "grpo" and beta > 0:
        penalty, kl_term = kl_loss(logps, mb.ref_logps, mb.mask, beta)  # reference log-probs from the rollout phase
        loss = loss + penalty
        out["loss/kl"] = float(kl_term.detach())
    out["policy/entropy"] = float(masked_mean(entropy, mb.mask))
    out["loss/total"] = float(loss.detach())
    return loss, out


def _evaluate(policy, tok, prompts: list[str], cfg: Config, reward_fn) -> list[dict]:
    """The held-out samples and scores (main process), the same seed before and after training."""
    with distributed.full_params(policy):
        return distributed.on_main(evaluate, policy, tok, prompts, cfg.generation, reward_fn, cfg.trainer.seed + 12345,
                                   template=cfg.data.template, samples=cfg.data.eval_samples,
                                   batch_size=cfg.method.chunk_size)


def _finish(policy, tok, eval_prompts, cfg: Config, reward_fn, run_dir: Path, before: list,
            reference_mode: str) -> dict[str, Any]:
    """The held-out evaluation after training, the plot, the saved model and the summary."""
    after = _evaluate(policy, tok, eval_prompts, cfg, reward_fn)
    distributed.on_main(plot_metrics, run_dir, ["reward/mean", "kl/mean", "loss/pg", "loss/vf", "policy/entropy"],
                        title="PPO")
    if cfg.run.save_model:
        _save_policy(policy, tok, run_dir / "model")
    summary = distributed.on_main(write_eval, run_dir, before, after)
    summary.update(run_dir=str(run_dir), reference=reference_mode)
    return summary


def _save_policy(policy, tok, path: Path):
    """Save the policy in HF format from the main process (a collective under FSDP). -> the path."""
    return distributed.on_main(save_hf_model, distributed.unsharded_copy(policy), tok, path)
