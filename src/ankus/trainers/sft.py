"""Supervised fine-tuning: next-token cross-entropy on completion tokens only.

Data is one of
  * JSONL rows ``{"prompt": ..., "completion": ...}`` -- the loss covers the completion (and an
    EOS token after it), never the prompt;
  * JSONL rows ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- rendered with the
    tokenizer's chat template; the loss covers the assistant turns only (their text and the
    template's end-of-turn tokens, so the model learns to stop);
  * a built-in set (``randomwalks``, ``sft_tiny``), a directory written by ``datasets``'
    ``save_to_disk``, or the name of a ``datasets`` dataset already in the local cache.

Batches carry no padding waste: examples are packed end to end (default) or bucketed by length
(:mod:`ankus.data.batching`). The loss is a token-level mean over a step's completion tokens, so
packing, bucketing, padding and gradient accumulation all give the same gradient. LoRA
(``lora.enabled``) trains adapters only; the saved model has them merged. The LR follows
``trainer.lr_schedule`` (:mod:`ankus.optim`).

One step: ``trainer.batch_size`` examples -> ``grad_accum`` micro-batches -> forward with logits
computed only where a target token follows -> ``sft_loss`` -> backward -> clip -> AdamW.

Several processes (torchrun, accelerate launch; see ankus.distributed): a step's global batch is
``trainer.batch_size`` examples per process, each process takes its block, and each micro-batch's
loss is weighted by its share of the *global* target-token count, so the gradients summed over
processes are those of one process training on the whole batch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ankus import distributed
from ankus.config import ConfigError, LoRAConfig, ModelConfig, RunConfig, TrainerConfig, reject_unused
from ankus.data.batching import (Batch, BatchingMode, Example, make_batch, micro_batches, packing_is_exact,
                                 split_eval, step_batches)
from ankus.data.io import DataError
from ankus.data.supervised import (SFTData, load_rows, tokenize_chat, tokenize_prompt_completion,  # noqa: F401
                                   tokenize_row)
from ankus.data.tokens import pad_id as pad_token
from ankus.losses.sft import sft_loss
from ankus.models.loading import load_model
from ankus.models.lora import apply_lora
from ankus.optim import make_optimizer
from ankus.rewards.randomwalks import randomwalk_eval
from ankus.rewards.sentiment import sentiment_eval
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics

__all__ = ["SFTData", "SFTMethod", "SFTEval", "Config", "train", "check_config", "prepare_examples", "load_rows",
           "tokenize_row", "tokenize_prompt_completion", "tokenize_chat", "sft_batch_loss", "evaluate_loss",
           "task_eval"]


@dataclass
class SFTMethod:
    eval_every: int = 0
    """Held-out loss every this many steps; 0 = at the end only."""


@dataclass
class SFTEval:
    task: Literal["auto", "none", "randomwalks", "sentiment"] = "auto"
    """Sampling eval before and after training: randomwalks (legal walks, optimality), sentiment (VADER on
    held-out review openings); auto = randomwalks for the randomwalks data, else none."""
    samples_per_prompt: int = 0
    """Samples per eval prompt (randomwalks: per start node); 0 = no sampling eval."""
    max_new_tokens: int = 24
    """Tokens generated per sample."""
    temperature: float = 1.0
    """Sampling temperature."""
    batch_size: int = 64
    """Generation batch size."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=1e-4, batch_size=16, total_steps=200))
    """Optimisation; total_steps counts optimizer steps."""
    data: SFTData = field(default_factory=SFTData)
    """Training data and batching."""
    method: SFTMethod = field(default_factory=SFTMethod)
    """Eval cadence."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning (the saved model has them merged)."""
    eval: SFTEval = field(default_factory=SFTEval)
    """Sampling eval of the trained model (built-in tasks)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# the loss on a batch


def sft_batch_loss(model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`ankus.losses.sft.sft_loss` over a batch, with logits computed only where they are used.

    The output head is most of a small model's cost (SmolLM2: 49,152 x hidden per token), and a
    prompt position's logits are never scored. So the model is asked (``logits_to_keep``) for
    the logits of positions t whose next token is a target in some row; each kept (position,
    next token) pair is handed to ``sft_loss`` as a two-token sequence [context, target], whose
    shift then scores exactly ``logits[t]`` against ``token[t + 1]``.
    """
    batch = batch.to(next(model.parameters()).device)
    keep = batch.loss_mask[:, 1:].any(0).nonzero().squeeze(1)  # (K,) positions t with a target at t + 1
    out = model(**batch.model_inputs(), logits_to_keep=keep, use_cache=False)
    logits = out.logits  # (R, K, V): logits[:, j] predicts the token at keep[j] + 1
    targets = batch.input_ids[:, keep + 1]  # (R, K)
    target_mask = batch.loss_mask[:, keep + 1]  # (R, K)
    V = logits.shape[-1]
    pair_logits = logits.reshape(-1, 1, V).expand(-1, 2, V)  # (R*K, 2, V); only position 0 is scored
    pair_labels = torch.stack([targets, targets], -1).reshape(-1, 2)  # (R*K, 2)
    pair_mask = torch.stack([torch.zeros_like(target_mask), target_mask], -1).reshape(-1, 2)  # (R*K, 2)
    return sft_loss(pair_logits, pair_labels, pair_mask)


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, mode: BatchingMode, pack_length: int,
                  batch_size: int = 32) -> float:
    """Token-level mean loss over ``examples``."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = make_batch(examples[s:s + batch_size], pad_id, mode, pack_length)
        loss, stats = sft_batch_loss(model, batch)
        total += float(loss.detach()) * int(stats["tokens"])
        n += int(stats["tokens"])
    model.train(was_training)
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# the random-walks task eval


def _generation(cfg: "Config", chat_template: bool):
    from ankus.generation import GenerationConfig

    ev = cfg.eval
    return GenerationConfig(max_new_tokens=ev.max_new_tokens, do_sample=ev.temperature > 0,
                            temperature=max(ev.temperature, 1e-6), chat_template=chat_template)


def _eval_task(cfg: "Config") -> str:
    task = cfg.eval.task
    if task == "auto":
        task = "randomwalks" if cfg.data.name == "randomwalks" else "none"
    return "none" if not cfg.eval.samples_per_prompt else task


def task_eval_on(cfg: "Config") -> bool:
    """Whether a sampling eval is configured."""
    return _eval_task(cfg) != "none"


def task_eval(model, tok, cfg: "Config", seed: int) -> dict[str, Any]:
    """The configured sampling eval, as ``eval/<metric>`` (plus ``_examples``); {} when off."""
    task = _eval_task(cfg)
    if task == "none":
        return {}
    was_training = model.training
    model.eval()
    try:
        ev = cfg.eval
        if task == "randomwalks":
            out = randomwalk_eval(model, tok, cfg.data.kwargs, ev.samples_per_prompt, _generation(cfg, False),
                                  ev.batch_size, seed)
        else:
            out = sentiment_eval(model, tok, cfg.data.template, ev.samples_per_prompt,
                                 _generation(cfg, cfg.data.chat_template), ev.batch_size, seed)
    finally:
        model.train(was_training)
    return {("_examples" if k == "_examples" else f"eval/{k}"): v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# training


def check_config(cfg: Config) -> None:
    """Reject settings this trainer would ignore: a :class:`ConfigError` names the field."""
    d = cfg.data
    if d.name != "randomwalks":
        reject_unused(d, ["kwargs"], "sft", "unless data.name is randomwalks", "data")
    if d.name in ("randomwalks", "sft_tiny") or d.name.endswith(".jsonl") or Path(d.name).is_file():
        reject_unused(d, ["split"], "sft", "for a built-in set or a JSONL file (only for a datasets dataset)", "data")
    if d.min_score is None:
        reject_unused(d, ["score_field"], "sft", "without data.min_score", "data")
    if d.batching != "pack":
        reject_unused(d, ["pack_length"], "sft", "unless data.batching is pack", "data")
    if _eval_task(cfg) == "none":
        reject_unused(cfg.eval, ["max_new_tokens", "temperature", "batch_size"], "sft",
                      "when no sampling eval runs (eval.samples_per_prompt 0 or eval.task none)", "eval")
    if not cfg.lora.enabled:
        reject_unused(cfg.lora, ["r", "alpha", "dropout", "target"], "sft", "unless lora.enabled is true", "lora")
    elif cfg.trainer.fsdp:
        raise ConfigError("trainer.fsdp with lora.enabled is not supported by the sft trainer: LoRA adapters are "
                          "small, train them data parallel (trainer.fsdp=false)")


def prepare_examples(tok, d: SFTData, seed: int) -> tuple[list[Example], list[Example], int]:
    """The configured rows tokenized and split: (train, eval, number of rows dropped)."""
    rows = load_rows(d)
    examples = []
    for i, row in enumerate(rows):
        try:
            ex = tokenize_row(tok, row, d)
        except DataError as e:
            raise DataError(f"data '{d.name}', row {i + 1}: {e}") from None
        if ex is not None:
            examples.append(ex)
    if not examples:
        raise DataError(f"data '{d.name}': no example has a completion token to learn")
    train_ex, eval_ex = split_eval(examples, d.eval_fraction, seed)
    return train_ex, eval_ex, len(rows) - len(examples)


def _step(model, params, opt, sched, guard, micro: list[Batch], filler: Batch | None, tc: TrainerConfig,
          sharded: bool) -> dict[str, Any]:
    """One optimizer step over this process's micro-batches; returns the step's statistics."""
    t0 = time.perf_counter()
    if sharded:  # a process with fewer micro-batches runs zero-weighted ones: FSDP needs equal forwards
        n_micro = int(distributed.all_reduce_max(torch.tensor([float(len(micro))]))[0])
    local_targets = sum(int(mb.loss_mask[:, 1:].sum()) for mb in micro)
    n_targets = distributed.sum_floats(local_targets)[0]  # over every process's block
    total_loss = 0.0
    for mb in micro:
        loss, stats = sft_batch_loss(model, mb)
        # weight each micro-batch by its share of the step's targets: the sum (over micro-batches
        # and processes) equals the token-level mean over the whole batch, whatever the split
        (loss * (int(stats["tokens"]) / n_targets)).backward()
        total_loss += float(loss.detach()) * int(stats["tokens"]) / n_targets
    for _ in range(n_micro - len(micro) if sharded else 0):
        (sft_batch_loss(model, filler)[0] * 0.0).backward()
    total_loss = distributed.sum_floats(total_loss)[0]
    if not sharded:  # FSDP has reduce-scattered (summed) the gradients already
        distributed.sync_gradients(params)
    grad_norm = (distributed.clip_grad_norm(params, tc.max_grad_norm) if tc.max_grad_norm > 0
                 else torch.tensor(0.0))
    if guard.check(total_loss, grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    lr = sched.get_last_lr()[0]
    sched.step()
    dt = time.perf_counter() - t0
    n_tokens, n_cells = distributed.sum_floats(sum(mb.n_tokens for mb in micro),
                                               sum(mb.input_ids.numel() for mb in micro))
    return {"loss/sft": total_loss, "lr": lr, "grad_norm": float(grad_norm),
            "perf/tokens_per_s": n_tokens / max(dt, 1e-9), "perf/targets": int(n_targets),
            "perf/pad_fraction": 1.0 - n_tokens / max(n_cells, 1.0), "skipped_steps": guard.skipped}


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run SFT; returns a summary (run_dir, final train/eval loss, task eval if any)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint

    check_config(cfg)
    tc, d = cfg.trainer, cfg.data
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    device = distributed.resolve_device(tc.device)
    sharded = distributed.use_fsdp(tc.fsdp)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "sft", cfg, exist_ok=resume)
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    pad_id = pad_token(tok)
    train_ex, eval_ex, n_dropped = prepare_examples(tok, d, tc.seed)
    mode: BatchingMode = d.batching
    if mode == "pack" and not packing_is_exact(model):
        # This model does not read sequence boundaries from position ids: packing would leak
        # attention across examples. Bucketing is exact everywhere.
        print(f"[sft] {cfg.model.spec} does not isolate packed sequences; using length bucketing instead")
        mode = "bucket"

    before = distributed.on_main(task_eval, model, tok, cfg, seed=tc.seed) if not resume else {}
    before.pop("_examples", None)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if sharded:  # FSDP2: every process holds 1/N of each layer; before the optimizer sees the parameters
        distributed.fsdp_wrap(model)
    # under FSDP every process must run the same forwards, so what rank 0 alone ran (evaluations) runs on all
    on_main_or_all = (lambda fn, *a, **k: fn(*a, **k)) if sharded else distributed.on_main
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, tc)
    start = 0
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        model_view, opt_view = distributed.checkpoint_views(model, opt, gather=False)
        start = load_checkpoint(ckpt, modules={"model": model_view}, optimizer=opt_view, scheduler=sched)["step"]
        distributed.restore_rank_rng(ckpt)
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)
        if ds.is_main:
            print(f"[sft] resumed from {ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        rngs = distributed.rank_rng_states()
        model_view, opt_view = distributed.checkpoint_views(model, opt)  # FSDP: full state dicts, gathered
        distributed.on_main(save_checkpoint, run_dir, step, modules={"model": model_view}, optimizer=opt_view,
                            scheduler=sched, generators=rngs, extra={"algorithm": "sft"}, keep_last=tc.keep_last)

    def eval_loss() -> float:
        return on_main_or_all(evaluate_loss, model, eval_ex, pad_id, mode, d.pack_length, tc.batch_size)

    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    if before and start == 0:
        logger.log(0, before)  # the untrained model's task eval: the first point of its curve
    with GracefulExit() as stop:
        metrics, stopped = _loop(cfg, model, params, opt, sched, NonFiniteGuard(tc.max_bad_steps), train_ex, eval_ex,
                                 pad_id, mode, start, logger, checkpoint, eval_loss, stop, sharded)
    model.eval()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "train_examples": len(train_ex), "eval_examples": len(eval_ex),
                               "dropped_examples": n_dropped, "batching": mode, "stopped": stopped,
                               "loss/sft": metrics.get("loss/sft")}
    if stopped:
        logger.close()
        return summary
    final = {"loss/sft_eval": eval_loss()} if eval_ex else {}
    return _finish(cfg, model, tok, run_dir, logger, checkpoint, summary, final, before, sharded)


def _loop(cfg: Config, model, params, opt, sched, guard, train_ex: list[Example], eval_ex: list[Example], pad_id: int,
          mode: BatchingMode, start: int, logger, checkpoint, eval_loss, stop, sharded: bool) -> tuple[dict, bool]:
    """Optimizer steps ``start`` .. ``total_steps``; returns the last step's metrics and whether a
    signal stopped the run."""
    tc, d = cfg.trainer, cfg.data
    ds = distributed.state()
    lengths = [len(ex) for ex in train_ex]
    global_batch = tc.batch_size * ds.world_size  # batch_size examples per process
    per_epoch = math.ceil(len(train_ex) / global_batch)  # both samplers cut ceil(n / batch_size) batches
    epoch_batches: dict[int, list[list[int]]] = {}
    filler = make_batch([train_ex[0]], pad_id, mode, d.pack_length) if sharded else None
    metrics: dict[str, Any] = {}
    bar = tqdm(range(start, tc.total_steps), desc="sft", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    for step in bar:
        # step -> (epoch, batch); the order depends on (seed, epoch) only, which makes resume exact
        epoch, b = divmod(step, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: step_batches(lengths, global_batch, mode, tc.seed, epoch)}
        indices = list(distributed.shard(epoch_batches[epoch][b]))  # this process's block of the batch
        micro = [make_batch([train_ex[i] for i in mb], pad_id, mode, d.pack_length)
                 for mb in micro_batches(indices, tc.grad_accum)]
        metrics = {**_step(model, params, opt, sched, guard, micro, filler, tc, sharded), "epoch": epoch}
        done = step + 1
        if cfg.method.eval_every and done % cfg.method.eval_every == 0 and eval_ex:
            metrics["loss/sft_eval"] = eval_loss()
        if done % tc.log_every == 0 or done == tc.total_steps:
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss/sft']:.3f}", lr=f"{metrics['lr']:.2e}")
        if stop.after_step(done, tc.total_steps, tc.checkpoint_every, checkpoint, "sft"):
            return metrics, True
    return metrics, False


def _finish(cfg: Config, model, tok, run_dir: Path, logger, checkpoint, summary: dict, final: dict, before: dict,
            sharded: bool) -> dict[str, Any]:
    """After the last step: the task eval, metrics, plot, final checkpoint and saved model."""
    tc, ds = cfg.trainer, distributed.state()
    # FSDP: rank 0 gets an ordinary copy of the trained model (gathered) to sample from and to save
    plain = distributed.unsharded_copy(model) if sharded and (cfg.run.save_model or task_eval_on(cfg)) else model
    after = distributed.on_main(task_eval, plain, tok, cfg, seed=tc.seed)
    if after:
        examples_after = after.pop("_examples")
        if ds.is_main:
            print("[sft] samples after training:", " | ".join(examples_after))
        final.update(after)
        final.update({f"{k}_before": v for k, v in before.items()})
    if final:
        logger.log(tc.total_steps, final)
    logger.close()
    summary.update(final)
    distributed.on_main(plot_metrics, run_dir,
                        ["loss/sft", "loss/sft_eval", "eval/legal_fraction", "eval/vader", "perf/tokens_per_s"],
                        title="SFT")
    checkpoint(tc.total_steps)
    if cfg.run.save_model:
        distributed.on_main(save_hf_model, plain, tok, run_dir / "model")
    if ds.is_main:
        print("[sft] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary
