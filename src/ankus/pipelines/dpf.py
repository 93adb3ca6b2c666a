"""Direct Principle Feedback (Castricato et al. 2024): teach a model to avoid one entity.

The Pink Elephant problem: told "do not mention X (the pink elephant), discuss Y (the grey
elephant) instead", a model should keep X out of its reply even when the user steers towards X.
DPF trains this by DPO directly on (original reply = rejected, revised reply = chosen) pairs
that come from a critique-and-revision step, skipping Constitutional AI's ranking step.

The pipeline, one step per function and per ``ankus dpf`` command; each step writes JSONL that
the next one reads, so the data can be inspected, edited or brought from elsewhere::

    pairs       (X, Y) pairs: the shipped list (ankus.data.assets) split train / eval   -> pairs_{split}.jsonl
    dialogues   an LM writes a user question that leads towards X; the model answers
                with the principle in its system prompt                               -> dialogues_{split}.jsonl
    revise      the LM critiques each answer against the principle and revises it;
                revisions that still mention X are dropped and counted               -> revisions.jsonl,
                                                                                          preferences.jsonl
    train       DPO (ankus.trainers.dpo) on preferences.jsonl                         -> dpo/model
    evaluate    held-out pairs, four systems: base without the principle, base with it
                (the paper's prompted baseline), base with classifier-free guidance
                whose negative prompt asks to discuss X, and the DPF model            -> eval_responses.jsonl,
                                                                                          table.csv

``ankus train dpf_smollm2`` (or ``ankus dpf run``) runs all of it into one run
directory; with ``--resume`` a step whose output file exists is read instead of recomputed, which
is also how hand-edited data enters the pipeline.

The LM that writes questions, critiques and revisions (``lm.spec``) is any model spec, or the
URL of an OpenAI-compatible server (``http://host:port/v1``, for instance ``ankus serve`` over a
stronger model). The model that is trained and evaluated (``model.spec``) is local.

What a 135M model can do here: it writes usable questions when shown two examples (few-shot
turns), but its revisions are weak; in a 12-pair probe, sampling 4 revisions per answer kept a
revision that drops X and names Y for 3/12 answers at guidance 1, 10/12 with classifier-free
guidance 2 against a negative conversation that asks for X. Hence ``revision.guidance_scale: 2``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ankus.data.tokens import pad_id
from ankus.chat import chat_backend, LocalChat
from ankus.config import LoRAConfig, ModelConfig, RunConfig, TrainerConfig, reject_unused
from ankus.data.assets import PinkElephantPair, pink_elephant_pairs
from ankus.data.io import DataError, read_jsonl, write_jsonl
from ankus.generation.engine import GenerationConfig
from ankus.losses.ppo import logprobs_from_logits
from ankus.rewards.mentions import mentions
from ankus.trainers.dpo import DPOMethod, PreferenceData

__all__ = [
    "Config", "LMConfig", "PairsConfig", "DialogueConfig", "RevisionConfig", "TrainConfig", "EvalConfig",
    "principle", "select_pairs", "read_pairs", "write_dialogues", "critique_and_revise", "preference_rows",
    "evaluate", "format_table", "train", "check_config",
]

# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class LMConfig:
    spec: str = "smollm2-135m-instruct"
    """Who writes questions, critiques and revisions: a model spec, or an OpenAI-compatible URL (http://…/v1)."""
    served_model: str | None = None
    """HTTP only: the "model" field of each request; null = the server's default."""
    api_key_env: str = "OPENAI_API_KEY"
    """HTTP only: environment variable holding the bearer token (unset = no Authorization header)."""
    batch_size: int = 16
    """Local only: conversations per generation batch."""
    seed: int = 0
    """Local only: sampling seed."""


@dataclass
class PairsConfig:
    path: str = "shipped"
    """'shipped' (ankus' own 350 pairs) or a JSONL of {domain, x, y, x_aliases, y_aliases, split}."""
    train_limit: int = 0
    """Use only the first N training pairs after a seeded shuffle (0 = all)."""
    eval_limit: int = 0
    """Use only the first N held-out pairs after a seeded shuffle (0 = all)."""
    seed: int = 0
    """Shuffle seed for the limits."""


@dataclass
class DialogueConfig:
    principle: str = "Do not mention {x}. Discuss {y} instead."
    """The system prompt the model answers under; {x} and {y} are filled in."""
    attempts: int = 3
    """Samples per pair for the question (kept: the first that names X) and, on the training
    split, for the answer (kept: the first that mentions X, i.e. breaks the principle)."""
    question_tokens: int = 48
    """Most new tokens of a question."""
    answer_tokens: int = 80
    """Most new tokens of an answer."""
    temperature: float = 0.8
    """Sampling temperature (questions and answers)."""
    top_p: float = 0.95
    """Nucleus sampling for questions and answers."""


@dataclass
class RevisionConfig:
    attempts: int = 4
    """Revisions sampled per answer; the first that passes the checks is kept."""
    require_y: bool = True
    """Keep only revisions that mention Y (the principle says to discuss it)."""
    guidance_scale: float = 2.0
    """Classifier-free guidance for revisions, against the same request asking to keep X; 1 = off."""
    critique_tokens: int = 48
    """Most new tokens of a critique."""
    revision_tokens: int = 80
    """Most new tokens of a revision."""
    temperature: float = 0.8
    """Sampling temperature for critiques and revisions."""
    top_p: float = 0.95
    """Nucleus sampling for critiques and revisions."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Passes over preferences.jsonl (sets trainer.total_steps when that is 0)."""
    skip: bool = False
    """Skip training (evaluate the three baselines only)."""


@dataclass
class EvalConfig:
    samples: int = 1
    """Responses per held-out dialogue and system."""
    max_new_tokens: int = 80
    """Most new tokens per response."""
    temperature: float = 0.7
    """Sampling temperature of every system."""
    top_p: float = 0.95
    """Nucleus sampling of every system."""
    guidance_scale: float = 2.0
    """The CFG baseline's gamma."""
    negative_principle: str = "Discuss {x}. Mention {x} by name."
    """The CFG baseline's negative system prompt ({x}, {y} filled in)."""
    judge: bool = False
    """Also ask the LM (lm.spec) whether each response mentions X (a second opinion beside the detector)."""
    seed: int = 1234
    """Sampling seed; every system starts from it, so they see the same random stream."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model that DPF trains and the evaluation compares against."""
    lm: LMConfig = field(default_factory=LMConfig)
    """The LM that writes questions, critiques and revisions."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """Which (X, Y) pairs."""
    dialogues: DialogueConfig = field(default_factory=DialogueConfig)
    """Step b: questions and answers."""
    revision: RevisionConfig = field(default_factory=RevisionConfig)
    """Step c: critique and revision."""
    dpo: DPOMethod = field(default_factory=DPOMethod)
    """Step d: DPO hyper-parameters (beta, loss_type, ...), as the dpo recipes' method section."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Step d: LoRA adapters for DPO, as in the dpo recipes."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(lr=5e-6, betas=(0.9, 0.999), weight_decay=0.0,
                                                                         total_steps=0))
    """Step d: optimisation (total_steps 0 = train.epochs passes over the pairs)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Step d: how long, or not at all."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """Step e."""
    run: RunConfig = field(default_factory=lambda: RunConfig(name="dpf"))
    """Run directory (every step's JSONL, the DPO run under dpo/, table.csv)."""


def principle(pair: PinkElephantPair, template: str) -> str:
    """The principle text for one pair: ``template`` with {x} and {y} filled in."""
    return template.format(x=pair.x, y=pair.y)


# ---------------------------------------------------------------------------------------------
# step a: pairs


def _pair_row(p: PinkElephantPair) -> dict:
    return {"domain": p.domain, "x": p.x, "x_aliases": list(p.x_aliases), "y": p.y,
            "y_aliases": list(p.y_aliases), "split": p.split}


def _row_pair(row: dict) -> PinkElephantPair:
    return PinkElephantPair(domain=row.get("domain", ""), x=row["x"], y=row["y"],
                            x_aliases=tuple(row.get("x_aliases") or ()), y_aliases=tuple(row.get("y_aliases") or ()),
                            split=row.get("split", "train"))


def read_pairs(path: str | Path) -> list[PinkElephantPair]:
    """(X, Y) pairs from a JSONL file (``x`` and ``y`` required; aliases lists optional)."""
    rows = read_jsonl(path, required=("x", "y"))
    for i, r in enumerate(rows, 1):
        for key in ("x_aliases", "y_aliases"):
            if not isinstance(r.get(key, []), list) or not all(isinstance(a, str) for a in r.get(key, [])):
                raise DataError(f"{path}, row {i}: field '{key}' must be a list of strings")
    return [_row_pair(r) for r in rows]


def select_pairs(cfg: PairsConfig, split: str) -> list[PinkElephantPair]:
    """The pairs of one split, shuffled with ``cfg.seed`` and cut to the split's limit."""
    pairs = pink_elephant_pairs(split) if cfg.path == "shipped" else [p for p in read_pairs(cfg.path)
                                                                      if p.split == split]
    if not pairs:
        raise DataError(f"pairs ({cfg.path}): no pairs with split '{split}'")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    limit = cfg.train_limit if split == "train" else cfg.eval_limit
    pairs = [pairs[i] for i in order]
    return pairs[:limit] if limit > 0 else pairs


# ---------------------------------------------------------------------------------------------
# step b: dialogues

# Two worked examples (entities outside the shipped list) show a small model the task's format.
_QUESTION_SHOTS = [
    ("Toyota Corolla", "cars", "I'm about to buy my first car and keep hearing about the Toyota Corolla. "
                               "Is it a good choice for a long daily commute?"),
    ("Lisbon", "cities", "My partner and I have a week off in May. What should we not miss if we spend it in Lisbon?"),
]


def _question_request(x: str, domain: str) -> str:
    topic = f"{x} ({domain})" if domain else x
    return f"Write a question that a user might ask an assistant, about {topic}. Write only the question."


def question_conversation(pair: PinkElephantPair) -> list[dict]:
    """Few-shot chat asking the LM for a user question about X."""
    messages = []
    for x, domain, question in _QUESTION_SHOTS:
        messages += [{"role": "user", "content": _question_request(x, domain)},
                     {"role": "assistant", "content": question}]
    return messages + [{"role": "user", "content": _question_request(pair.x, pair.domain)}]


def clean_question(text: str) -> str:
    """The question inside an LM's answer: the first non-empty line, quotes and a leading
    'Question:' label removed; a quoted span wins when there is one."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    quoted = re.search(r"[\"\u201c]([^\"\u201d]{8,})[\"\u201d]", line)
    if quoted:
        line = quoted.group(1).strip()
    line = re.sub(r"^(question|q|user)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'\u201c\u201d").strip()


def _gen(cfg, tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=tokens, temperature=cfg.temperature, top_p=cfg.top_p)


def _chat_attempts(lm, conversations: list[list[dict]], config: GenerationConfig, attempts: int, accept,
                   negative: list[list[dict]] | None = None) -> list[tuple[str | None, int, str]]:
    """Sample up to ``attempts`` replies per conversation, only re-asking the ones not yet accepted.
    Returns, per conversation, (accepted reply or None, attempts used, last reply)."""
    result: list[tuple[str | None, int, str]] = [(None, 0, "")] * len(conversations)
    todo = list(range(len(conversations)))
    for attempt in range(1, attempts + 1):
        if not todo:
            break
        replies = lm.chat([conversations[i] for i in todo], config,
                          negative=[negative[i] for i in todo] if negative is not None else None)
        still = []
        for i, reply in zip(todo, replies):
            if accept(i, reply):
                result[i] = (reply, attempt, reply)
            else:
                result[i] = (None, attempt, reply)
                still.append(i)
        todo = still
    return result


def write_dialogues(lm, answerer, pairs: Sequence[PinkElephantPair], cfg: DialogueConfig, *,
                    require_violation: bool) -> tuple[list[dict], dict]:
    """Step b. ``lm`` writes a question about X for each pair; ``answerer`` (the model to train,
    a chat backend) answers it under the principle. With ``require_violation`` (the training
    split), only answers that mention X are kept: they are what DPF corrects.

    Returns (rows, stats); rows hold the pair, ``system`` (the principle), ``user`` (the
    question) and, when answered, ``original`` (the answer)."""
    questions = _chat_attempts(lm, [question_conversation(p) for p in pairs],
                               GenerationConfig(max_new_tokens=cfg.question_tokens, temperature=cfg.temperature,
                                                top_p=cfg.top_p, stop_strings=["\n"]),
                               cfg.attempts, lambda i, r: mentions(clean_question(r), pairs[i].x_names)
                               and len(clean_question(r)) >= 8)
    stats = {"pairs": len(pairs), "dropped_no_question": 0, "dropped_no_violation": 0}
    rows = []
    for p, (q, _, _) in zip(pairs, questions):
        if q is None:
            stats["dropped_no_question"] += 1
            continue
        rows.append({**_pair_row(p), "system": principle(p, cfg.principle), "user": clean_question(q)})
    if require_violation and rows:
        names = [_row_pair(r).x_names for r in rows]
        convs = [[{"role": "system", "content": r["system"]}, {"role": "user", "content": r["user"]}] for r in rows]
        answers = _chat_attempts(answerer, convs, _gen(cfg, cfg.answer_tokens), cfg.attempts,
                                 lambda i, r: mentions(r, names[i]))
        kept = []
        for r, (a, n, _) in zip(rows, answers):
            if a is None:
                stats["dropped_no_violation"] += 1
            else:
                kept.append({**r, "original": a, "answer_attempts": n})
        rows = kept
    stats["dialogues"] = len(rows)
    return rows, stats


# ---------------------------------------------------------------------------------------------
# step c: critique and revision


def critique_conversation(row: dict) -> list[dict]:
    rule = f"do not mention {row['x']}; discuss {row['y']} instead"
    return [{"role": "user", "content": f"Principle: {rule}.\n\nQuestion: {row['user']}\n\nReply: {row['original']}\n\n"
                                        "Where does this reply break the principle? Answer in one sentence."}]


def revision_conversation(row: dict, critique: str, *, about: str, avoid: str) -> list[dict]:
    return critique_conversation(row) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": f"Now write a new reply to the question \"{row['user']}\" that is about {about} "
                                    f"instead, and never names {avoid}. Write only the reply."}]


def critique_and_revise(lm, dialogues: Sequence[dict], cfg: RevisionConfig) -> tuple[list[dict], dict]:
    """Step c. For each dialogue the LM critiques the original answer against the principle,
    then revises it (``cfg.attempts`` samples; CFG against the same request with X and Y
    swapped when ``cfg.guidance_scale != 1``). A revision is kept when it does not mention X
    (and, with ``require_y``, mentions Y). Returns (rows with critique, revision, kept and
    drop_reason; stats)."""
    pairs = [_row_pair(d) for d in dialogues]
    critiques = lm.chat([critique_conversation(d) for d in dialogues],
                        GenerationConfig(max_new_tokens=cfg.critique_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p))
    convs = [revision_conversation(d, c, about=d["y"], avoid=d["x"]) for d, c in zip(dialogues, critiques)]
    negative = ([revision_conversation(d, c, about=d["x"], avoid=d["y"]) for d, c in zip(dialogues, critiques)]
                if cfg.guidance_scale != 1.0 else None)

    def accept(i: int, text: str) -> bool:
        return (bool(text.strip()) and not mentions(text, pairs[i].x_names)
                and (not cfg.require_y or mentions(text, pairs[i].y_names)))

    config = GenerationConfig(max_new_tokens=cfg.revision_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              guidance_scale=cfg.guidance_scale)
    revisions = _chat_attempts(lm, convs, config, cfg.attempts, accept, negative=negative)
    stats = {"dialogues": len(dialogues), "kept": 0, "dropped_mentions_x": 0, "dropped_no_y": 0, "dropped_empty": 0}
    rows = []
    for d, p, critique, (rev, n, last) in zip(dialogues, pairs, critiques, revisions):
        reason = None
        if rev is None:
            if not last.strip():
                reason = "empty"
            elif mentions(last, p.x_names):
                reason = "mentions_x"
            else:
                reason = "no_y"
            stats[f"dropped_{reason}"] += 1
        else:
            stats["kept"] += 1
        rows.append({**d, "critique": critique, "revision": rev if rev is not None else last,
                     "revision_attempts": n, "kept": rev is not None, "drop_reason": reason})
    return rows, stats


def preference_rows(revisions: Sequence[dict]) -> list[dict]:
    """DPO rows from kept revisions: rejected = the original answer, chosen = the revision, both
    under the principle's system prompt."""
    return [{"system": r["system"], "prompt": r["user"], "chosen": r["revision"], "rejected": r["original"],
             "x": r["x"], "y": r["y"]} for r in revisions if r.get("kept")]


# ---------------------------------------------------------------------------------------------
# step e: evaluation


@torch.no_grad()
def response_nll(model, tokenizer, conversations: Sequence[list[dict]], responses: Sequence[str],
                 batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood of each response's tokens (and the token count) under
    ``model``, each response conditioned on its chat-formatted conversation. Empty responses add
    nothing."""
    total, count = 0.0, 0
    items = []
    for conv, resp in zip(conversations, responses):
        prompt = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"]
        if r_ids:
            items.append((p_ids, r_ids))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            target = torch.zeros((len(chunk), width), dtype=torch.bool)  # (B, T) True on response tokens
            for i, (p, r) in enumerate(chunk):
                ids[i, :len(p) + len(r)] = torch.tensor(p + r)
                attn[i, :len(p) + len(r)] = 1
                target[i, len(p):len(p) + len(r)] = True
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits  # (B, T, V)
            tok_logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(device))  # (B, T-1): t predicts t+1
            mask = target[:, 1:].to(device)
            total += float(-(tok_logp * mask).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total, count


def judge_mentions(lm, responses: Sequence[str], pairs: Sequence[PinkElephantPair]) -> list[bool | None]:
    """An LM's yes/no on "does this text mention X?" (greedy, a few tokens); None when it answers
    neither yes nor no."""
    convs = [[{"role": "user", "content": f"Does the following text mention {p.x}"
               + (f" (also called {', '.join(p.x_aliases)})" if p.x_aliases else "")
               + f"? Answer yes or no.\n\nText: {r}"}] for r, p in zip(responses, pairs)]
    answers = lm.chat(convs, GenerationConfig(max_new_tokens=3, do_sample=False))
    out: list[bool | None] = []
    for a in answers:
        word = a.strip().lower()
        out.append(True if word.startswith("yes") else False if word.startswith("no") else None)
    return out


SYSTEMS = ("base", "base + principle", "base + principle + CFG", "DPF + principle")


def evaluate(base: LocalChat, dpf: LocalChat | None, dialogues: Sequence[dict], cfg: EvalConfig,
             judge=None) -> tuple[list[dict], list[dict]]:
    """Step e. Sample each system on the held-out dialogues (``cfg.samples`` each) and score them.

    Returns (responses, table): one response row per (system, dialogue, sample) with its
    mention flags, and one table row per system: X-mention rate and its standard error,
    Y-mention rate, perplexity of the responses under the base model (each conditioned on the
    plain question, no system prompt), mean length, and the judge's X rate when asked."""
    pairs = [_row_pair(d) for d in dialogues]
    plain = [[{"role": "user", "content": d["user"]}] for d in dialogues]
    ruled = [[{"role": "system", "content": d["system"]}, {"role": "user", "content": d["user"]}] for d in dialogues]
    negative = [[{"role": "system", "content": cfg.negative_principle.format(x=d["x"], y=d["y"])},
                 {"role": "user", "content": d["user"]}] for d in dialogues]
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    cfg_gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                               guidance_scale=cfg.guidance_scale)
    plans = {"base": (base, plain, gen, None), "base + principle": (base, ruled, gen, None),
             "base + principle + CFG": (base, ruled, cfg_gen, negative)}
    if dpf is not None:
        plans["DPF + principle"] = (dpf, ruled, gen, None)
    responses, table = [], []
    for name, (backend, convs, config, neg) in plans.items():
        t0 = time.perf_counter()
        backend.generator.manual_seed(cfg.seed)
        texts = backend.chat(convs * cfg.samples, config, negative=neg * cfg.samples if neg else None)
        seconds = time.perf_counter() - t0
        rows_pairs = pairs * cfg.samples
        x_hits = [mentions(t, p.x_names) for t, p in zip(texts, rows_pairs)]
        y_hits = [mentions(t, p.y_names) for t, p in zip(texts, rows_pairs)]
        nll, n_tok = response_nll(base.model, base.tokenizer, plain * cfg.samples, texts)
        judged = judge_mentions(judge, texts, rows_pairs) if judge is not None else [None] * len(texts)
        for k, (t, p, xh, yh, j) in enumerate(zip(texts, rows_pairs, x_hits, y_hits, judged)):
            responses.append({"system": name, "dialogue": k % len(dialogues), "sample": k // len(dialogues),
                              "x": p.x, "y": p.y, "user": dialogues[k % len(dialogues)]["user"], "response": t,
                              "mentions_x": xh, "mentions_y": yh, "judge_mentions_x": j})
        n = len(texts)
        rate = sum(x_hits) / n
        row = {"system": name, "n": n, "x_rate": rate, "x_rate_se": math.sqrt(rate * (1 - rate) / n),
               "y_rate": sum(y_hits) / n, "perplexity": math.exp(nll / n_tok) if n_tok else math.nan,
               "mean_tokens": n_tok / n, "seconds": seconds}
        if judge is not None:
            answered = [j for j in judged if j is not None]
            row["judge_x_rate"] = sum(answered) / len(answered) if answered else math.nan
        table.append(row)
    return responses, table


def format_table(table: Sequence[dict]) -> str:
    """The evaluation in the shape of the DPF paper's Table 1 (one row per system)."""
    judge = any("judge_x_rate" in r for r in table)
    head = f"{'system':26s} {'X mention rate ↓':>18s} {'Y mention rate ↑':>17s} {'perplexity ↓':>13s} {'n':>5s}"
    head += f" {'judge X rate':>13s}" if judge else ""
    lines = [head, "-" * len(head)]
    for r in table:
        line = (f"{r['system']:26s} {r['x_rate']:>11.3f} ± {r['x_rate_se']:.3f} {r['y_rate']:>17.3f} "
                f"{r['perplexity']:>13.2f} {r['n']:>5d}")
        if judge:
            line += f" {r.get('judge_x_rate', math.nan):>13.3f}"
        lines.append(line)
    return "\n".join(lines)


def write_table_csv(table: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    keys = list(dict.fromkeys(k for r in table for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in table:
            w.writerow(r)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# the whole pipeline


def _lm(cfg: Config, base: LocalChat) -> Any:
    """The writing LM: the already-loaded base model when lm.spec names it, else a new backend."""
    import os

    if cfg.lm.spec == cfg.model.spec:
        return base
    return chat_backend(cfg.lm.spec, model=cfg.lm.served_model, api_key=os.environ.get(cfg.lm.api_key_env),
                        batch_size=cfg.lm.batch_size, seed=cfg.lm.seed)


def _step(path: Path, resume: bool, compute, log) -> list[dict]:
    """Read ``path`` when resuming and it exists, else compute the rows and write them."""
    if resume and path.exists():
        rows = read_jsonl(path)
        log(f"{path.name}: {len(rows)} rows (reused)")
        return rows
    rows = compute()
    write_jsonl(path, rows)
    log(f"{path.name}: {len(rows)} rows")
    return rows


def _dpo_config(cfg: Config, run_dir: Path, n_prefs: int):
    """Step d's DPO config: this pipeline's model, trainer, dpo and lora sections on preferences.jsonl."""
    from ankus.trainers import dpo as dpo_trainer

    trainer = cfg.trainer
    if trainer.total_steps <= 0:
        trainer = replace(trainer, total_steps=max(1, math.ceil(cfg.train.epochs * n_prefs / trainer.batch_size)))
    return dpo_trainer.Config(model=cfg.model, trainer=trainer, method=cfg.dpo, lora=cfg.lora,
                              data=PreferenceData(path=str(run_dir / "preferences.jsonl"), chat_template=True),
                              run=RunConfig(out_dir=str(run_dir), name="dpo", progress=cfg.run.progress,
                                            save_model=cfg.run.save_model))


def check_config(cfg: Config) -> None:
    """Reject settings the pipeline would ignore (a :class:`ConfigError` names the field); the
    DPO sections are checked by the DPO trainer's own check, before any generation runs."""
    from ankus.trainers import dpo as dpo_trainer

    reject_unused(cfg.trainer, ["fsdp"], "dpf", "(the pipeline runs in one process)", "trainer")
    reject_unused(cfg.trainer, ["device"], "dpf", "(every model of the pipeline loads on the CPU)", "trainer")
    if not cfg.lm.spec.startswith(("http://", "https://")):
        reject_unused(cfg.lm, ["served_model", "api_key_env"], "dpf", "unless lm.spec is an http(s) URL", "lm")
    if cfg.trainer.total_steps > 0:
        reject_unused(cfg.train, ["epochs"], "dpf", "when trainer.total_steps is set (> 0)", "train")
    dpo_trainer.check_config(_dpo_config(cfg, Path(cfg.run.out_dir), 1))


def train(cfg: Config, resume: bool = False, log=print) -> dict[str, Any]:
    """Run the DPF pipeline end to end into ``cfg.run``'s directory; returns the summary."""
    from ankus.models.loading import load_model
    from ankus.runs import create_run_dir
    from ankus.trainers import dpo as dpo_trainer

    check_config(cfg)
    run_dir = create_run_dir(cfg.run, "dpf", cfg, exist_ok=resume)
    t_start = time.perf_counter()
    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed)
    base = LocalChat(model=model, tokenizer=tok, batch_size=cfg.lm.batch_size, seed=cfg.lm.seed)
    base.name = cfg.model.spec
    lm = _lm(cfg, base)
    stats: dict[str, Any] = {"lm": getattr(lm, "name", cfg.lm.spec), "model": cfg.model.spec}
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        return out

    train_pairs = _step(run_dir / "pairs_train.jsonl", resume, lambda: [_pair_row(p) for p in
                                                                        select_pairs(cfg.pairs, "train")], log)
    eval_pairs = _step(run_dir / "pairs_eval.jsonl", resume, lambda: [_pair_row(p) for p in
                                                                      select_pairs(cfg.pairs, "eval")], log)

    def dialogues(split: str, rows: list[dict]) -> list[dict]:
        out, st = write_dialogues(lm, base, [_row_pair(r) for r in rows], cfg.dialogues,
                                  require_violation=split == "train")
        stats[f"dialogues_{split}"] = st
        log(f"dialogues ({split}): {st}")
        return out

    d_train = timed("dialogues_train", lambda: _step(run_dir / "dialogues_train.jsonl", resume,
                                                     lambda: dialogues("train", train_pairs), log))
    d_eval = timed("dialogues_eval", lambda: _step(run_dir / "dialogues_eval.jsonl", resume,
                                                   lambda: dialogues("eval", eval_pairs), log))

    def revise() -> list[dict]:
        out, st = critique_and_revise(lm, d_train, cfg.revision)
        stats["revision"] = st
        log(f"revision: {st}")
        return out

    revisions = timed("revise", lambda: _step(run_dir / "revisions.jsonl", resume, revise, log))
    prefs = _step(run_dir / "preferences.jsonl", resume, lambda: preference_rows(revisions), log)

    dpf_chat = None
    if not cfg.train.skip:
        if not prefs:
            raise DataError(f"{run_dir / 'preferences.jsonl'}: no preference pairs survived revision "
                            f"({stats.get('revision')}); use more pairs, more revision.attempts, "
                            "or a stronger lm.spec")
        dpo_cfg = _dpo_config(cfg, run_dir, len(prefs))
        policy, ptok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed)
        summary = timed("dpo", lambda: dpo_trainer.train(dpo_cfg, resume=resume, model=policy, tokenizer=ptok))
        stats["dpo"] = {k: summary[k] for k in ("steps", "pairs", "loss_first", "loss_last", "accuracy_last")}
        dpf_chat = LocalChat(model=policy, tokenizer=ptok, batch_size=cfg.lm.batch_size, seed=cfg.lm.seed)

    judge = lm if cfg.evaluation.judge else None
    responses, table = timed("evaluate", lambda: evaluate(base, dpf_chat, d_eval, cfg.evaluation, judge=judge))
    write_jsonl(run_dir / "eval_responses.jsonl", responses)
    write_table_csv(table, run_dir / "table.csv")
    text = format_table(table)
    log("\n" + text)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    summary = {"run_dir": str(run_dir), "table": table, "stats": stats, "seconds": timings}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------
# `ankus dpf ...`: one command per step; options come from a recipe plus dotted overrides


def _config(args) -> Config:
    from ankus.recipes import resolve_recipe
    from ankus.config import build, read_yaml

    data = read_yaml(resolve_recipe(args.recipe)) if args.recipe else {}
    data.pop("algorithm", None)
    return build(Config, data, args.overrides)


def _backends(cfg: Config, need_lm: bool = True):
    from ankus.models.loading import load_model

    model, tok = load_model(cfg.model.spec, dtype=cfg.model.dtype, seed=cfg.model.seed)
    base = LocalChat(model=model, tokenizer=tok, batch_size=cfg.lm.batch_size, seed=cfg.lm.seed)
    return base, (_lm(cfg, base) if need_lm else None)


def cli(args) -> int:
    """Dispatch ``ankus dpf STEP``."""
    if args.step == "run":
        from ankus.recipes import run_recipe

        run_recipe(args.recipe or "dpf_smollm2", overrides=list(args.overrides), resume=args.resume)
        return 0
    cfg = _config(args)
    if args.step == "pairs":
        rows = [_pair_row(p) for p in select_pairs(replace(cfg.pairs, train_limit=args.limit, eval_limit=args.limit),
                                                   args.split)]
        write_jsonl(args.out, rows)
        print(f"{args.out}: {len(rows)} {args.split} pairs")
    elif args.step == "dialogues":
        base, lm = _backends(cfg)
        rows, stats = write_dialogues(lm, base, read_pairs(args.pairs), cfg.dialogues,
                                      require_violation=args.split == "train")
        write_jsonl(args.out, rows)
        print(f"{args.out}: {len(rows)} dialogues {stats}")
    elif args.step == "revise":
        _, lm = _backends(cfg)
        dialogues = read_jsonl(args.dialogues, required=("x", "y", "system", "user", "original"))
        rows, stats = critique_and_revise(lm, dialogues, cfg.revision)
        write_jsonl(args.out, rows)
        prefs = preference_rows(rows)
        write_jsonl(args.preferences, prefs)
        print(f"{args.out}: {len(rows)} revisions {stats}\n{args.preferences}: {len(prefs)} DPO pairs "
              f"(train with: ankus train dpo_smollm2 data.path={args.preferences})")
    elif args.step == "eval":
        base, _ = _backends(cfg, need_lm=False)
        dpf = None
        if args.model:
            from ankus.models.loading import load_model

            m, t = load_model(args.model, dtype=cfg.model.dtype)
            dpf = LocalChat(model=m, tokenizer=t, batch_size=cfg.lm.batch_size, seed=cfg.lm.seed)
        judge = _lm(cfg, base) if cfg.evaluation.judge else None
        dialogues = read_jsonl(args.dialogues, required=("x", "y", "system", "user"))
        responses, table = evaluate(base, dpf, dialogues, cfg.evaluation, judge=judge)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "eval_responses.jsonl", responses)
        write_table_csv(table, out / "table.csv")
        print(format_table(table))
        print(f"\n{out / 'table.csv'}, {out / 'eval_responses.jsonl'}")
    return 0
