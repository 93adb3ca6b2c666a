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
(``method.lora``) trains adapters only; the saved model has them merged.

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
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from ankus import distributed
from ankus.config import ModelConfig, RunConfig, TrainerConfig
from ankus.data.batching import (Batch, BatchingMode, Example, bucketed_batches, make_batch, packing_is_exact,
                                 shuffled_batches)
from ankus.data.io import DataError
from ankus.losses.sft import sft_loss
from ankus.models.loading import load_model
from ankus.runs import MetricsLogger, create_run_dir, plot_metrics, save_hf_model, truncate_metrics

__all__ = ["SFTData", "SFTMethod", "SFTEval", "Config", "train", "load_rows", "tokenize_row",
           "tokenize_prompt_completion", "tokenize_chat", "sft_batch_loss", "spaced_walk", "randomwalk_rows",
           "randomwalk_eval", "make_optimizer", "lr_lambda", "step_batches", "maybe_apply_lora"]


@dataclass
class SFTData:
    name: str = "randomwalks"
    """Built-in set (randomwalks, sft_tiny), a JSONL file, a datasets save_to_disk directory, or a cached datasets name."""
    split: str = "train"
    """Split to read from a datasets dataset."""
    kwargs: dict = field(default_factory=dict)
    """Options of a built-in set (randomwalks: seed, n_nodes, n_walks, ...)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (prompt/completion rows)."""
    completion_field: str = "completion"
    """Field holding the completion (prompt/completion rows)."""
    messages_field: str = "messages"
    """Field holding a chat as a list of {role, content} (chat rows)."""
    template: str = "{prompt}"
    """Format string applied to the prompt of prompt/completion rows; {prompt} is the raw prompt."""
    chat_template: bool = False
    """Render prompt/completion rows as a user turn and an assistant turn of the chat template."""
    add_eos: bool = True
    """Append the EOS token to plain completions (it is a target, so the model learns to stop)."""
    score_field: str = ""
    """With min_score: keep only rows whose value in this field is >= min_score (e.g. a scored sample set)."""
    min_score: float | None = None
    """Threshold for score_field; null = keep every row."""
    max_length: int = 1024
    """Tokens per example; longer examples are cut from the right (examples left with no target are dropped)."""
    limit: int = 0
    """Use only the first this many rows; 0 = all."""
    eval_fraction: float = 0.05
    """Share of the examples held out for the eval loss (a seeded random split)."""
    batching: Literal["pack", "bucket", "pad"] = "pack"
    """pack: examples end to end with restarting positions; bucket: similar lengths per batch; pad: plain."""
    pack_length: int = 1024
    """Most tokens in one packed row (attention cost grows with its square; at least max_length)."""


@dataclass
class SFTMethod:
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """LR after warm-up: constant, or cosine decay to min_lr_ratio x lr at total_steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of trainer.lr (cosine only)."""
    eval_every: int = 0
    """Held-out loss every this many steps; 0 = at the end only."""
    lora: bool = False
    """Train LoRA adapters instead of all weights (the saved model has them merged)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target: list[str] = field(default_factory=list)
    """Module names to adapt; empty = every linear layer but the output head."""


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
    """LR schedule, eval cadence, LoRA."""
    eval: SFTEval = field(default_factory=SFTEval)
    """Sampling eval of the trained model (built-in tasks)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# data


def spaced_walk(walk: str) -> str:
    """``"bha"`` -> ``"b h a"``. SmolLM2's tokenizer merges runs of letters ("dfa" -> "df", "a");
    with spaces every node is one token (" h", " a"), as trlX's character-level vocabulary has it.
    The random-walks metric ignores spaces, so scored text needs no undoing."""
    return " ".join(walk)


def randomwalk_rows(**task_kwargs) -> list[dict]:
    """The random-walks demonstrations as prompt/completion rows: the start node is the prompt,
    the rest of the walk (space-separated) the completion: ``{"prompt": "b", "completion": " h a"}``."""
    from ankus.rewards.randomwalks import generate_random_walks

    task = generate_random_walks(**task_kwargs)
    return [{"prompt": w[0], "completion": spaced_walk(w)[1:]} for w in task.walks]


def _read_datasets(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"data '{name}': reading it needs the 'datasets' package ({e})") from None
    path = Path(name)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds
        raise DataError(f"data '{name}': not a built-in set, a JSONL file, or a dataset available offline "
                        f"({type(e).__name__}: {e})") from None
    return [dict(row) for row in ds]


def load_rows(data: SFTData) -> list[dict]:
    """Raw rows of the configured data source, filtered by score and limited."""
    from ankus.data.io import read_jsonl

    if data.name == "randomwalks":
        rows = randomwalk_rows(**data.kwargs)
    elif data.name == "sft_tiny":
        from ankus.data.assets import asset_path

        rows = read_jsonl(Path(str(asset_path("sft_tiny.jsonl"))))
    elif data.name.endswith(".jsonl") or Path(data.name).is_file():
        rows = read_jsonl(data.name)
    else:
        rows = _read_datasets(data.name, data.split)
    if data.min_score is not None:
        if not data.score_field:
            raise DataError("data.min_score needs data.score_field (the field holding each row's score)")
        missing = [i for i, r in enumerate(rows) if not isinstance(r.get(data.score_field), (int, float))]
        if missing:
            raise DataError(f"data '{data.name}': row {missing[0] + 1} has no numeric '{data.score_field}' field")
        rows = [r for r in rows if r[data.score_field] >= data.min_score]
    if data.limit:
        rows = rows[: data.limit]
    if not rows:
        raise DataError(f"data '{data.name}': no rows left to train on")
    return rows


def tokenize_prompt_completion(tok, prompt: str, completion: str, add_eos: bool = True,
                               max_length: int | None = None) -> Example | None:
    """Prompt tokens (mask 0), then completion tokens and EOS (mask 1). The two texts are
    tokenized apart, so the boundary tokens are those a model sees when it is prompted with
    ``prompt`` alone. None if no target token survives truncation."""
    prompt_ids = tok(prompt, add_special_tokens=True).input_ids if prompt else []
    completion_ids = tok(completion, add_special_tokens=False).input_ids
    if add_eos:
        completion_ids = completion_ids + [tok.eos_token_id]
    ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    return _finish(ids, mask, max_length)


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tok, messages: Sequence[dict], max_length: int | None = None) -> Example | None:
    """A chat rendered with the tokenizer's template; targets are the assistant turns.

    The template is rendered on growing prefixes of the conversation: the text an assistant turn
    adds (``render(msgs[:i+1])`` minus ``render(msgs[:i], add_generation_prompt=True)``) is a
    target, everything else is context. Each piece is tokenized on its own, which for
    ChatML-style templates splits exactly at the special tokens. Turns after the last assistant
    turn teach nothing and are dropped.
    """
    messages = [dict(m) for m in messages]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i}: expected {{'role': str, 'content': str}}, got {m!r}"[:200])
    if messages and messages[0]["role"] == "assistant":
        raise DataError("a conversation must not open with an assistant turn (there is nothing to condition on)")
    pieces: list[tuple[str, int]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:i], add_generation_prompt=True)
        full = _render(tok, messages[: i + 1], add_generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise DataError("the tokenizer's chat template does not render a conversation as a growing prefix; "
                            "cannot tell assistant tokens apart (use prompt/completion rows instead)")
        pieces += [(head[len(done):], 0), (full[len(head):], 1)]
        done = full
    if not pieces:
        return None
    ids: list[int] = []
    mask: list[int] = []
    for text, target in pieces:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [target] * len(piece)
    return _finish(ids, mask, max_length)


def _finish(ids: list[int], mask: list[int], max_length: int | None) -> Example | None:
    if max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0  # nothing precedes the first token, so it cannot be a target
    if not any(mask):
        return None
    return Example(ids, mask)


def tokenize_row(tok, row: dict, data: SFTData) -> Example | None:
    """A chat row (``messages_field`` present) or a prompt/completion row -> :class:`Example`."""
    if data.messages_field in row:
        msgs = row[data.messages_field]
        if not isinstance(msgs, list):
            raise DataError(f"field '{data.messages_field}' must be a list of messages, got {type(msgs).__name__}")
        return tokenize_chat(tok, msgs, data.max_length)
    for key in (data.prompt_field, data.completion_field):
        if not isinstance(row.get(key), str):
            raise DataError(f"row needs string fields '{data.prompt_field}' and '{data.completion_field}', "
                            f"or a '{data.messages_field}' list; got fields {sorted(row)}")
    prompt, completion = data.template.format(prompt=row[data.prompt_field]), row[data.completion_field]
    if data.chat_template:
        return tokenize_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             data.max_length)
    return tokenize_prompt_completion(tok, prompt, completion, data.add_eos, data.max_length)


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
# shared training plumbing (the reward-model trainer uses these too)


def lr_lambda(step: int, warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """LR multiplier at ``step``: linear warm-up over ``warmup`` steps, then constant or cosine."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainerConfig, schedule: str = "constant",
                   min_ratio: float = 0.1):
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, tc.warmup_steps, tc.total_steps, schedule, min_ratio))
    return opt, sched


def maybe_apply_lora(model, method) -> torch.nn.Module:
    if not method.lora:
        return model
    from ankus.config import LoRAConfig
    from ankus.models.lora import apply_lora

    return apply_lora(model, LoRAConfig(True, method.lora_r, method.lora_alpha, method.lora_dropout, list(method.lora_target)))


def step_batches(lengths: Sequence[int], batch_size: int, mode: BatchingMode, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch; a function of (seed, epoch) only, so a resumed run sees the same order."""
    epoch_seed = seed * 100003 + epoch
    if mode == "bucket":
        return bucketed_batches(lengths, batch_size, epoch_seed)
    return shuffled_batches(len(lengths), batch_size, epoch_seed)


def split_eval(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random (train, eval) split; eval gets round(fraction * n) items."""
    n_eval = int(round(fraction * len(items)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_ix = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in eval_ix], [x for i, x in enumerate(items) if i in eval_ix]


def _micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    n = max(1, min(grad_accum, len(indices)))
    size = math.ceil(len(indices) / n)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


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


def walk_is_legal(task, text: str) -> bool:
    """A legal walk: known nodes, every step along an edge of the graph, at most max_length nodes."""
    import string

    nodes = [c for c in text if c not in "| \t\n"]
    if not nodes or len(nodes) > task.max_length:
        return False
    ix = [string.ascii_lowercase.find(c) for c in nodes]
    if any(i < 0 or i >= task.n_nodes for i in ix):
        return False
    return all(bool(task.adjacency[a, b]) for a, b in zip(ix, ix[1:]))


def _sample(model, tok, prompts: list[str], ev: "SFTEval", chat_template: bool, seed: int) -> list[str]:
    from ankus.generation import GenerationConfig, generate

    gcfg = GenerationConfig(max_new_tokens=ev.max_new_tokens, do_sample=ev.temperature > 0,
                            temperature=max(ev.temperature, 1e-6), chat_template=chat_template)
    return generate(model, tok, prompts, gcfg, generator=torch.Generator().manual_seed(seed),
                    batch_size=ev.batch_size).texts


@torch.no_grad()
def randomwalk_eval(model, tok, task_kwargs: dict, ev: "SFTEval", seed: int = 0) -> dict[str, Any]:
    """Sample walks from every start node: the fraction of legal walks, of legal walks that reach
    the goal, and the mean optimality (trlX's metric)."""
    from ankus.rewards.randomwalks import generate_random_walks

    task = generate_random_walks(**task_kwargs)
    prompts = [p for p in task.prompts for _ in range(ev.samples_per_prompt)]
    samples = [p + o for p, o in zip(prompts, _sample(model, tok, prompts, ev, False, seed))]
    legal = [walk_is_legal(task, s) for s in samples]
    opt = task.reward_fn(samples)
    goal = "abcdefghijklmnopqrstuvwxyz"[task.goal]
    return {"legal_fraction": sum(legal) / len(samples),
            "reach_goal_fraction": sum(1 for s, ok in zip(samples, legal) if ok and goal in s) / len(samples),
            "optimality": sum(opt) / len(opt), "_examples": samples[:8]}


@torch.no_grad()
def sentiment_eval(model, tok, data: SFTData, ev: "SFTEval", seed: int = 0) -> dict[str, Any]:
    """Mean VADER compound score of samples on the held-out review openings (prompted as in training)."""
    from ankus.data.assets import review_openings
    from ankus.rewards.sentiment import compound_scores

    prompts = [data.template.format(prompt=p) for p in review_openings("eval") for _ in range(ev.samples_per_prompt)]
    texts = _sample(model, tok, prompts, ev, data.chat_template, seed)
    scores = compound_scores(texts)
    return {"vader": sum(scores) / len(scores), "_examples": texts[:4]}


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
        out = (randomwalk_eval(model, tok, cfg.data.kwargs, cfg.eval, seed) if task == "randomwalks"
               else sentiment_eval(model, tok, cfg.data, cfg.eval, seed))
    finally:
        model.train(was_training)
    return {("_examples" if k == "_examples" else f"eval/{k}"): v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# training


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run SFT; returns a summary (run_dir, final train/eval loss, task eval if any)."""
    from ankus.checkpoint import GracefulExit, NonFiniteGuard, latest_checkpoint, load_checkpoint, save_checkpoint

    tc, d = cfg.trainer, cfg.data
    ds = distributed.setup(fsdp_ok=True, shard=tc.fsdp)
    device = distributed.resolve_device(tc.device)
    sharded = distributed.use_fsdp(tc.fsdp)
    if sharded and cfg.method.lora:
        raise ValueError("trainer.fsdp with method.lora is not supported: LoRA adapters are small, train them data "
                         "parallel (trainer.fsdp=false)")
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    run_dir = distributed.on_main(create_run_dir, cfg.run, "sft", cfg, exist_ok=resume)

    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed, device=device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = load_rows(d)
    examples = []
    for i, row in enumerate(rows):
        try:
            ex = tokenize_row(tok, row, d)
        except DataError as e:
            raise DataError(f"data '{d.name}', row {i + 1}: {e}") from None
        if ex is not None:
            examples.append(ex)
    n_dropped = len(rows) - len(examples)
    if not examples:
        raise DataError(f"data '{d.name}': no example has a completion token to learn")
    train_ex, eval_ex = split_eval(examples, d.eval_fraction, tc.seed)
    mode: BatchingMode = d.batching
    if mode == "pack" and not packing_is_exact(model):
        # This model does not read sequence boundaries from position ids: packing would leak
        # attention across examples. Bucketing is exact everywhere.
        print(f"[sft] {cfg.model.spec} does not isolate packed sequences; using length bucketing instead")
        mode = "bucket"

    before = distributed.on_main(task_eval, model, tok, cfg, seed=tc.seed) if not resume else {}
    before.pop("_examples", None)
    model = maybe_apply_lora(model, cfg.method)
    if sharded:  # FSDP2: every process holds 1/N of each layer; before the optimizer sees the parameters
        distributed.fsdp_wrap(model)
    # under FSDP every process must run the same forwards, so what rank 0 alone ran (evaluations)
    # runs on every process there
    on_main_or_all = (lambda fn, *a, **k: fn(*a, **k)) if sharded else distributed.on_main
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, tc, cfg.method.lr_schedule, cfg.method.min_lr_ratio)
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

    lengths = [len(ex) for ex in train_ex]
    global_batch = tc.batch_size * ds.world_size  # batch_size examples per process
    per_epoch = math.ceil(len(train_ex) / global_batch)  # both samplers cut ceil(n / batch_size) batches
    epoch_batches: dict[int, list[list[int]]] = {}
    guard = NonFiniteGuard(tc.max_bad_steps)
    logger = distributed.main_only(lambda: MetricsLogger(run_dir / "metrics.jsonl"))
    if before and start == 0:
        logger.log(0, before)  # the untrained model's task eval: the first point of its curve
    metrics: dict[str, Any] = {}
    stopped = False
    bar = tqdm(range(start, tc.total_steps), desc="sft", disable=not cfg.run.progress or not ds.is_main,
               initial=start, total=tc.total_steps)
    with GracefulExit() as stop:
        for step in bar:
            # step -> (epoch, batch); the order depends on (seed, epoch) only, which makes resume exact
            epoch, b = divmod(step, per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: step_batches(lengths, global_batch, mode, tc.seed, epoch)}
            indices = list(distributed.shard(epoch_batches[epoch][b]))  # this process's block of the batch

            t0 = time.perf_counter()
            micro = [make_batch([train_ex[i] for i in mb], pad_id, mode, d.pack_length)
                     for mb in (_micro_batches(indices, tc.grad_accum) if indices else [])]
            if sharded:  # a process with fewer micro-batches runs zero-weighted ones: FSDP needs equal forwards
                n_micro = int(distributed.all_reduce_max(torch.tensor([float(len(micro))]))[0])
                filler = make_batch([train_ex[0]], pad_id, mode, d.pack_length)
                pad_micro = [filler] * (n_micro - len(micro))
            local_targets = sum(int(mb.loss_mask[:, 1:].sum()) for mb in micro)
            n_targets = distributed.sum_floats(local_targets)[0]  # over every process's block
            total_loss = 0.0
            for mb in micro:
                loss, stats = sft_batch_loss(model, mb)
                # weight each micro-batch by its share of the step's targets: the sum (over
                # micro-batches and processes) equals the token-level mean over the whole batch,
                # whatever the split
                (loss * (int(stats["tokens"]) / n_targets)).backward()
                total_loss += float(loss.detach()) * int(stats["tokens"]) / n_targets
            for mb in (pad_micro if sharded else []):
                (sft_batch_loss(model, mb)[0] * 0.0).backward()
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
            metrics = {"loss/sft": total_loss, "lr": lr, "grad_norm": float(grad_norm), "epoch": epoch,
                       "perf/tokens_per_s": n_tokens / max(dt, 1e-9), "perf/targets": int(n_targets),
                       "perf/pad_fraction": 1.0 - n_tokens / max(n_cells, 1.0),
                       "skipped_steps": guard.skipped}
            done = step + 1
            if cfg.method.eval_every and done % cfg.method.eval_every == 0 and eval_ex:
                metrics["loss/sft_eval"] = on_main_or_all(evaluate_loss, model, eval_ex, pad_id, mode,
                                                          d.pack_length, tc.batch_size)
            if done % tc.log_every == 0 or done == tc.total_steps:
                logger.log(done, metrics)
            bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.2e}")
            if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.total_steps:
                checkpoint(done)
            if distributed.any_rank(stop.requested):  # a signal that reached one process stops all
                checkpoint(done)
                stopped = True
                print(f"[sft] stop requested: checkpoint saved at step {done}; continue with --resume")
                break
    model.eval()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "train_examples": len(train_ex), "eval_examples": len(eval_ex),
                               "dropped_examples": n_dropped, "batching": mode, "stopped": stopped,
                               "loss/sft": metrics.get("loss/sft")}
    if stopped:
        logger.close()
        return summary
    final = {}
    if eval_ex:
        final["loss/sft_eval"] = on_main_or_all(evaluate_loss, model, eval_ex, pad_id, mode, d.pack_length,
                                                tc.batch_size)
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
