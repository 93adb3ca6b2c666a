"""Causal-LM pretraining (``algorithm: pretrain``) on a tokenized corpus (:mod:`ankus.data.corpus`).

Data: the corpus's documents are split by document into training and validation sets (seeded,
``data.val_fraction``). Each epoch the training documents are concatenated in a seeded order
(each ends with EOS) and cut into rows of exactly ``data.seq_length`` tokens -- no padding; the
tail shorter than a row is left for the next epoch's order. Rows are shuffled and a step takes
``trainer.batch_size`` of them on each process. In a row every token but the first is a target.

``data.isolate_documents``: a token attends only to its own document. Position ids restart at 0
at each document start inside a row and the model is called with ``attention_mask=None`` (as SFT
packs examples, :mod:`ankus.data.batching`), which transformers reads as packed sequences; a
document's first token is then not a target (nothing of its document precedes it).

The loss is the token mean over a step's targets. On one process or data parallel the output
head runs through :func:`ankus.losses.lm.linear_cross_entropy` (``method.loss_chunk`` rows at a
time, never the whole batch's (tokens, vocabulary) logits); under FSDP the model's own head runs.

Continued pretraining: ``model.spec`` may be an earlier run's ``model/`` directory. A corpus built
with another tokenizer than the model's is refused, as is resuming onto a different corpus.
Re-warming (Gupta et al. 2023) is such a run with its own ``trainer.warmup_steps``, ``trainer.lr``
(the new maximum) and schedule: recipe ``pretrain_rewarm``.

ReLoRA (``relora.enabled``, :mod:`ankus.models.relora`): after ``relora.warm_start_steps``
full-rank steps only LoRA adapters on the attention and MLP linears train; every
``relora.reset_every`` steps they are merged into their weights and restarted, the adapters'
Adam moments pruned, and the LR re-warmed (ReLoRA's jagged schedule); ``relora.train_embeddings``
also trains the embeddings, head and norms in full. Checkpoints hold the peft
model; the saved ``model/`` is a plain transformers model with the adapters merged.

Context extension: the ``rope:`` section scales the loaded model's RoPE (:func:`ankus.models.rope.apply_rope_config`)
before training at the longer ``data.seq_length``; recipe ``pretrain_extend`` (YaRN, s = 4).

Snapshots: ``method.snapshot_steps`` saves the model in Hugging Face format after those steps to
``<run>/snapshots/step-N/`` (step 0 = the initialization), atomically; recipe ``pretrain_moments``
and ``ankus audit moments lm`` read them.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ankus import distributed
from ankus.allocator import TRIM_EVERY, release_freed_memory, reuse_freed_memory
from ankus.config import ConfigError, ModelConfig, RunConfig, TrainerConfig
from ankus.data.batching import Batch, packing_is_exact
from ankus.data.corpus import Corpus, load_corpus, tokenizer_fingerprint, tokenizer_name
from ankus.data.io import DataError
from ankus.losses.lm import linear_cross_entropy
from ankus.models.heads import output_head_bypassed
from ankus.models.loading import load_model
from ankus.models.relora import ReLoRAConfig, apply_relora, check_relora, relora_phase, relora_step
from ankus.models.rope import RopeConfig, apply_rope_config
from ankus.optim import make_optimizer
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics

__all__ = ["PretrainData", "PretrainMethod", "Config", "train", "split_documents", "epoch_stream", "make_rows",
           "epoch_rows", "batch_loss", "evaluate", "check_tokenizer", "snapshot_dir"]


@dataclass
class PretrainData:
    corpus: str = ""
    """A corpus directory written by `ankus data corpus NAME --out DIR`."""
    seq_length: int = 512
    """Tokens per packed row."""
    val_fraction: float = 0.05
    """Share of the documents held out for the validation loss (a seeded split by document)."""
    val_rows: int = 0
    """Validation rows evaluated (the first ones); 0 = all of the held-out documents."""
    isolate_documents: bool = False
    """Attention stays inside a document within a packed row (positions restart per document)."""
    extra_val: list[str] = field(default_factory=list)
    """More corpus directories whose held-out documents (the same seeded split) are evaluated with
    the validation loss, as loss/val_<directory name>: forgetting of an earlier corpus, say."""


@dataclass
class PretrainMethod:
    eval_every: int = 0
    """Validation loss and perplexity every this many steps; 0 = at the end only."""
    loss_chunk: int = 1024
    """Rows per chunk of the output head's fused cross-entropy; 0 = the model's own head and logits."""
    head_dtype: Literal["float32", "bfloat16"] = "float32"
    """Input dtype of the fused loss's output-head products: bfloat16 runs them ~2x faster on CPUs
    and GPUs with bf16 units (fp32 softmax and sums; weights stay model.dtype). Needs loss_chunk > 0."""
    fused_adamw: bool = True
    """AdamW updating every tensor in one kernel (not under FSDP)."""
    reuse_freed_memory: bool = True
    """Keep freed large tensors' pages in glibc's heap during training (ankus.allocator): ~15% less
    CPU time per step for a 20M model with a 49k vocabulary, same peak memory. No-op without glibc."""
    snapshot_steps: list[int] = field(default_factory=list)
    """Steps after which the model is saved in Hugging Face format to <run>/snapshots/step-N/ (0 = the
    initialization), for audits across training (`ankus audit moments lm`)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(spec="llama-20m"))
    """The model: a from-scratch name (llama-20m, pythia-20m), any known spec, or a run's model/ directory."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=1e-3, batch_size=8, total_steps=1000,
                                                                         weight_decay=0.1, warmup_steps=100,
                                                                         lr_schedule="cosine"))
    """Optimisation; batch_size counts rows of data.seq_length tokens per process."""
    data: PretrainData = field(default_factory=PretrainData)
    """The corpus and how it is packed."""
    method: PretrainMethod = field(default_factory=PretrainMethod)
    """Evaluation cadence and the fast paths."""
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    """ReLoRA: train through LoRA adapters merged and restarted every relora.reset_every steps."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """RoPE scaling applied after loading (context extension, e.g. YaRN); static ones are saved with the model."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# data


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded ``(train, val)`` document indices, each sorted; val gets round(fraction * n) (at
    least one when the fraction is positive and there are two documents), train keeps one."""
    n_val = int(round(val_fraction * n_docs))
    if val_fraction > 0 and n_docs >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n_docs - 1)
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def epoch_stream(documents: list[np.ndarray], doc_ix: list[int], seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The documents ``doc_ix`` end to end (shuffled by ``seed``; None = as given):
    ``(tokens (S,), starts (S,) bool: True where a document begins)``."""
    order = list(doc_ix)
    if seed is not None:
        random.Random(seed).shuffle(order)
    tokens = np.concatenate([documents[i] for i in order])
    starts = np.zeros(len(tokens), dtype=bool)
    starts[np.cumsum([0] + [len(documents[i]) for i in order[:-1]])] = True
    return tokens, starts


def make_rows(tokens: np.ndarray, starts: np.ndarray, rows: list[int], seq_length: int, isolate: bool) -> Batch:
    """Rows ``rows`` of the stream cut every ``seq_length`` tokens, as a :class:`Batch`.

    Position ids count from the row's start, and with ``isolate`` also from each document start
    inside it. Targets (``loss_mask`` 1) are every token but the row's first, and with ``isolate``
    but each document's first."""
    L = seq_length
    ids = np.stack([tokens[r * L:(r + 1) * L] for r in rows])  # (R, L)
    begin = np.stack([starts[r * L:(r + 1) * L] for r in rows]).copy()  # (R, L) True where positions restart
    if not isolate:
        begin[:] = False
    begin[:, 0] = True
    col = np.arange(L)[None, :].repeat(len(rows), 0)  # (R, L)
    last_begin = np.maximum.accumulate(np.where(begin, col, 0), axis=1)  # (R, L) column of the segment start
    position_ids = col - last_begin
    loss_mask = (position_ids > 0).astype(np.int64)
    R = len(rows)
    return Batch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(position_ids.astype(np.int64)),
                 torch.from_numpy(loss_mask), torch.zeros((0, 2), dtype=torch.long), R * L, R)


def epoch_rows(n_rows: int, global_batch: int, seed: int) -> list[list[int]]:
    """An epoch's steps: the rows shuffled by ``seed`` and cut into full global batches."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return [order[i:i + global_batch] for i in range(0, n_rows - global_batch + 1, global_batch)]


def check_tokenizer(corpus: Corpus, tok, spec: str) -> None:
    """A corpus tokenized by another tokenizer than the model's is a DataError naming both."""
    want = corpus.manifest["tokenizer"]
    if want["fingerprint"] != tokenizer_fingerprint(tok):
        raise DataError(f"tokenizer mismatch: corpus {corpus.path} was built with tokenizer '{want['name']}' "
                        f"(fingerprint {want['fingerprint'][:12]}), but model '{spec}' uses '{tokenizer_name(tok)}' "
                        f"(fingerprint {tokenizer_fingerprint(tok)[:12]}); rebuild the corpus with the model's "
                        "tokenizer or pick a model that shares the corpus's")


# ---------------------------------------------------------------------------------------------
# the loss


def batch_loss(model, batch: Batch, target_weight: float, chunk: int,
               head_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over the batch's targets of target_weight * CE, per-target CE sum (detached))``.

    ``chunk`` > 0: the model's forward returns its final hidden states (its head bypassed) and
    :func:`linear_cross_entropy` applies the head chunk by chunk; 0: the model's own logits."""
    batch = batch.to(next(model.parameters()).device)
    targets = batch.input_ids[:, 1:]  # (R, L-1)
    mask = batch.loss_mask[:, 1:].bool()  # (R, L-1)
    if chunk > 0:
        with output_head_bypassed(model) as untouched:
            hidden = model(**batch.model_inputs(), use_cache=False).logits  # (R, L, H)
        if not untouched(hidden):
            raise RuntimeError("this model transforms its logits after the head; set method.loss_chunk=0")
        h = hidden[:, :-1][mask]  # (N, H)
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise RuntimeError("the fused loss needs an output head without bias; set method.loss_chunk=0")
        t = targets[mask]  # (N,)
        w = torch.full((len(t),), float(target_weight), device=h.device)
        loss = linear_cross_entropy(h, head.weight, t, w, chunk, head_dtype)
        return loss, loss.detach() / max(target_weight, 1e-30)
    logits = model(**batch.model_inputs(), use_cache=False).logits[:, :-1]  # (R, L-1, V)
    ce = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    return ce * target_weight, ce.detach()


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, starts: np.ndarray, cfg: Config, batch_size: int) -> float:
    """Token-mean validation loss over the validation stream's full rows (or one short row when
    the held-out documents are shorter than a row)."""
    d = cfg.data
    L = min(d.seq_length, len(tokens))
    n_rows = len(tokens) // L
    if d.val_rows:
        n_rows = min(n_rows, d.val_rows)
    if n_rows == 0 or L < 2:
        return float("nan")
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for s in range(0, n_rows, batch_size):
        batch = make_rows(tokens, starts, list(range(s, min(s + batch_size, n_rows))), L, d.isolate_documents)
        _, ce = batch_loss(model, batch, 1.0, cfg.method.loss_chunk if not distributed.is_sharded(model) else 0,
                           getattr(torch, cfg.method.head_dtype))
        total += float(ce)
        n += int(batch.loss_mask[:, 1:].sum())
    model.train(was_training)
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# training


def _prepare_data(cfg: Config, tok, world: int):
    d, tc = cfg.data, cfg.trainer
    if not d.corpus:
        raise DataError("data.corpus is empty: build a corpus with `ankus data corpus NAME --out DIR` and set "
                        "data.corpus=DIR")
    if d.seq_length < 2:
        raise DataError(f"data.seq_length must be >= 2, got {d.seq_length}")
    corpus = load_corpus(d.corpus)
    check_tokenizer(corpus, tok, cfg.model.spec)
    train_ix, val_ix = split_documents(len(corpus.documents), d.val_fraction, tc.seed)
    n_train = int(sum(len(corpus.documents[i]) for i in train_ix))
    if n_train < d.seq_length:
        raise DataError(f"corpus {d.corpus} is smaller than one training sequence: its training split holds "
                        f"{n_train} tokens, data.seq_length is {d.seq_length}; lower data.seq_length or "
                        "data.val_fraction, or use a larger corpus")
    n_rows = n_train // d.seq_length
    global_batch = tc.batch_size * world
    if n_rows < global_batch:
        raise DataError(f"corpus {d.corpus}: its training split makes {n_rows} rows of {d.seq_length} tokens, "
                        f"fewer than one step's {global_batch} (trainer.batch_size x processes); lower either")
    vals = {"": epoch_stream(corpus.documents, val_ix, None)} if val_ix else {}
    for path in d.extra_val:
        other = load_corpus(path)
        check_tokenizer(other, tok, cfg.model.spec)
        other_val = split_documents(len(other.documents), d.val_fraction, tc.seed)[1]
        name = Path(path).resolve().name
        if not other_val or name in vals:
            raise DataError(f"data.extra_val: corpus {path} " + ("holds no held-out document at data.val_fraction="
                            f"{d.val_fraction}" if not other_val else "has the same directory name as another"))
        vals[name] = epoch_stream(other.documents, other_val, None)
    return corpus, train_ix, vals, n_rows, global_batch


def _val_metrics(losses: dict[str, float]) -> dict[str, float]:
    """``{"loss/val", "ppl/val"}`` of the training corpus and ``loss/val_<name>`` of the extra ones."""
    out = {"loss/val": losses[""], "ppl/val": math.exp(min(losses[""], 50.0))} if "" in losses else {}
    return {**out, **{f"loss/val_{k}": v for k, v in losses.items() if k}}


def _micro(rows: list[int], grad_accum: int) -> list[list[int]]:
    n = max(1, min(grad_accum, len(rows)))
    size = math.ceil(len(rows) / n)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _step(model, micro: list[Batch], params, opt, sched, guard, tc: TrainerConfig, loss_opts: tuple,
          sharded: bool) -> tuple[float, torch.Tensor, float]:
    """One optimizer step over this process's micro-batches: ``(global token-mean loss, grad norm, lr)``.
    Each target weighs 1 / (the step's targets over every process), so the gradients summed over
    micro-batches and processes are those of the token mean over the global batch."""
    n_targets = distributed.sum_floats(sum(int(mb.loss_mask[:, 1:].sum()) for mb in micro))[0]
    total = 0.0
    for mb in micro:
        loss, ce = batch_loss(model, mb, 1.0 / n_targets, *loss_opts)
        loss.backward()
        total += float(ce) / n_targets
    total = distributed.sum_floats(total)[0]
    if not sharded:  # FSDP has reduce-scattered (summed) the gradients already
        distributed.sync_gradients(params)
    grad_norm = distributed.clip_grad_norm(params, tc.max_grad_norm) if tc.max_grad_norm > 0 else torch.tensor(0.0)
    if guard.check(total, grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    lr = sched.get_last_lr()[0]
    sched.step()
    return total, grad_norm, lr


def _resume(run_dir: Path, model, opt, sched, corpus: Corpus) -> int:
    from ankus.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    model_view, opt_view = distributed.checkpoint_views(model, opt, gather=False)
    state = load_checkpoint(ckpt, modules={"model": model_view}, optimizer=opt_view, scheduler=sched)
    if state.get("tokenizer") != corpus.manifest["tokenizer"]["fingerprint"]:
        raise DataError(f"tokenizer mismatch: checkpoint {ckpt} was trained on a corpus built with another tokenizer "
                        f"than {corpus.path}'s ('{corpus.manifest['tokenizer']['name']}'); resume on its own corpus")
    if state.get("corpus") != corpus.manifest["content_hash"]:
        raise DataError(f"checkpoint {ckpt} was trained on another corpus than {corpus.path} (content hashes "
                        "differ); resume on the same corpus, or start a new run from its model/ directory")
    distributed.restore_rank_rng(ckpt)
    distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", state["step"])
    if distributed.is_main():
        print(f"[pretrain] resumed from {ckpt} at step {state['step']}")
    return state["step"]


def _check_config(cfg: Config, sharded: bool, chunk: int) -> torch.dtype:
    """The fused loss's head dtype, after refusing settings that cannot run."""
    if cfg.method.head_dtype != "float32" and chunk == 0:
        raise ConfigError(f"pretrain: method.head_dtype={cfg.method.head_dtype} applies to the fused loss only, which "
                          f"{'FSDP does not use' if sharded else 'method.loss_chunk=0 turns off'}; set "
                          "method.head_dtype=float32")
    check_relora(cfg.relora, cfg.trainer, "pretrain")
    bad = [s for s in cfg.method.snapshot_steps if not isinstance(s, int) or not 0 <= s <= cfg.trainer.total_steps]
    if bad:
        raise ConfigError(f"pretrain: method.snapshot_steps {bad} are not steps of this run; give integers from 0 "
                          f"(the initialization) to trainer.total_steps={cfg.trainer.total_steps}")
    return getattr(torch, cfg.method.head_dtype)


def snapshot_dir(run_dir: str | Path, step: int) -> Path:
    """Where ``method.snapshot_steps`` puts the model after ``step`` steps."""
    return Path(run_dir) / "snapshots" / f"step-{step}"


def _setup_model(cfg: Config, device, sharded: bool):
    """``(model, tokenizer, the optimizer's parameters, LR multiplier or None)``; seeds the RNGs first."""
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    apply_rope_config(model, cfg.rope, "pretrain", cfg.run.save_model)
    if cfg.data.isolate_documents and not packing_is_exact(model):
        raise DataError(f"data.isolate_documents: model '{cfg.model.spec}' does not keep packed documents apart "
                        "(it ignores restarting position ids); set data.isolate_documents=false")
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        raise DataError(f"model '{cfg.model.spec}' has {model.get_input_embeddings().weight.shape[0]} embeddings, "
                        f"fewer than its tokenizer's {len(tok)} tokens")
    multiplier = None
    if cfg.relora.enabled:
        model, params, multiplier = apply_relora(model, cfg.relora, cfg.trainer)
    if sharded:
        distributed.fsdp_wrap(model)
    model.train()
    if multiplier is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return model, tok, params, multiplier


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Pretrain; returns a summary (run_dir, tokens seen, final train and validation loss)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, save_checkpoint

    tc, d = cfg.trainer, cfg.data
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    device, sharded = distributed.resolve_device(tc.device), distributed.use_fsdp(tc.fsdp)
    chunk = 0 if sharded else cfg.method.loss_chunk  # under FSDP the head's weight is a shard outside forward
    head_dtype = _check_config(cfg, sharded, chunk)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "pretrain", cfg, exist_ok=resume)
    model, tok, params, multiplier = _setup_model(cfg, device, sharded)
    corpus, train_ix, vals, n_rows, global_batch = _prepare_data(cfg, tok, ds.world_size)
    on_main_or_all = (lambda fn, *a, **k: fn(*a, **k)) if sharded else distributed.on_main
    opt, sched = make_optimizer(params, tc, multiplier=multiplier, fused=cfg.method.fused_adamw and not sharded)
    start = _resume(run_dir, model, opt, sched, corpus) if resume else 0
    if cfg.relora.enabled:
        relora_phase(model, cfg.relora, start)  # what trains at the step the run (re)starts from
    extra = {"algorithm": "pretrain", "corpus": corpus.manifest["content_hash"],
             "tokenizer": corpus.manifest["tokenizer"]["fingerprint"]}

    def checkpoint(step: int) -> None:
        rngs = distributed.rank_rng_states()
        model_view, opt_view = distributed.checkpoint_views(model, opt)
        distributed.on_main(save_checkpoint, run_dir, step, modules={"model": model_view}, optimizer=opt_view,
                            scheduler=sched, generators=rngs, extra=extra, keep_last=tc.keep_last)

    def snapshot(step: int) -> None:
        if step in cfg.method.snapshot_steps:  # unsharded_copy: the model itself unless sharded (a collective)
            distributed.on_main(save_hf_model, distributed.unsharded_copy(model), tok, snapshot_dir(run_dir, step))

    def validate() -> dict[str, float]:
        return _val_metrics({k: on_main_or_all(evaluate, model, *v, cfg, tc.batch_size) for k, v in vals.items()})

    per_epoch = n_rows // global_batch
    stream: dict[int, tuple] = {}
    guard = NonFiniteGuard(tc.max_bad_steps)
    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    metrics: dict[str, Any] = {}
    stopped = False
    bar = tqdm(range(start, tc.total_steps), desc="pretrain", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    if start == 0:
        snapshot(0)
    with GracefulExit() as stop, reuse_freed_memory(cfg.method.reuse_freed_memory) as reusing:
        for step in bar:
            # step -> (epoch, batch): a function of (seed, epoch) only, so a resumed run sees the same rows
            epoch, b = divmod(step, per_epoch)
            if epoch not in stream:
                seed = tc.seed * 100003 + epoch
                stream = {epoch: (*epoch_stream(corpus.documents, train_ix, seed), epoch_rows(n_rows, global_batch, seed))}
            tokens, starts, batches = stream[epoch]
            rows = list(distributed.shard(batches[b]))  # this process's block of the global batch
            t0 = time.perf_counter()
            restart = relora_step(model, opt, cfg.relora, step, tc.seed) if cfg.relora.enabled else {}
            micro = [make_rows(tokens, starts, mb, d.seq_length, d.isolate_documents) for mb in _micro(rows, tc.grad_accum)]
            total, grad_norm, lr = _step(model, micro, params, opt, sched, guard, tc, (chunk, head_dtype), sharded)
            dt, done = time.perf_counter() - t0, step + 1
            if reusing and done % TRIM_EVERY == 0:
                release_freed_memory()
            metrics = {"loss/train": total, "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch,
                       "tokens": done * global_batch * d.seq_length,
                       "perf/tokens_per_s": global_batch * d.seq_length / max(dt, 1e-9), "skipped_steps": guard.skipped,
                       **restart}
            evaluated = bool(cfg.method.eval_every) and done % cfg.method.eval_every == 0
            metrics.update(validate() if evaluated else {})
            if done % tc.log_every == 0 or evaluated or done == tc.total_steps:  # a validation is always logged
                logger.log(done, metrics)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            snapshot(done)
            if stop.after_step(done, tc.total_steps, tc.checkpoint_every, checkpoint, "pretrain"):
                stopped = True
                break
    summary = {"run_dir": str(run_dir), "train_documents": len(train_ix), "val_documents": len(corpus.documents) - len(train_ix),
               "rows_per_epoch": n_rows, "stopped": stopped, "loss/train": metrics.get("loss/train"),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if not stopped:
        summary.update(_finish(cfg, model, tok, run_dir, logger, validate, checkpoint, sharded))
    logger.close()
    if ds.is_main:
        print("[pretrain] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


def _finish(cfg: Config, model, tok, run_dir: Path, logger, validate, checkpoint, sharded: bool) -> dict[str, Any]:
    """The final validation, plot, checkpoint and saved model."""
    model.eval()
    final = validate()
    if final:
        logger.log(cfg.trainer.total_steps, final)
    distributed.on_main(plot_metrics, run_dir, ["loss/train", "loss/val", "ppl/val", "lr", "perf/tokens_per_s"],
                        title="pretrain")
    checkpoint(cfg.trainer.total_steps)
    if cfg.run.save_model:
        plain = distributed.unsharded_copy(model) if sharded else model
        distributed.on_main(save_hf_model, plain, tok, run_dir / "model")
    return final
