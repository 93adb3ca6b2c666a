"""ILQL: offline RL from scored samples, as trlX does it (Snell et al. 2022, "Offline RL for
Natural Language Generation with Implicit Language Q Learning").

Samples (:mod:`ankus.data.ilql`): a JSONL file of (prompt, completion, reward) rows or trlX's
``randomwalks``; rewards become standardized returns on the last action (the appended EOS). A
step: the LM's logits and hidden states, ILQL heads on those (two Q, their Polyak targets, V),
:func:`ankus.losses.ilql.ilql_loss`; every ``steps_for_target_q_sync`` steps the targets move
toward the online heads by ``alpha``. A frozen LM (``num_layers_unfrozen: 0``, no LoRA) runs
once (``cache_trunk``), then steps run the heads alone. Evaluation sweeps β of
:func:`ankus.generation.ilql.ilql_generate` (β = 0 is the plain LM). Under several processes each
takes its block of one global batch; loss terms are means over the global batch and gradients
are summed, so every replica takes the same step and Polyak sync; rank 0 evaluates and writes.
Every config field is read or refused (:func:`check_config`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ankus import distributed
from ankus.config import ConfigError, LoRAConfig, ModelConfig, RunConfig, TrainerConfig
from ankus.data.ilql import (batch_indices, cache_trunk, cached_collate, cached_forward, ilql_collate, ilql_forward,
                             read_samples, standardize_returns, tokenize_samples)
from ankus.data.prompts import load_prompts
from ankus.data.tokens import pad_id as pad_token
from ankus.generation.engine import GenerationConfig
from ankus.generation.ilql import ilql_generate
from ankus.losses.ilql import ilql_loss
from ankus.models.heads import ILQLHeads, load_ilql_heads, save_ilql_heads
from ankus.models.hydra import freeze_for_hydra
from ankus.models.loading import load_model
from ankus.models.lora import apply_lora

__all__ = ["ILQLMethod", "ILQLData", "ILQLEval", "Config", "check_config", "train", "train_step", "evaluate",
           "load_samples", "save_ilql", "load_ilql"]


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
    """Top decoder blocks of the LM trained (and the final norm); -1 = all, 0 = frozen LM; not with LoRA."""
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
    """The LM: a load_model spec, e.g. 'randomwalks-gpt2' (trlX's from-scratch GPT-2 with a per-node tokenizer)."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=5e-5, batch_size=128, total_steps=1000))
    """Optimisation (trlX's ILQL defaults: lr 5e-5, batch 128); total_steps counts optimizer steps."""
    method: ILQLMethod = field(default_factory=ILQLMethod)
    """ILQL hyper-parameters (trlX's defaults)."""
    data: ILQLData = field(default_factory=ILQLData)
    """Offline samples and eval prompts."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=56, top_k=20))
    """Eval sampling (trlX: max_new_tokens 56, top_k 20); β comes from eval.betas. ILQL's sampler
    runs the model's own forward on a KV cache: the CFG, packed-linear and CUDA-graph fields must
    stay at their defaults (:func:`check_config`)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the LM (``enabled``), trained instead of its top ``method.num_layers_unfrozen`` blocks."""
    eval: ILQLEval = field(default_factory=ILQLEval)
    """The β sweep and its scorer."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# What ILQL's sampler does not do: each of these generation fields must keep its default.
_SAMPLER_LACKS = {**dict.fromkeys(("guidance_scale", "negative_prompt"), "its sampler has no classifier-free guidance"),
                  **dict.fromkeys(("packed_linears", "move_frozen", "bf16"), "its sampler uses no packed linears"),
                  **dict.fromkeys(("cuda_graph", "compile"), "its sampler decodes eagerly, no CUDA graph")}


def check_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` for a setting ILQL would otherwise ignore (every field of the
    config is either read or refused here) or one out of range."""
    default, g = Config(), cfg.generation
    refused = {f"generation.{k}": (getattr(g, k), why) for k, why in _SAMPLER_LACKS.items()
               if getattr(g, k) != getattr(default.generation, k)}
    if cfg.trainer.fsdp:
        refused["trainer.fsdp"] = (True, "ILQL trains data parallel, a replica per process; it does not shard")
    if not cfg.lora.enabled:  # r, alpha, dropout, target only shape adapters
        refused.update({f"lora.{f.name}": (getattr(cfg.lora, f.name), "lora.enabled is false")
                        for f in fields(LoRAConfig) if getattr(cfg.lora, f.name) != getattr(default.lora, f.name)})
    elif cfg.method.num_layers_unfrozen != default.method.num_layers_unfrozen:
        refused["method.num_layers_unfrozen"] = (cfg.method.num_layers_unfrozen,
                                                 "with lora.enabled the adapters train and the LM stays frozen")
    if (cfg.data.walks_seed != default.data.walks_seed
            and "randomwalks" not in (cfg.data.dataset, _eval_source(cfg.data), _scorer_name(cfg))):
        refused["data.walks_seed"] = (cfg.data.walks_seed, "neither data, eval prompts nor scorer is randomwalks")
    if refused:
        raise ConfigError("; ".join(f"{k} = {v!r} is not used by ilql ({why}); leave it at its default"
                                    for k, (v, why) in refused.items()))
    if cfg.method.steps_for_target_q_sync < 1:
        raise ConfigError("method.steps_for_target_q_sync must be >= 1")


def _prepare_trainable(model, cfg: Config):
    """LoRA adapters, or trlX-style top-N unfreezing; returns the model to train."""
    if cfg.lora.enabled:
        return apply_lora(model, cfg.lora)
    freeze_for_hydra(model, cfg.method.num_layers_unfrozen)
    return model


def load_samples(data: ILQLData) -> tuple[list[str], list[str], list[float]]:
    """(prompts, completions, rewards) of ``data.dataset`` (:func:`ankus.data.ilql.read_samples`)."""
    return read_samples(data.dataset, walks_seed=data.walks_seed)


def train_step(model, heads: ILQLHeads, batch: dict[str, Tensor], opt: torch.optim.Optimizer, params: list[Tensor],
               method: ILQLMethod, step: int, *, max_grad_norm: float = 1.0, grad_accum: int = 1,
               scheduler=None, guard=None) -> dict[str, float]:
    """One optimizer step on ``batch`` (split into ``grad_accum`` micro-batches), then the Polyak
    sync of the target heads when ``step`` (1-based count of optimizer steps) is a multiple of
    ``steps_for_target_q_sync``. Returns float stats; ``skipped`` = 1 when the guard refused.
    Under several processes ``batch`` is this process's block of the global batch: a micro-batch
    weighs its share of the *global* count of masked steps, gradients are summed over processes
    before clipping, and the stats are the global batch's. A ``cached_collate`` batch (frozen LM)
    runs the heads alone (``model`` is unused)."""
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
# evaluation


def _eval_source(data: ILQLData) -> str:
    return data.eval_prompts or ("randomwalks" if data.dataset == "randomwalks" else "review_openings")


def _eval_prompts(data: ILQLData) -> list[str]:
    prompts = load_prompts(_eval_source(data), "eval", walks_seed=data.walks_seed)
    return prompts[: data.num_eval] if data.num_eval else prompts


def _scorer_name(cfg: Config) -> str:
    return cfg.eval.reward or ("randomwalks" if cfg.data.dataset == "randomwalks" else "sentiment")


def _eval_scorer(cfg: Config) -> Callable:
    from ankus.rewards import get_reward_fn

    name = _scorer_name(cfg)
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


def _make_heads(m: ILQLMethod, hidden_size: int, vocab_size: int, model) -> ILQLHeads:
    if m.q_head not in ("mlp", "unembedding"):
        raise ValueError(f"method.q_head must be 'mlp' or 'unembedding', got {m.q_head!r}")
    unembedding = model.get_output_embeddings().weight.float() if m.q_head == "unembedding" else None
    return ILQLHeads(hidden_size, vocab_size, two_qs=m.two_qs, alpha=m.alpha, unembedding=unembedding)


def save_ilql(model, heads: ILQLHeads, tok, path: str | Path) -> Path:
    """The LM in Hugging Face format (LoRA merged) plus the heads
    (:func:`ankus.models.heads.save_ilql_heads`) in the same directory."""
    from ankus.runs import save_hf_model

    path = save_hf_model(model, tok, path)
    save_ilql_heads(heads, path)
    return path


def load_ilql(path: str | Path):
    """(model, tokenizer, heads) from a directory written by :func:`save_ilql`."""
    model, tok = load_model(str(path))
    return model, tok, load_ilql_heads(path, model.get_output_embeddings().weight)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class _Run:
    """What the parts of one training run share."""
    cfg: Config
    ds: Any  # distributed.DistState
    run_dir: Path
    policy: Any  # the LM being trained (LoRA-wrapped or partly frozen)
    heads: ILQLHeads
    tok: Any
    params: list[Tensor]
    opt: torch.optim.Optimizer
    scheduler: Any
    samples: tuple[list[list[int]], list[list[int]], list[float]]  # prompt ids, completion ids, returns
    eval_prompts: list[str]
    scorer: Callable
    base: float | None = None  # the untrained LM's mean eval score
    logger: Any = None
    frozen: bool = False  # the LM trains no parameter
    beta0_rows: list[dict] = field(default_factory=list)  # a frozen LM's β = 0 samples, from the base evaluation
    ses: dict[str, float] = field(default_factory=dict)  # standard error of each β's latest mean

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.policy, "heads": self.heads}


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ILQL on the configured offline samples; returns a summary (run_dir, eval means per β,
    the base model's mean, wall time)."""
    from ankus.runs import MetricsLogger

    check_config(cfg)
    t_start = time.perf_counter()
    run = _build(cfg, resume)
    start = _resume(run) if resume else 0
    run.logger = distributed.main_only(lambda: MetricsLogger(run.run_dir / "metrics.jsonl"))
    run.frozen = not any(p.requires_grad for p in run.policy.parameters())
    if run.base is None:  # the untrained LM (β = 0; the heads are random): the baseline to beat
        run.base = distributed.on_main(_evaluate, run, 0, [0.0], "base_")[_beta_key(0.0)]
    cache = None
    if run.frozen:  # the LM never changes: its hidden states are computed once, steps run the heads alone
        t0 = time.perf_counter()
        p_ids, c_ids, _ = run.samples
        cache = cache_trunk(run.policy, p_ids, c_ids, pad_token(run.tok), dtype=run.heads.v_head[0].weight.dtype)
        if run.ds.is_main:
            print(f"cached the frozen LM's hidden states of {len(cache)} samples in {time.perf_counter() - t0:.0f} s")
    step, stopped, skipped = _loop(run, start, cache)
    return _finish(run, step, stopped, skipped, t_start)


def _build(cfg: Config, resume: bool) -> _Run:
    """Run directory, LM, samples, heads, optimizer, in this order (heads and adapters draw their init)."""
    from ankus.optim import make_optimizer
    from ankus.runs import create_run_dir

    ds = distributed.setup()
    torch.manual_seed(cfg.trainer.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "ilql", cfg, exist_ok=resume)
    device = distributed.resolve_device(cfg.trainer.device)
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed)  # pad token set
    model.to(device)
    prompts, completions, rewards = load_samples(cfg.data)
    returns = standardize_returns(rewards) if cfg.method.standardize_returns else list(rewards)
    p_ids, c_ids = tokenize_samples(tok, prompts, completions, template=cfg.data.template,
                                    chat_template=cfg.generation.chat_template, seq_length=cfg.data.seq_length,
                                    append_eos=cfg.data.append_eos)
    eval_prompts = _eval_prompts(cfg.data)
    scorer = distributed.main_only(lambda: _eval_scorer(cfg))  # rank 0 evaluates
    hidden_size = model.config.get_text_config().hidden_size
    vocab_size = model.get_output_embeddings().weight.shape[0]
    heads = _make_heads(cfg.method, hidden_size, vocab_size, model).to(device)
    policy = _prepare_trainable(model, cfg)
    params = [p for p in policy.parameters() if p.requires_grad] + [p for p in heads.parameters() if p.requires_grad]
    opt, scheduler = make_optimizer(params, cfg.trainer)
    return _Run(cfg, ds, run_dir, policy, heads, tok, params, opt, scheduler, (p_ids, c_ids, returns),
                eval_prompts, scorer)


def _resume(run: _Run) -> int:
    """Load the run's latest checkpoint, if any; returns the step it was taken at (0 without one)."""
    from ankus.checkpoint import latest_checkpoint, load_checkpoint
    from ankus.runs import truncate_metrics

    ckpt = latest_checkpoint(run.run_dir)
    if ckpt is None:
        return 0
    state = load_checkpoint(ckpt, modules=run.modules, optimizer=run.opt, scheduler=run.scheduler)
    distributed.restore_rank_rng(ckpt)
    run.base = state.get("base")
    distributed.on_main(truncate_metrics, run.run_dir / "metrics.jsonl", state["step"])
    return state["step"]


def _evaluate(run: _Run, step: int, betas: Sequence[float], tag: str) -> dict[str, float]:
    """Rank 0's evaluation (the replicas are identical; call through ``distributed.on_main``):
    samples at each β, scored; logs the means and their standard errors and appends the samples
    to eval_samples.jsonl. β = 0 ignores the heads: with a frozen LM its samples (same seed) never
    change, so the base evaluation's stand for every later β = 0 instead of being sampled again."""
    reuse = run.frozen and bool(run.beta0_rows)
    todo = [b for b in betas if not (reuse and b == 0)]
    run.heads.eval()
    try:
        rows = evaluate(run.policy, run.heads, run.tok, run.eval_prompts, run.cfg, todo, run.scorer)[1] if todo else []
    finally:
        run.heads.train()
    if run.frozen and not run.beta0_rows:
        run.beta0_rows.extend(r for r in rows if r["beta"] == 0)
    if reuse and len(todo) < len(betas):
        rows = [dict(r) for r in run.beta0_rows] + rows
    by_beta = {_beta_key(b): [r["score"] for r in rows if r["beta"] == b] for b in betas}
    means = {k: sum(v) / len(v) for k, v in by_beta.items()}
    for k, v in by_beta.items():
        sd = math.sqrt(sum((x - means[k]) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        run.ses[k] = sd / math.sqrt(len(v))
    run.logger.log(step, {**{f"eval/{tag}{k}": v for k, v in means.items()},
                          **{f"eval_se/{tag}{k}": run.ses[k] for k in means}})
    with open(run.run_dir / "eval_samples.jsonl", "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"step": step, "tag": tag, **r}) + "\n")
    return means


def _loop(run: _Run, start: int, cache: list[dict[str, Tensor]] | None) -> tuple[int, bool, int]:
    """Optimizer steps ``start + 1 .. total_steps``; returns (last step, stopped early, skipped steps)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, save_checkpoint
    from tqdm.auto import tqdm

    cfg, tc, ds = run.cfg, run.cfg.trainer, run.ds
    p_ids, c_ids, returns = run.samples
    device = next(run.heads.parameters()).device
    guard = NonFiniteGuard(tc.max_bad_steps)
    n_trainable = sum(p.numel() for p in run.params)
    run.policy.train()
    run.heads.train()
    step, stopped = start, False
    bar = tqdm(range(start, tc.total_steps), desc="ilql", disable=not cfg.run.progress or not ds.is_main)
    global_batch = min(tc.batch_size * ds.world_size, len(p_ids))  # batch_size samples per process
    with GracefulExit() as stop:
        for step0 in bar:
            step = step0 + 1
            # one global batch, the same on every process; this process takes its block
            idx = distributed.shard(batch_indices(len(p_ids), global_batch, step0, tc.seed))
            rets = [returns[i] for i in idx]
            batch = (cached_collate([cache[i] for i in idx], [c_ids[i] for i in idx], rets) if cache is not None
                     else ilql_collate([p_ids[i] for i in idx], [c_ids[i] for i in idx], rets, pad_token(run.tok)))
            batch = {k: v.to(device) for k, v in batch.items()}
            t0 = time.perf_counter()
            stats = train_step(run.policy, run.heads, batch, run.opt, run.params, cfg.method, step,
                               max_grad_norm=tc.max_grad_norm, grad_accum=tc.grad_accum, scheduler=run.scheduler,
                               guard=guard)
            stats.update({"lr": run.scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0,
                          "perf/trainable_params": n_trainable})
            if step % tc.log_every == 0 or step == tc.total_steps:
                run.logger.log(step, stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", adv=f"{stats['values/advantage']:.3f}")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < tc.total_steps:
                distributed.on_main(_evaluate, run, step, cfg.eval.betas, "")
                run.policy.train()
            last = step == tc.total_steps
            stopping = distributed.any_rank(stop.requested)  # a signal that reached one process stops all
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0 and not last) or stopping:
                rngs = distributed.rank_rng_states()  # collective: every rank's RNG, saved by rank 0
                distributed.on_main(save_checkpoint, run.run_dir, step, modules=run.modules, optimizer=run.opt,
                                    scheduler=run.scheduler, generators=rngs, extra={"base": run.base},
                                    keep_last=tc.keep_last)
            if stopping:
                stopped = True
                break
    return step, stopped, guard.skipped


def _finish(run: _Run, step: int, stopped: bool, skipped: int, t_start: float) -> dict[str, Any]:
    """The final evaluation, plot, saved model and summary.json; returns the summary."""
    from ankus.runs import plot_metrics

    cfg, ses = run.cfg, run.ses
    run.policy.eval()
    final = {} if stopped else distributed.on_main(_evaluate, run, step, cfg.eval.betas, "")
    run.logger.close()
    keys = ["loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "values/advantage"]
    keys += [f"eval/{_beta_key(b)}" for b in cfg.eval.betas]
    distributed.on_main(plot_metrics, run.run_dir, keys, title="ILQL")
    if cfg.run.save_model and not stopped:
        distributed.on_main(save_ilql, run.policy, run.heads, run.tok, run.run_dir / "model")
    wall = time.perf_counter() - t_start
    summary = {"run_dir": str(run.run_dir), "steps": step, "base": run.base, "eval": final,
               "eval_se": {k: ses[k] for k in final if k in ses}, "wall_time_s": wall,
               "stopped_early": stopped, "skipped_steps": skipped}
    distributed.on_main((run.run_dir / "summary.json").write_text, json.dumps(summary, indent=2))
    if final and run.ds.is_main:
        sweep = "  ".join(f"{k}: {v:+.3f}" + (f" ± {ses[k]:.3f}" if k in ses else "") for k, v in final.items())
        print(f"\nILQL: base {run.base:+.3f}   {sweep}   ({wall:.0f} s)   run: {run.run_dir}")
    return summary
