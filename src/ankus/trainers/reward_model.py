"""Reward-model training: a causal LM trunk plus a scalar head, fitted to pairwise preferences.

Data: (prompt, chosen, rejected) triples -- a JSONL file, or the built-in ``synthetic`` set
(:func:`synthetic_preferences`). Each response is read as ``prompt + response + EOS`` and scored
by the head on the final hidden state at that EOS (:mod:`ankus.rewards.model`). The loss is the
Bradley–Terry negative log-likelihood −log σ(r_chosen − r_rejected) (InstructGPT, eq. 1);
pairwise accuracy on held-out pairs is the metric.

Chosen and rejected responses of a step go through the trunk in one forward (packed end to end,
or bucketed by length), and the saved run serves as a PPO reward: ``reward: model:<run dir>``.

Under several processes (torchrun, accelerate launch) each takes its block of one global batch of
``trainer.batch_size`` x processes pairs; gradients are summed over processes (see
:mod:`ankus.distributed`), and rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ankus.data.tokens import pad_id as pad_token
from ankus import distributed
from ankus.config import ConfigError, LoRAConfig, ModelConfig, RunConfig, TrainerConfig, reject_unused
from ankus.data.batching import BatchingMode, Example, make_batch, micro_batches, packing_is_exact, split_eval, step_batches
from ankus.data.io import DataError
from ankus.losses.reward import bradley_terry_loss
from ankus.models.heads import ValueHead
from ankus.models.loading import load_model
from ankus.models.lora import apply_lora
from ankus.optim import make_optimizer
from ankus.rewards.model import FORMAT, HEAD_FILE, META_FILE, sequence_rewards, tokenize_response
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics

__all__ = ["RMData", "RMMethod", "Config", "train", "check_config", "synthetic_preferences", "load_pairs", "pair_rewards",
           "evaluate_pairs"]


@dataclass
class RMData:
    name: str = "synthetic"
    """Built-in 'synthetic' preference set, or a JSONL file of {prompt, chosen, rejected}."""
    eval_name: str = ""
    """Held-out JSONL file; empty = eval_fraction of the data (the synthetic set has its own held-out split)."""
    eval_fraction: float = 0.1
    """Share of the pairs held out when there is no eval file or built-in split."""
    kwargs: dict = field(default_factory=dict)
    """Options of the synthetic set (n_train, n_eval, seed, negation)."""
    prompt_field: str = "prompt"
    """Field holding the prompt."""
    chosen_field: str = "chosen"
    """Field holding the preferred response."""
    rejected_field: str = "rejected"
    """Field holding the dispreferred response."""
    max_length: int = 512
    """Tokens per prompt+response; longer inputs lose their first tokens (the read-out EOS stays)."""
    batching: Literal["pack", "bucket", "pad"] = "bucket"
    """bucket: similar lengths per batch (default: no LM-head cost to save here, and short rows keep
    attention cheap); pack: sequences end to end with restarting positions; pad: plain."""
    pack_length: int = 512
    """Most tokens in one packed row (attention cost grows with its square)."""


@dataclass
class RMMethod:
    margin: float = 0.0
    """Bradley–Terry margin m in −log σ(r_c − r_r − m) (Llama 2); 0 = the plain loss."""
    eval_every: int = 50
    """Held-out accuracy every this many steps; 0 = at the end only."""
    eval_batch_size: int = 64
    """Pairs per forward in evaluation."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The trunk (a causal LM)."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=1e-4, batch_size=32, total_steps=200))
    """Optimisation; batch_size counts preference pairs."""
    data: RMData = field(default_factory=RMData)
    """Preference pairs."""
    method: RMMethod = field(default_factory=RMMethod)
    """Loss margin, eval cadence."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters on the trunk (the head is always trained in full); the saved trunk has them merged."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# the synthetic preference set

_POSITIVE = ("good", "great", "excellent", "wonderful", "superb", "delightful", "brilliant", "lovely",
             "charming", "fantastic", "pleasant", "enjoyable", "moving", "clever", "gripping", "stunning")
_NEGATIVE = ("bad", "awful", "terrible", "dull", "boring", "poor", "dreadful", "weak",
             "tedious", "clumsy", "bland", "lousy", "messy", "shallow", "forgettable", "annoying")
_TRAIN_NOUNS = ("film", "plot", "acting", "soundtrack", "ending", "script", "pacing", "dialogue", "cast",
                "story", "direction", "finale", "lighting", "editing", "score", "premise", "villain", "hero",
                "humour", "opening", "sequel", "costumes", "casting", "cinematography")
_EVAL_NOUNS = ("screenplay", "narrative", "performances", "music", "twist", "climax", "characters", "visuals")
_INTROS = ("", "Honestly, ", "Overall, ", "In short, ", "To me, ", "I thought ", "Frankly, ", "All in all, ")
_TAILS = ("", " from start to finish", " in every scene", " at times", " for the most part", " throughout",
          " compared to the book", " on a second viewing")


def synthetic_preferences(n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                          negation: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference pairs whose preference is learnable but not a bag of words.

    Prompt: ``"Review the {noun}."``. Both responses share one sentence frame -- an intro, the
    noun, optionally ``not``, a tail -- and differ only in one adjective, one from a positive
    list and one from a negative list (16 each). The chosen response is the one that *means*
    something positive: the positive adjective, or, when the frame is negated (a share
    ``negation`` of pairs), the negative one ("not dull" beats "not brilliant"). So a model must
    find the adjective among distractors at varying positions and read the word before it.
    Held-out pairs use nouns never seen in training. Deterministic in ``seed``.
    """
    rng = random.Random(seed)

    def make(n: int, nouns: tuple[str, ...]) -> list[dict]:
        rows = []
        for _ in range(n):
            noun, intro, tail = rng.choice(nouns), rng.choice(_INTROS), rng.choice(_TAILS)
            pos, neg = rng.choice(_POSITIVE), rng.choice(_NEGATIVE)
            negated = rng.random() < negation
            frame = rng.randrange(2)

            def sentence(adj: str) -> str:
                nt = "not " if negated else ""
                core = f"the {noun} was {nt}{adj}" if frame == 0 else f"it was {nt}a {adj} {noun}"
                text = f"{intro}{core}{tail}."
                return text[0].upper() + text[1:]

            good, bad = (neg, pos) if negated else (pos, neg)
            rows.append({"prompt": f"Review the {noun}.", "chosen": " " + sentence(good),
                         "rejected": " " + sentence(bad), "negated": negated})
        return rows

    return make(n_train, _TRAIN_NOUNS), make(n_eval, _EVAL_NOUNS)


# ---------------------------------------------------------------------------------------------
# data


def _read_pairs(path: str, d: RMData) -> list[dict]:
    from ankus.data.io import read_jsonl

    rows = read_jsonl(path, required=(d.prompt_field, d.chosen_field, d.rejected_field),
                      non_empty=(d.chosen_field, d.rejected_field))
    return [{"prompt": r[d.prompt_field], "chosen": r[d.chosen_field], "rejected": r[d.rejected_field]} for r in rows]


def load_pairs(d: RMData, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) lists of {prompt, chosen, rejected}."""
    if d.name == "synthetic":
        train_rows, eval_rows = synthetic_preferences(**d.kwargs)
    else:
        if not (d.name.endswith(".jsonl") or Path(d.name).is_file()):
            raise DataError(f"data.name '{d.name}': expected 'synthetic' or a JSONL file of "
                            f"{{{d.prompt_field}, {d.chosen_field}, {d.rejected_field}}}")
        train_rows, eval_rows = _read_pairs(d.name, d), []
    if d.eval_name:
        eval_rows = _read_pairs(d.eval_name, d)
    elif not eval_rows:
        train_rows, eval_rows = split_eval(train_rows, d.eval_fraction, seed)
    if not train_rows:
        raise DataError(f"data '{d.name}': no training pairs")
    return train_rows, eval_rows


def _pair_examples(tok, rows: list[dict], max_length: int) -> list[tuple[Example, Example]]:
    return [(tokenize_response(tok, r["prompt"], r["chosen"], max_length),
             tokenize_response(tok, r["prompt"], r["rejected"], max_length)) for r in rows]


# ---------------------------------------------------------------------------------------------
# rewards of a batch of pairs


def pair_rewards(trunk, head, pairs: list[tuple[Example, Example]], pad_id: int, mode: BatchingMode,
                 pack_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards of ``pairs`` from one forward: (P,), (P,)."""
    flat = [ex for pair in pairs for ex in pair]  # c0, r0, c1, r1, ...
    rewards = sequence_rewards(trunk, head, make_batch(flat, pad_id, mode, pack_length))  # (2P,)
    return rewards[0::2], rewards[1::2]


@torch.no_grad()
def evaluate_pairs(trunk, head, pairs: list[tuple[Example, Example]], pad_id: int, mode: BatchingMode,
                   pack_length: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out pairwise accuracy, loss and score statistics."""
    was_training = trunk.training
    trunk.eval()
    chosen, rejected = [], []
    for s in range(0, len(pairs), batch_size):
        c, r = pair_rewards(trunk, head, pairs[s:s + batch_size], pad_id, mode, pack_length)
        chosen.append(c)
        rejected.append(r)
    trunk.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    loss, stats = bradley_terry_loss(c, r)
    both = torch.cat([c, r])
    return {"eval/accuracy": float(stats["reward/accuracy"]), "eval/loss": float(loss),
            "eval/margin": float(stats["reward/margin"]), "eval/score_mean": float(both.mean()),
            "eval/score_std": float(both.std()) if both.numel() > 1 else 1.0}


# ---------------------------------------------------------------------------------------------
# saving


def save_reward_model(trunk, head: ValueHead, tok, path: Path, meta: dict) -> Path:
    """Trunk in HF format (LoRA merged), then the head and its reading instructions beside it."""
    from safetensors.torch import save_file

    save_hf_model(trunk, tok, path)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / META_FILE)
    return path


# ---------------------------------------------------------------------------------------------
# training


def check_config(cfg: Config) -> None:
    """Reject settings this trainer would ignore: a :class:`ConfigError` names the field."""
    d = cfg.data
    if d.name != "synthetic":
        reject_unused(d, ["kwargs"], "reward_model", "unless data.name is synthetic", "data")
    if d.name == "synthetic" or d.eval_name:
        reject_unused(d, ["eval_fraction"], "reward_model", "when the held-out pairs come from data.eval_name or "
                      "the synthetic set's own split", "data")
    if d.name == "synthetic" and not d.eval_name:
        reject_unused(d, ["prompt_field", "chosen_field", "rejected_field"], "reward_model",
                      "for the synthetic set (only for JSONL files)", "data")
    if d.batching != "pack":
        reject_unused(d, ["pack_length"], "reward_model", "unless data.batching is pack", "data")
    if not cfg.lora.enabled:
        reject_unused(cfg.lora, ["r", "alpha", "dropout", "target"], "reward_model", "unless lora.enabled is true",
                      "lora")
    elif cfg.trainer.fsdp:
        raise ConfigError("trainer.fsdp with lora.enabled is not supported by the reward_model trainer: LoRA "
                          "adapters are small, train them data parallel (trainer.fsdp=false)")


def _step(trunk, head, params, opt, sched, guard, pairs: list[tuple[Example, Example]], indices: list[int],
          n_global: int, pad_id: int, mode: BatchingMode, cfg: Config, sharded: bool) -> dict[str, Any]:
    """One optimizer step over this process's block ``indices`` of a global batch of ``n_global``
    pairs; returns the global batch's statistics."""
    tc, m, pack_length = cfg.trainer, cfg.method, cfg.data.pack_length
    t0 = time.perf_counter()
    rewards_c, rewards_r = [torch.zeros(0)], [torch.zeros(0)]
    n_tokens = 0
    micro = micro_batches(indices, tc.grad_accum)
    if sharded:  # every process runs as many forwards (zero-weighted filler where it has fewer)
        most = int(distributed.all_reduce_max(torch.tensor([float(len(micro))]))[0])
        for _ in range(most - len(micro)):
            c, r = pair_rewards(trunk, head, pairs[:1], pad_id, mode, pack_length)
            ((c - r).sum() * 0.0).backward()
    for mb in micro:
        batch = [pairs[i] for i in mb]
        chosen, rejected = pair_rewards(trunk, head, batch, pad_id, mode, pack_length)
        loss, _ = bradley_terry_loss(chosen, rejected, m.margin or None)
        # the loss is a mean over pairs: weight each micro-batch by its share of the global batch,
        # so the gradients summed over micro-batches and processes are the batch mean's
        (loss * len(batch) / n_global).backward()
        rewards_c.append(chosen.detach().float().cpu())
        rewards_r.append(rejected.detach().float().cpu())
        n_tokens += sum(len(c) + len(r) for c, r in batch)
    distributed.sync_gradients(params)
    # statistics of the whole global batch, from every process's rewards (in rank order)
    chosen_all = distributed.all_gather_cat(torch.cat(rewards_c))
    rejected_all = distributed.all_gather_cat(torch.cat(rewards_r))
    sums = {k: float(v) for k, v in bradley_terry_loss(chosen_all, rejected_all, m.margin or None)[1].items()}
    n_tokens = int(distributed.sum_floats(n_tokens)[0])
    grad_norm = (distributed.clip_grad_norm(params, tc.max_grad_norm) if tc.max_grad_norm > 0
                 else torch.tensor(0.0))
    if guard.check(sums["loss/rm"], grad_norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    lr = sched.get_last_lr()[0]
    sched.step()
    dt = time.perf_counter() - t0
    return {**sums, "lr": lr, "grad_norm": float(grad_norm), "perf/tokens_per_s": n_tokens / max(dt, 1e-9),
            "skipped_steps": guard.skipped}


def _prepare_pairs(cfg: Config, trunk, tok) -> tuple[list, list, BatchingMode]:
    """Tokenized (train, eval) pairs and the batching mode (bucketing where packing is not exact)."""
    d = cfg.data
    train_rows, eval_rows = load_pairs(d, cfg.trainer.seed)
    train_pairs = _pair_examples(tok, train_rows, d.max_length)
    eval_pairs = _pair_examples(tok, eval_rows, d.max_length)
    mode: BatchingMode = d.batching
    if mode == "pack" and not packing_is_exact(trunk):
        if distributed.is_main():
            print(f"[reward_model] {cfg.model.spec} does not isolate packed sequences; using length bucketing instead")
        mode = "bucket"
    return train_pairs, eval_pairs, mode


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Fit a reward model; returns a summary (run_dir, held-out accuracy before and after)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint

    check_config(cfg)
    tc, d = cfg.trainer, cfg.data
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    sharded = distributed.use_fsdp(tc.fsdp)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "reward_model", cfg, exist_ok=resume)
    device = distributed.resolve_device(tc.device)
    trunk, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    pad_id = pad_token(tok)
    train_pairs, eval_pairs, mode = _prepare_pairs(cfg, trunk, tok)

    hidden_size = trunk.config.get_text_config().hidden_size
    head = ValueHead(hidden_size).to(device)  # float32 whatever the trunk's dtype (heads cast their input)
    if cfg.lora.enabled:
        trunk = apply_lora(trunk, cfg.lora)
    if sharded:  # FSDP2: the trunk sharded over the processes, the (small) head replicated
        distributed.fsdp_wrap(trunk)
    trunk.train()
    trunk_params = [p for p in trunk.parameters() if p.requires_grad]
    params = trunk_params + list(head.parameters())
    # sharded (DTensor) and plain parameters in separate groups: a fused CUDA step cannot mix them
    groups = [{"params": trunk_params}, {"params": list(head.parameters())}] if sharded else params
    opt, sched = make_optimizer(groups, tc)
    owner = torch.nn.ModuleDict({"model": trunk, "value_head": head})  # names the optimizer state under FSDP

    def views(gather: bool) -> tuple[dict, Any]:
        """The modules and optimizer as checkpoints see them (gathered stand-ins under FSDP)."""
        trunk_view, opt_view = distributed.checkpoint_views(trunk, opt, gather=gather, optimizer_owner=owner)
        return {"model": trunk_view, "value_head": head}, opt_view

    start = 0
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        modules, opt_view = views(gather=False)
        start = load_checkpoint(ckpt, modules=modules, optimizer=opt_view, scheduler=sched)["step"]
        distributed.restore_rank_rng(ckpt)
        distributed.on_main(truncate_metrics, run_dir / "metrics.jsonl", start)
        if ds.is_main:
            print(f"[reward_model] resumed from {ckpt} at step {start}")

    def checkpoint(step: int) -> None:
        rngs = distributed.rank_rng_states()  # collective: every rank's RNG, saved by rank 0
        modules, opt_view = views(gather=True)  # a collective under FSDP
        distributed.on_main(save_checkpoint, run_dir, step, modules=modules, optimizer=opt_view, scheduler=sched,
                            generators=rngs, extra={"algorithm": "reward_model"}, keep_last=tc.keep_last)

    def evaluate() -> dict[str, float]:  # on rank 0 only (the replicas are identical); every rank gets it
        with distributed.full_params(trunk):  # under FSDP: gathered, so rank 0's forwards need no collective
            return distributed.on_main(evaluate_pairs, trunk, head, eval_pairs, pad_id, mode, d.pack_length,
                                       cfg.method.eval_batch_size)

    def step_fn(indices: list[int], n_global: int) -> dict[str, Any]:
        return _step(trunk, head, params, opt, sched, guard, train_pairs, indices, n_global, pad_id, mode, cfg, sharded)

    before = evaluate() if eval_pairs and start == 0 else {}
    guard = NonFiniteGuard(tc.max_bad_steps)
    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    if before:
        logger.log(0, before)
    with GracefulExit() as stop:
        stopped = _loop(cfg, step_fn, [len(c) + len(r) for c, r in train_pairs], mode, start, logger, checkpoint,
                        evaluate if eval_pairs else None, stop)
    trunk.eval()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
                               "batching": mode, "stopped": stopped}
    if before:
        summary["eval/accuracy_before"] = before["eval/accuracy"]
    if stopped:
        logger.close()
        return summary
    after = evaluate() if eval_pairs else {}
    if after:
        logger.log(tc.total_steps, after)
    logger.close()
    summary.update(after)
    _finish(cfg, trunk, head, tok, run_dir, checkpoint, summary, after, hidden_size)
    return summary


def _loop(cfg: Config, step_fn, lengths: list[int], mode: BatchingMode, start: int, logger, checkpoint, evaluate,
          stop) -> bool:
    """Optimizer steps ``start`` .. ``total_steps``; True when a signal stopped the run."""
    tc, m, ds = cfg.trainer, cfg.method, distributed.state()
    global_batch = tc.batch_size * ds.world_size  # batch_size pairs per process
    per_epoch = math.ceil(len(lengths) / global_batch)
    epoch_batches: dict[int, list[list[int]]] = {}
    bar = tqdm(range(start, tc.total_steps), desc="reward_model", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    for step in bar:
        epoch, b = divmod(step, per_epoch)  # the order is a function of (seed, epoch): resume is exact
        if epoch not in epoch_batches:
            epoch_batches = {epoch: step_batches(lengths, global_batch, mode, tc.seed, epoch)}
        batch = epoch_batches[epoch][b]
        metrics = step_fn(list(distributed.shard(batch)), len(batch))  # this process's block of the batch
        metrics["epoch"] = epoch
        done = step + 1
        if m.eval_every and done % m.eval_every == 0 and done < tc.total_steps and evaluate is not None:
            metrics.update(evaluate())
        if done % tc.log_every == 0 or done == tc.total_steps or "eval/accuracy" in metrics:
            logger.log(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss/rm']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
        if stop.after_step(done, tc.total_steps, tc.checkpoint_every, checkpoint, "reward_model"):
            return True
    return False


def _finish(cfg: Config, trunk, head, tok, run_dir: Path, checkpoint, summary: dict, after: dict,
            hidden_size: int) -> None:
    """After the last step: the plot, the final checkpoint, the saved reward model, the summary line."""
    distributed.on_main(plot_metrics, run_dir, ["loss/rm", "reward/accuracy", "eval/accuracy", "reward/margin"],
                        title="Reward model")
    checkpoint(cfg.trainer.total_steps)
    if cfg.run.save_model:
        meta = {"format": FORMAT, "head": "ValueHead", "hidden_size": hidden_size,
                "input": "tokens(prompt) + tokens(response, no special tokens) + [eos_token_id]",
                "read_out": "head(final hidden state, output_hidden_states[-1], at the last token)",
                "max_length": cfg.data.max_length, "score_mean": after.get("eval/score_mean", 0.0),
                "score_std": after.get("eval/score_std", 1.0), "eval_accuracy": after.get("eval/accuracy"),
                "trained_from": cfg.model.spec}
        plain = distributed.unsharded_copy(trunk)  # FSDP: an ordinary copy on rank 0 (a collective)
        distributed.on_main(save_reward_model, plain, head, tok, run_dir / "model", meta)
    if distributed.is_main():
        print("[reward_model] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in summary.items()))
