"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023), cheap per step.

Data: JSONL rows ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (an optional ``"system"``
string too). With a chat model (the tokenizer has a chat template and ``data.chat_template`` is
not false) the prompt becomes a user turn and each completion the assistant turn; otherwise the
texts are concatenated as they are (end the prompt with a space or newline if the completion
should start after one) and EOS ends each completion. The loss counts completion tokens only.

Where a DPO step usually spends its time, and what this trainer does instead:

1. **A reference forward every step.** The reference is the policy before training (or the same
   model with its LoRA adapters switched off), and it never changes, so its log-probs are
   computed once, in a no-grad pass over the data before the first step, and kept as two
   floats per pair (``method.precompute_ref``). No second model stays in memory.
2. **Two forwards, a prompt encoded twice, and padding.** Each pair is laid out as
   ``[prompt | chosen | rejected]`` and pairs are packed back to back into rows of about
   ``method.row_tokens`` tokens. Rejected tokens take the positions that follow the prompt, and
   the attention mask lets them see the prompt and themselves but not the chosen tokens, so
   each token computes exactly what it would in its own ``prompt + completion`` sequence
   (tested). One forward serves chosen and rejected, the prompt is encoded once per pair, and
   padding is only what is left at the end of the rows.
3. **The LM head over every position.** Only positions that predict a completion token go
   through the head (``logits_to_keep`` with a mask), which skips the prompt's 49k-way
   projections.

``method.packing: false`` falls back to the usual layout (chosen and rejected concatenated
along the batch, right-padded), for attention backends that take no 4-D mask.

The built-in data set ``prefs_tiny`` (``src/ankus/assets/prefs_tiny.jsonl``) is 48 pairs made by
one rule: for a in 1..8 and b in 1..6 the prompt is "What is a + b?", chosen is "a + b = s."
(s = a + b), rejected is "a + b = s+1." when s is even and "I am not sure, maybe a·b." when s
is odd.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ankus import distributed
from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint
from ankus.config import ConfigError, LoRAConfig, ModelConfig, RunConfig, TrainerConfig, reject_unused
from ankus.data.io import DataError
from ankus.data.preferences import (PackedRows, Pair, batch_order, load_pairs, pack_rows,  # noqa: F401 (re-exported)
                                    prefix_shared_mask, tokenize_pairs)
from ankus.data.tokens import pad_id as pad_token
from ankus.losses.dpo import dpo_loss, sequence_logps
from ankus.models.loading import load_model
from ankus.models.lora import apply_lora
from ankus.optim import make_optimizer
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics

__all__ = [
    "Config", "DPOMethod", "PreferenceData", "Pair", "PackedRows", "train", "check_config", "load_pairs", "tokenize_pairs",
    "pack_rows", "prefix_shared_mask", "packed_logps", "padded_logps", "policy_logps", "reference_logps", "batch_order",
]


@dataclass
class DPOMethod:
    beta: float = 0.1
    """DPO's beta (strength of the pull towards the reference); for IPO, Azar et al.'s tau."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO, on summed log-probs) or ipo (on per-token mean log-probs)."""
    label_smoothing: float = 0.0
    """Conservative DPO's epsilon (assumed fraction of flipped labels); sigmoid only."""
    precompute_ref: bool = True
    """Reference log-probs computed once before training; false = a reference forward every step."""
    ref_batch_size: int = 32
    """Pairs per no-grad forward while precomputing reference log-probs."""
    packing: bool = True
    """Lay each pair out as [prompt|chosen|rejected] in packed rows; false = padded chosen+rejected batch."""
    row_tokens: int = 256
    """Packed row length (a longer pair gets a row of its own); 0 = one row per micro-batch."""
    disable_dropout: bool = True
    """Zero every dropout probability, so policy and reference agree at step 0."""


@dataclass
class PreferenceData:
    path: str = "prefs_tiny"
    """JSONL file of {prompt, chosen, rejected} rows, or a built-in set name (prefs_tiny)."""
    chat_template: bool | None = None
    """Format as a chat (user turn + assistant turn); null = when the tokenizer has a template."""
    max_length: int = 1024
    """Longest prompt + completion in tokens; longer completions are cut."""
    shuffle: bool = True
    """Reshuffle the pairs every epoch (seeded); false = file order."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and, before training, the reference)."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=5e-7, weight_decay=0.0))
    """Optimisation; batch_size counts preference pairs."""
    method: DPOMethod = field(default_factory=DPOMethod)
    """DPO hyper-parameters."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning; the reference is the model with adapters disabled."""
    data: PreferenceData = field(default_factory=PreferenceData)
    """Preference pairs."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# log-probs of pairs (layouts: ankus.data.preferences)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def packed_logps(model: nn.Module, packed: PackedRows, average: bool = False) -> tuple[Tensor, Tensor]:
    """One forward over packed pairs -> chosen and rejected log-probs, each (n,), float32."""
    dev = _model_device(model)
    mask = prefix_shared_mask(packed.segment, packed.part, _model_dtype(model)).to(dev)
    out = model(input_ids=packed.input_ids.to(dev), attention_mask=mask, position_ids=packed.position_ids.to(dev),
                logits_to_keep=packed.keep.to(dev), use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # (U, V): one row per kept position
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # log p(label) = logit[label] - logsumexp: logsumexp once per kept position, though the
    # last prompt token serves two completion tokens
    lse = torch.logsumexp(logits, dim=-1)  # (U,)
    predictor, labels, seq_index = packed.predictor.to(dev), packed.labels.to(dev), packed.seq_index.to(dev)
    token_logps = logits[predictor, labels] - lse[predictor]  # (K,)
    n = packed.n_pairs
    logps = token_logps.new_zeros(2 * n).index_add(0, seq_index, token_logps)  # (2n,)
    if average:
        counts = torch.bincount(seq_index, minlength=2 * n).clamp(min=1)
        logps = logps / counts
    return logps[:n], logps[n:]


def padded_logps(model: nn.Module, pairs: Sequence[Pair], pad_id: int, average: bool = False) -> tuple[Tensor, Tensor]:
    """The usual layout: chosen and rejected sequences concatenated along the batch, right-padded,
    one forward -> chosen and rejected log-probs, each (n,)."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    n_prompt = [len(p.prompt_ids) for p in pairs] * 2
    L = max(map(len, seqs))
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    completion = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, (s, P) in enumerate(zip(seqs, n_prompt)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        completion[b, P:len(s)] = 1
    # logits are needed from the first completion's predictor onwards
    keep = L - min(n_prompt) + 1
    dev = _model_device(model)
    input_ids, attention_mask, completion = input_ids.to(dev), attention_mask.to(dev), completion.to(dev)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    logps = sequence_logps(logits[:, :-1], input_ids[:, L - keep + 1:], completion[:, L - keep + 1:], average)
    n = len(pairs)
    return logps[:n], logps[n:]


def policy_logps(model: nn.Module, pairs: Sequence[Pair], pad_id: int, packing: bool = True,
                 average: bool = False, row_tokens: int = 256) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-probs (n,), (n,) of ``pairs`` in one forward (packed or padded)."""
    if packing:
        return packed_logps(model, pack_rows(pairs, pad_id, row_tokens), average)
    return padded_logps(model, pairs, pad_id, average)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int = 16, packing: bool = True,
                    average: bool = False, lora: bool = False, row_tokens: int = 256) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair, (n,) chosen and (n,) rejected, in one no-grad pass.

    ``model`` is the policy before its first update (it is the reference then); under LoRA the
    adapters are switched off for the pass, so the base model is the reference whatever the
    adapters hold. Pairs are sorted by length first, so each forward holds similar lengths.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    ctx = model.disable_adapter() if lora else nullcontext()
    with ctx:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            c, r = policy_logps(model, [pairs[i] for i in idx], pad_id, packing, average, row_tokens)
            chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return chosen, rejected


# ---------------------------------------------------------------------------------------------
# training


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0  # HF attention modules pass this to the kernel


def _live_reference(model: nn.Module, lora: bool):
    """The reference for ``precompute_ref: false``: adapters off (LoRA) or a frozen deep copy."""
    if lora:
        return model
    import copy

    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def _sharded_reference_logps(model: nn.Module, pairs: list[Pair], pad_id: int, packing: bool, average: bool,
                             m: DPOMethod, lora: bool) -> tuple[Tensor, Tensor]:
    """:func:`reference_logps` of every pair, the work split over processes. The pairs are cut into
    the very forwards one process would run (sorted by length, ``ref_batch_size`` at a time) and
    each process runs a contiguous block of them, so every value is computed exactly as a single
    process computes it; then all processes get all values."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    batches = [order[s:s + m.ref_batch_size] for s in range(0, len(order), m.ref_batch_size)]
    mine = [i for batch in distributed.shard(batches) for i in batch]  # already sorted: reference_logps keeps it
    chosen, rejected = reference_logps(model, [pairs[i] for i in mine], pad_id, m.ref_batch_size, packing, average,
                                       lora, m.row_tokens)
    # the blocks in rank order are ``order`` again
    index = torch.tensor(order, dtype=torch.long)
    ref_chosen, ref_rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    ref_chosen[index] = distributed.all_gather_cat(chosen).cpu()
    ref_rejected[index] = distributed.all_gather_cat(rejected).cpu()
    return ref_chosen, ref_rejected


def check_config(cfg: Config) -> None:
    """Reject settings this trainer would ignore: a :class:`ConfigError` names the field."""
    m = cfg.method
    if not m.precompute_ref:
        reject_unused(m, ["ref_batch_size"], "dpo", "unless method.precompute_ref is true", "method")
    if not m.packing:
        reject_unused(m, ["row_tokens"], "dpo", "unless method.packing is true", "method")
    if m.loss_type != "sigmoid":
        reject_unused(m, ["label_smoothing"], "dpo", "unless method.loss_type is sigmoid", "method")
    if not cfg.lora.enabled:
        reject_unused(cfg.lora, ["r", "alpha", "dropout", "target"], "dpo", "unless lora.enabled is true", "lora")
    if cfg.trainer.fsdp and (cfg.lora.enabled or not m.precompute_ref):
        raise ConfigError("trainer.fsdp in the dpo trainer needs method.precompute_ref=true and lora.enabled=false "
                          "(a live reference copy and LoRA adapters are not sharded)")


def _references(model, pairs: list[Pair], pad_id: int, packing: bool, average: bool, cfg: Config, run_dir: Path,
                resume: bool):
    """(ref_chosen, ref_rejected, None) precomputed -- once, before any update, or loaded back when
    resuming -- or (None, None, live reference model) for ``precompute_ref: false``."""
    m, lora = cfg.method, cfg.lora.enabled
    ref_path = run_dir / "ref_logps.pt"
    if m.precompute_ref and resume and ref_path.exists():
        saved = torch.load(ref_path, weights_only=True)
        return saved["chosen"], saved["rejected"], None
    if m.precompute_ref:
        ref_chosen, ref_rejected = _sharded_reference_logps(model, pairs, pad_id, packing, average, m, lora)
        # kept in the run directory: after the first update the policy is no longer the reference
        distributed.on_main(torch.save, {"chosen": ref_chosen, "rejected": ref_rejected}, ref_path)
        return ref_chosen, ref_rejected, None
    return None, None, _live_reference(model, lora)


def train(cfg: Config, resume: bool = False, *, model: nn.Module | None = None, tokenizer=None) -> dict[str, Any]:
    """Run DPO; returns a summary (run_dir, steps, first/last loss, accuracy, timings).

    ``model``/``tokenizer`` may be passed in already loaded (they are trained in place);
    otherwise ``cfg.model.spec`` is loaded. Under several processes (torchrun, accelerate launch)
    each takes ``trainer.batch_size`` pairs of the same global batch (see ankus.distributed).
    """
    check_config(cfg)
    m, tc = cfg.method, cfg.trainer
    distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    sharded = distributed.use_fsdp(tc.fsdp)
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "dpo", cfg, exist_ok=resume)
    if model is None:  # a model passed in stays on its device
        model, tokenizer = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed,
                                      device=distributed.resolve_device(tc.device))
    tok = tokenizer
    pad_id = pad_token(tok)
    pairs = tokenize_pairs(load_pairs(cfg.data.path), tok, cfg.data.chat_template, cfg.data.max_length,
                           where=cfg.data.path)
    if not pairs:
        raise DataError(f"{cfg.data.path}: no preference pairs")
    if m.disable_dropout:
        _disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    average = m.loss_type == "ipo"  # IPO's target 1/(2 beta) is on the per-token scale
    packing = m.packing and getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
    t_ref = time.perf_counter()
    ref_chosen, ref_rejected, ref_model = _references(model, pairs, pad_id, packing, average, cfg, run_dir, resume)
    t_ref = time.perf_counter() - t_ref
    if sharded:  # after the reference pass (which each process ran on its own full copy)
        distributed.fsdp_wrap(model)

    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel updates every tensor in one pass (CPU and CUDA): a few times less optimizer time
    opt, sched = make_optimizer(params, tc, fused=True)
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        model_view, opt_view = distributed.checkpoint_views(model, opt, gather=False)
        start = load_checkpoint(ckpt, modules={"model": model_view}, optimizer=opt_view, scheduler=sched)["step"]
        distributed.restore_rank_rng(ckpt)
    if resume:  # metrics continue from the checkpoint without a gap or a repeat
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)

    def refs(mb: list[int], batch: list[Pair]) -> tuple[Tensor, Tensor]:
        if ref_model is None:
            dev = _model_device(model)
            return ref_chosen[mb].to(dev), ref_rejected[mb].to(dev)
        with torch.no_grad(), (ref_model.disable_adapter() if cfg.lora.enabled else nullcontext()):
            return policy_logps(ref_model, batch, pad_id, packing, average, m.row_tokens)

    def step_fn(step: int) -> dict[str, Any]:
        return _step(model, params, opt, sched, guard, pairs, refs, pad_id, packing, average, cfg, step, sharded)

    guard = NonFiniteGuard(tc.max_bad_steps)
    history, stopping = _loop(cfg, model, opt, sched, step_fn, start, run_dir)
    distributed.on_main(plot_metrics, run_dir,
                        ["loss", "rewards/margins", "rewards/accuracy", "rewards/chosen", "rewards/rejected"],
                        title=f"DPO ({m.loss_type}, beta={m.beta})")
    if cfg.run.save_model and not stopping:
        plain = distributed.unsharded_copy(model)  # FSDP: an ordinary copy on rank 0 (a collective)
        distributed.on_main(save_hf_model, plain, tok, run_dir / "model")
    step_s = sorted(h["perf/step_s"] for h in history)
    return {
        "run_dir": str(run_dir), "steps": len(history), "pairs": len(pairs), "stopped_early": stopping,
        "loss_first": history[0]["loss"] if history else math.nan,
        "loss_last": history[-1]["loss"] if history else math.nan,
        "accuracy_last": history[-1]["rewards/accuracy"] if history else math.nan,
        "ref_precompute_s": t_ref if m.precompute_ref else 0.0,
        "median_step_s": step_s[len(step_s) // 2] if step_s else math.nan,
        "skipped_steps": guard.skipped,
    }


def _step(model, params, opt, sched, guard, pairs: list[Pair], refs, pad_id: int, packing: bool, average: bool,
          cfg: Config, step: int, sharded: bool) -> dict[str, Any]:
    """Optimizer step ``step``: its global batch, this process's block, forward/backward, the update."""
    tc, ds = cfg.trainer, distributed.state()
    t0 = time.perf_counter()
    # one global batch of batch_size x processes pairs; this process takes its block
    global_idx = batch_order(len(pairs), tc.batch_size * ds.world_size, step, tc.seed, cfg.data.shuffle)
    idx = list(distributed.shard(global_idx))
    metrics = _accumulate_gradients(model, pairs, idx, refs, pad_id, packing, average, cfg, len(global_idx))
    if not sharded:  # FSDP has reduce-scattered (summed) the gradients already
        distributed.sync_gradients(params)  # summed: each process's loss was scaled by its share
    # max_norm <= 0 still returns the norm, which the guard checks
    grad_norm = distributed.clip_grad_norm(params, tc.max_grad_norm)
    metrics.update(grad_norm=float(grad_norm), lr=opt.param_groups[0]["lr"])
    if guard.check(metrics["loss"], grad_norm):  # raises NonFiniteError after max_bad_steps in a row
        opt.step()
        sched.step()
    else:
        metrics["skipped"] = 1.0
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    metrics.update({"perf/step_s": dt, "perf/tokens_per_s": metrics.pop("tokens") / max(dt, 1e-9)})
    return metrics


def _loop(cfg: Config, model, opt, sched, step_fn, start: int, run_dir: Path) -> tuple[list[dict], bool]:
    """Steps ``start`` .. ``total_steps`` with logging and checkpoints; returns the steps' metrics
    and whether a signal stopped the run."""
    tc, ds = cfg.trainer, distributed.state()
    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    model.train()
    history: list[dict] = []
    bar = tqdm(range(start, tc.total_steps), desc="dpo", disable=not cfg.run.progress or not ds.is_main)
    stopping = False
    with GracefulExit() as stop:
        for step in bar:
            metrics = step_fn(step)
            history.append(metrics)
            if (step + 1) % tc.log_every == 0 or step == tc.total_steps - 1:
                logger.log(step + 1, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracy']:.2f}")
            done = step + 1 == tc.total_steps
            stopping = distributed.any_rank(stop.requested)  # a signal that reached one process stops all
            if stopping or done or (tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0):
                rngs = distributed.rank_rng_states()
                model_view, opt_view = distributed.checkpoint_views(model, opt)  # FSDP: gathered full state
                distributed.on_main(save_checkpoint, run_dir, step + 1, modules={"model": model_view},
                                    optimizer=opt_view, scheduler=sched, generators=rngs, keep_last=tc.keep_last)
            if stopping:
                if ds.is_main:
                    print(f"stopped at step {step + 1}; continue with: ankus train <recipe> run.name={run_dir.name} "
                          f"run.out_dir={cfg.run.out_dir} --resume")
                break
    logger.close()
    return history, stopping


def _accumulate_gradients(model, pairs: list[Pair], idx: list[int], refs, pad_id: int, packing: bool,
                          average: bool, cfg: Config, n_global: int | None = None) -> dict[str, Any]:
    """Forward/backward over the batch ``idx`` in ``grad_accum`` micro-batches; returns the
    batch's loss and statistics (and its token count under ``tokens``).

    ``idx`` may be this process's block of a global batch of ``n_global`` pairs: each micro-batch's
    mean loss is weighted by its share of the *global* batch, so the gradients summed over
    processes are the global batch's; the returned statistics are the global batch's too."""
    m = cfg.method
    n_global = n_global or len(idx)
    n_micro = max(1, cfg.trainer.grad_accum)
    parts: list[tuple[Tensor, ...]] = []
    tokens = 0
    for k in range(n_micro):
        mb = idx[k::n_micro]
        if not mb:
            continue
        batch = [pairs[i] for i in mb]
        chosen, rejected = policy_logps(model, batch, pad_id, packing, average, m.row_tokens)  # (b,), (b,)
        ref_c, ref_r = refs(mb, batch)
        loss, _ = dpo_loss(chosen, rejected, ref_c, ref_r, m.beta, m.loss_type, m.label_smoothing)
        # dpo_loss is a mean over pairs: weight each micro-batch by its share of the (global) batch
        (loss * len(mb) / n_global).backward()
        parts.append((chosen.detach(), rejected.detach(), ref_c, ref_r))
        tokens += sum(len(pairs[i]) for i in mb)
    # every process's pairs, for statistics of the whole batch
    chosen, rejected, ref_c, ref_r = (distributed.all_gather_cat(torch.cat(x)) for x in zip(*parts))
    tokens = int(distributed.sum_floats(tokens)[0])
    loss, stats = dpo_loss(chosen, rejected, ref_c, ref_r, m.beta, m.loss_type, m.label_smoothing)
    return {"loss": float(loss), **{k: float(v) for k, v in stats.items()},
            "logps/chosen": float(chosen.mean()), "logps/rejected": float(rejected.mean()), "tokens": tokens}
