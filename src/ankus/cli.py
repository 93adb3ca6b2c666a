"""The ``ankus`` command line: ``models``, ``recipes``, ``generate``, ``train``, ``data``, ``eval``, ``serve``, ``dpf``, ``demo``.

Recipes and trainers (``TRAINERS``, ``resolve_recipe``, ``run_recipe``) live in
:mod:`ankus.recipes`; trainer modules import lazily, so ``ankus --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ankus.config import ConfigError, read_yaml
from ankus.recipes import TRAINERS, resolve_recipe, run_recipe, trainer_module  # noqa: F401 (re-exported)

# ---------------------------------------------------------------------------------------------
# commands


def cmd_models(args) -> int:
    from ankus.models.loading import DEFAULT_MODEL, KNOWN_MODELS

    for name, known in KNOWN_MODELS.items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:24s}{known.description}{mark}")
    print("\nAlso accepted: a local Hugging Face model directory, or a path to a .gguf file.")
    return 0


def cmd_generate(args) -> int:
    import torch

    from ankus.generation.engine import GenerationConfig, generate
    from ankus.models.loading import load_model

    prompts = list(args.prompts)
    if args.file:
        lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        print("error: give one or more prompts, or --file with one prompt per line", file=sys.stderr)
        return 2
    model, tok = load_model(args.model)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_strings=list(args.stop or []),
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        chat_template=False if args.no_chat else None,
    )
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, tok, prompts, config, generator=gen, batch_size=args.batch_size)
    for prompt, text in zip(prompts, out.texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text.strip())
        if len(prompts) > 1:
            print()
    return 0


def cmd_recipes(args) -> int:
    from ankus.recipes import RECIPES_DIR, shipped_recipes

    for name in shipped_recipes():
        print(f"{name:20s}algorithm: {read_yaml(RECIPES_DIR / f'{name}.yaml').get('algorithm', '?')}")
    print(f"\nShipped in {RECIPES_DIR}. Run one by name (ankus train NAME) or copy it and pass its path.")
    return 0


def cmd_train(args) -> int:
    run_recipe(args.recipe, overrides=args.overrides, resume=args.resume)
    return 0


def cmd_make_sentiment_dataset(args) -> int:
    from ankus.data.sentiment_dataset import cmd_make_sentiment_dataset as run

    return run(args)


def cmd_data_corpus(args) -> int:
    from ankus.data.corpus import build_corpus

    m = build_corpus(args.source, args.out, shard_tokens=args.shard_tokens)
    skipped = ", ".join(f"{v['count']} {k}" for k, v in m["skipped"].items())
    print(f"{args.out}: {m['documents']} documents, {m['tokens']} tokens in {len(m['shards'])} shard(s) "
          f"({m['tokenizer']['name']}); skipped {skipped}")
    return 0


def cmd_data_reverse(args) -> int:
    from ankus.data.reverse import reverse_corpus

    m = reverse_corpus(args.source, args.out, shard_tokens=args.shard_tokens)
    print(f"{args.out}: {m['documents']} reversed documents, {m['tokens']} tokens in {len(m['shards'])} shard(s) "
          f"({m['tokenizer']['name']}; from {m['source']})")
    return 0


def _eval_tokens(args, tok, needed: int) -> list[int]:
    """At least ``needed`` tokens of text for perplexity: an ``ankus data corpus`` directory (its
    held-out documents with --heldout), or stdlib / shakespeare / a directory of .txt files read
    in file order, each document followed by EOS."""
    from ankus.data.corpus import MANIFEST, corpus_files, load_corpus, read_documents
    from ankus.data.io import DataError
    from ankus.trainers.pretrain import check_tokenizer, split_documents

    source = Path(args.corpus)
    if (source / MANIFEST).is_file():
        corpus = load_corpus(source)
        check_tokenizer(corpus, tok, args.model)
        ix = split_documents(len(corpus.documents), args.heldout, args.seed)[1] if args.heldout else \
            range(len(corpus.documents))
        docs = [corpus.documents[i].tolist() for i in ix]
        where = f"corpus {source}" + (f" (held-out documents at fraction {args.heldout}, seed {args.seed})"
                                      if args.heldout else "")
    else:
        if args.heldout:
            raise ConfigError("--heldout needs a corpus directory written by `ankus data corpus`")
        what, root, files = corpus_files(args.corpus)
        docs, n = [], 0
        for _, text in read_documents(root, files)[0]:
            if n >= needed:
                break
            docs.append(tok.encode(text, add_special_tokens=False) + [tok.eos_token_id])
            n += len(docs[-1])
        where = what
    tokens = [t for d in docs for t in d]
    if len(tokens) < needed:
        raise DataError(f"{where} holds {len(tokens)} tokens, fewer than the {needed} needed "
                        f"({args.windows} windows of the longest length); lower --windows or --lengths")
    return tokens


def cmd_eval(args) -> int:
    import time

    from ankus.evals import long_context as lc
    from ankus.models.loading import load_model

    if not getattr(args, "eval_command", None):
        args.eval_parser.print_help()
        return 0
    from ankus.evals.tasks import TASKS, run

    if args.eval_command in TASKS:
        return run(args)
    try:
        lengths, scalings = lc.parse_lengths(args.lengths), lc.parse_scalings(args.scalings)
        if args.trials < 1 or args.windows < 1:
            raise ValueError("--trials and --windows must be >= 1")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model, tok = load_model(args.model)
    model.eval()
    original = args.original_max or int(model.config.get_text_config().max_position_embeddings)
    try:
        factor = lc.check_scaling_args(scalings, lengths, args.factor, original)
        if args.eval_command == "passkey":
            lc.passkey_ids(tok, min(lengths), 0.5, "12345")  # too short a length fails here, before any run
    except ValueError as e:
        raise ConfigError(str(e)) from None
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.eval_command == "passkey":
        evaluate = lambda m: lc.passkey(m, tok, lengths, trials=args.trials, seed=args.seed, progress=say)  # noqa: E731
        y, ylabel = "pass_rate", "passkey pass rate"
    else:
        tokens = _eval_tokens(args, tok, max(lengths) * args.windows)
        evaluate = lambda m: lc.perplexity_by_length(m, tokens, lengths, windows=args.windows)  # noqa: E731
        y, ylabel = "ppl", "perplexity"
    t0 = time.perf_counter()
    rows = lc.compare_scalings(model, scalings, factor, original, evaluate)
    for r in rows:
        r.update(factor=factor if r["method"] != "none" else 1.0, original_max=original)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lc.write_table(rows, out / "table.csv")
    lc.plot_by_length(rows, y, out / f"{args.eval_command}.png", f"{args.model}: {ylabel} (original {original}, "
                      f"factor {factor:g})", ylabel)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(f"{out / 'table.csv'}, {out / (args.eval_command + '.png')} ({wall:.0f} s)")
    return 0


def _named_files(items: list[str]) -> dict[str, str]:
    """["NAME=FILE", ...] -> {NAME: FILE}."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--direction takes NAME=FILE (e.g. positive=runs/x/directions/mean_diff_L6.safetensors), "
                              f"got '{item}'")
        out[name] = path
    return out


def cmd_serve(args) -> int:
    import os

    from ankus.serve import ServeError, serve

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        serve(args.model, args.host, args.port, served_name=args.served_name, device=device,
              api_key=args.api_key or os.environ.get("ANKUS_API_KEY") or None,
              batch_size=args.batch_size, seed=args.seed, quiet=args.quiet,
              direction_files=_named_files(args.direction or []))
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_dpf(args) -> int:
    from ankus.pipelines.dpf import cli

    if not getattr(args, "step", None):
        args.dpf_parser.print_help()
        return 0
    return cli(args)


def cmd_qd(args) -> int:
    from ankus.pipelines.qdaif import cli

    return cli(args)


def cmd_demo(args) -> int:
    """The README's main job: PPO on SmolLM2 for positive movie reviews. It runs again as it is:
    when ``runs/ppo_sentiment`` holds an earlier run (and no ``run.name``/``run.out_dir`` is
    given), the new run goes to ``runs/ppo_sentiment-<date>-<time>``."""
    import time

    overrides = list(args.overrides)
    recipe = read_yaml(resolve_recipe("ppo_sentiment"))
    run = recipe.get("run", {})
    default_dir = Path(run.get("out_dir", "runs")) / run.get("name", "ppo_sentiment")
    if (not any(o.split("=", 1)[0] in ("run.name", "run.out_dir") for o in overrides)
            and default_dir.is_dir() and any(default_dir.iterdir())):
        name = f"{default_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"{default_dir} holds an earlier run: this one goes to {default_dir.parent / name}")
        overrides.append(f"run.name={name}")
    run_recipe(recipe, overrides=overrides)
    return 0


# ---------------------------------------------------------------------------------------------
# the parser: one function per command


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the known model specs")
    p.set_defaults(func=cmd_models)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample from a model (chat template applied for chat models)",
                       description="Sample continuations of one or more prompts.")
    p.add_argument("prompts", nargs="*", help="prompt text(s)")
    p.add_argument("--file", help="a text file with one prompt per line")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance gamma; 1 = off")
    p.add_argument("--negative-prompt", help="the unconditional branch of CFG (default: the last prompt token)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_generate)


def _add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes (ankus train NAME runs one)")
    p.set_defaults(func=cmd_recipes)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="run a recipe: ankus train RECIPE [key.path=value ...]",
                       description="Run the trainer a recipe names. Overrides are dotted keys, e.g. trainer.lr=1e-5.")
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5 run.name=try1")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory")
    p.set_defaults(func=cmd_train)


def _add_make_sentiment_dataset(sub) -> None:
    p = sub.add_parser("make-sentiment-dataset", help="ILQL's offline set: sample a model on review openings, "
                       "score with VADER")
    p.add_argument("--out", required=True, help="JSONL to write, e.g. runs/datasets/sentiment_offline.jsonl")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=0, help="first N openings only; 0 = all")
    p.set_defaults(func=cmd_make_sentiment_dataset)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="data tools: corpus (tokenized shards), reverse (token-reversed corpus), "
                       "math-extract / math-train (math text from HTML)")
    data_sub = p.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    q = data_sub.add_parser("corpus", help="tokenize a pretraining corpus (stdlib, shakespeare, or a directory "
                            "of .txt files) into shards")
    q.add_argument("source", help="stdlib, shakespeare, or a directory of .txt files")
    q.add_argument("--out", required=True, help="corpus directory to write (replaced whole)")
    q.add_argument("--shard-tokens", type=int, default=1 << 22, help="tokens per shard (documents are not split)")
    q.set_defaults(func=cmd_data_corpus)
    from ankus.data.mathtext.cli import add_parsers as add_mathtext

    add_mathtext(data_sub)
    q = data_sub.add_parser("reverse", help="token-reversed copy of a corpus (each document's tokens backwards), "
                            "to pretrain a reverse LM")
    q.add_argument("source", help="an `ankus data corpus` directory, or stdlib, shakespeare, a directory of .txt "
                   "files (tokenized first into OUT.forward)")
    q.add_argument("--out", required=True, help="corpus directory to write (replaced whole)")
    q.add_argument("--shard-tokens", type=int, default=1 << 22, help="tokens per shard (documents are not split)")
    q.set_defaults(func=cmd_data_reverse)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluations: passkey, perplexity-by-length (RoPE scalings); implicature, "
                       "goal-reach, pink-elephants, adherence, harness")
    p.set_defaults(func=cmd_eval, eval_parser=p)
    evals = p.add_subparsers(dest="eval_command", metavar="EVAL")
    for name, help in (("passkey", "passkey retrieval: a 5-digit key hidden in filler text, by context length"),
                       ("perplexity-by-length", "perplexity of real text in windows of each context length")):
        q = evals.add_parser(name, help=help, description=help + "; one row per (RoPE scaling, length) in "
                             "OUT/table.csv and a plot beside it.")
        q.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
        q.add_argument("--lengths", required=True, help="comma-separated context lengths in tokens, e.g. 1024,2048")
        q.add_argument("--scalings", default="none,linear,dynamic-ntk,yarn,dynamic-yarn",
                       help="comma-separated RoPE scalings to compare")
        q.add_argument("--factor", type=float, help="scaling factor s (default: longest length / original max)")
        q.add_argument("--original-max", type=int, default=0,
                       help="the context the model was trained at (default: its config's max_position_embeddings)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", required=True, help="directory for table.csv and the PNG")
        if name == "passkey":
            q.add_argument("--trials", type=int, default=20, help="trials per length (depths spread evenly)")
            q.set_defaults(windows=1)
        else:
            q.add_argument("--corpus", default="stdlib", help="text: an `ankus data corpus` directory, stdlib, "
                           "shakespeare, or a directory of .txt files (default: the Python standard library)")
            q.add_argument("--windows", type=int, default=4, help="disjoint windows per length")
            q.add_argument("--heldout", type=float, default=0.0, help="with a corpus directory: only the documents "
                           "pretrain holds out at this data.val_fraction (split seeded by --seed, as trainer.seed)")
            q.set_defaults(trials=1)
    from ankus.evals.tasks import add_parsers

    add_parsers(evals)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a model (/v1/chat/completions...)",
                       description="Serve a model over HTTP with OpenAI's API: GET /v1/models, "
                                   "POST /v1/chat/completions, POST /v1/completions (no streaming). "
                                   "Extensions: top_k, guidance_scale, negative_prompt, negative_messages, "
                                   "steering ({\"direction\": NAME, \"alpha\": A} with --direction NAME=FILE).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--served-name", help="the model id clients see in /v1/models (default: the spec)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request "
                   "(default: $ANKUS_API_KEY if set)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1...; auto = cuda when available")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward within one request")
    p.add_argument("--seed", type=int, help="seed for requests without one (default: random)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.add_argument("--direction", action="append", metavar="NAME=FILE",
                   help="a steering direction requests may name: \"steering\": {\"direction\": NAME, \"alpha\": A}")
    p.set_defaults(func=cmd_serve)


def _add_dpf(sub) -> None:
    p = sub.add_parser("dpf", help="Direct Principle Feedback (Pink Elephants): dialogues, critique/revision, "
                       "DPO, evaluation", description="Direct Principle Feedback, one step per command; each "
                       "step reads and writes JSONL. Options come from a recipe (default dpf_smollm2) and dotted "
                       "overrides, e.g. lm.spec=http://127.0.0.1:8000/v1 revision.attempts=6.")
    p.set_defaults(func=cmd_dpf, dpf_parser=p)
    steps = p.add_subparsers(dest="step", metavar="STEP")

    def step(name: str, help: str):
        q = steps.add_parser(name, help=help, description=help)
        q.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. lm.spec=...")
        q.add_argument("--recipe", default="dpf_smollm2", help="recipe whose sections set the options")
        return q

    q = step("run", "the whole pipeline into one run directory (= ankus train dpf_smollm2)")
    q.add_argument("--resume", action="store_true", help="reuse the step outputs already in the run directory")
    q = step("pairs", "write (X, Y) pairs of one split as JSONL")
    q.add_argument("--split", choices=["train", "eval"], default="train")
    q.add_argument("--limit", type=int, default=0, help="first N after a seeded shuffle; 0 = all")
    q.add_argument("--out", required=True)
    q = step("dialogues", "an LM writes a question leading to X; the model answers under the principle")
    q.add_argument("--pairs", required=True, help="JSONL from `ankus dpf pairs`")
    q.add_argument("--split", choices=["train", "eval"], default="train",
                   help="train: answer, keep answers that mention X; eval: questions only")
    q.add_argument("--out", required=True)
    q = step("revise", "critique and revise each answer; write revisions and DPO pairs")
    q.add_argument("--dialogues", required=True, help="JSONL from `ankus dpf dialogues --split train`")
    q.add_argument("--out", required=True, help="every revision, kept or dropped, with the reason")
    q.add_argument("--preferences", required=True, help="DPO rows (system, prompt, chosen, rejected)")
    q = step("eval", "compare base, prompted, CFG and DPF models on held-out dialogues")
    q.add_argument("--dialogues", required=True, help="JSONL from `ankus dpf dialogues --split eval`")
    q.add_argument("--model", help="the DPF-trained model (a run's model/ directory); omit for baselines only")
    q.add_argument("--out", required=True, help="directory for table.csv and eval_responses.jsonl")


def _add_qd(sub) -> None:
    p = sub.add_parser("qd", help="quality-diversity search with AI feedback (QDAIF): ankus qd run RECIPE",
                       description="Quality-Diversity through AI Feedback: MAP-Elites over texts, LMX mutations, "
                       "an LM judge's label log-probs for quality and diversity, against three baselines.")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    q = p.add_subparsers(dest="qd_command", metavar="STEP").add_parser(
        "run", help="run a qdaif recipe (all its methods) into one run directory")
    q.add_argument("recipe", help="a recipe path or shipped name (qdaif_opinions, qdaif_stories)")
    q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.iterations=4 judge.spec=http://...")
    q.add_argument("--resume", action="store_true", help="continue each method from its last checkpointed archive")
    q.set_defaults(func=cmd_qd)


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="audits of what a model learned: ankus audit AUDIT ...",
                       description="Audits; each writes JSONL, CSV tables and PNG plots into its run directory.")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    audits = p.add_subparsers(dest="audit_command", metavar="AUDIT")
    # one _add_audit_<name>(audits) per audit; each adds its parser and sets func
    for add in (_add_audit_elicit, _add_audit_memorization, _add_audit_directions, _add_audit_moments):
        add(audits)


def _add_search(sub) -> None:
    from ankus.search.commands import add_parser

    add_parser(sub)


def cmd_audit_elicit(args) -> int:
    from ankus.audits.elicit import cli

    return cli(args)


def _add_recipe_audit(audits, name: str, help: str, description: str, example: str, func) -> None:
    """An audit whose options are a recipe's sections (default ``audit_<name>``) plus dotted overrides."""
    q = audits.add_parser(name, help=help, description=description)
    q.add_argument("overrides", nargs="*", help=f"dotted overrides of the recipe, e.g. {example}")
    q.add_argument("--recipe", default=f"audit_{name}", help="recipe name or YAML path whose sections set the options")
    q.set_defaults(func=func)


def _add_audit_elicit(audits) -> None:
    help = ("prefixes that make the forward LM say a target suffix: reverse-LM beam search and best-of-N "
            "vs GCG vs random, at equal forward-pass budgets")
    _add_recipe_audit(audits, "elicit", help, help + " (Pfau et al. 2023). Options come from a recipe (default "
                      "audit_elicit) and dotted overrides.", "search.budget=32 targets.n=5", cmd_audit_elicit)


def _add_audit_memorization(audits) -> None:
    q = audits.add_parser("memorization", help="k-extractability: does greedy decoding reproduce the training data?",
                          description="k-extractability (Biderman et al. 2023): for each window of the data, the "
                          "share of the next --continuation tokens that greedy decoding from the --context tokens "
                          "before them reproduces (1.0 = memorized). Writes sequences.jsonl, summary.csv, "
                          "summary.json and histogram.png into --out.")
    q.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
    q.add_argument("--checkpoint", help="a training run's checkpoints/step-N directory: its weights on --model")
    q.add_argument("--data", required=True, help="an `ankus data corpus` directory, a .jsonl file (rows with "
                   "'tokens' or 'text'), a text file, or a directory of .txt/.jsonl files")
    q.add_argument("--context", type=int, default=32, help="tokens given to the model")
    q.add_argument("--continuation", type=int, default=32, help="tokens generated and compared")
    q.add_argument("--stride", type=int, default=64, help="a window starts every STRIDE tokens of a document")
    q.add_argument("--batch-size", type=int, default=64, help="windows generated together")
    q.add_argument("--max-windows", type=int, default=0, help="audit the first N windows only (0 = all)")
    q.add_argument("--threshold", type=float, default=1.0, help="score counted as memorized (1.0 = exact)")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto")
    q.add_argument("--out", required=True, help="run directory for the outputs")
    q.set_defaults(func=cmd_audit_memorization)


def cmd_audit_memorization(args) -> int:
    from ankus.audits import memorization as mem

    cfg = mem.MemorizationConfig(args.context, args.continuation, args.stride, args.batch_size, args.max_windows,
                                 args.threshold)
    mem.check_config(cfg)
    model, tok = mem.load_audited_model(args.model, args.checkpoint, args.device)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    s = mem.run(model, tok, args.data, args.out, cfg, {"model": args.model, "checkpoint": args.checkpoint}, say)
    print(f"{s['memorized']} of {s['windows']} windows memorized (score >= {cfg.threshold}), mean score "
          f"{s['mean_score']}, {s['sequences_per_s']} windows/s; outputs in {args.out}")
    return 0


def cmd_audit_directions(args) -> int:
    from ankus.audits.linear_directions import cmd_audit_directions as run

    return run(args)


def cmd_steer(args) -> int:
    from ankus.audits.linear_directions import cmd_steer as run

    return run(args)


def _add_audit_directions(audits) -> None:
    _add_recipe_audit(audits, "directions", "linear sentiment directions: probe, ablate, patch, steer",
                      "Find a sentiment direction by mean difference, k-means, PCA, logistic regression and DAS; "
                      "probe, mean-ablate and patch it; steer with it. Writes probe/ablation/steering CSVs, "
                      "results.jsonl, directions.png and directions/*.safetensors into the run directory.",
                      "layers=[6] alphas=[-8,0,8]", cmd_audit_directions)


def _add_steer(sub) -> None:
    p = sub.add_parser("steer", help="generate with alpha x a saved direction added to the residual stream",
                       description="Generate with a direction (ankus audit directions writes them) added at "
                                   "its layer: alpha times the unit direction, at every position.")
    p.add_argument("prompts", nargs="+", help="prompt text(s)")
    p.add_argument("--direction", required=True, help="a direction .safetensors file")
    p.add_argument("--alpha", type=float, required=True, help="steering strength (0 = unsteered)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)


def cmd_audit_moments_lm(args) -> int:
    from ankus.audits.moments_lm import cmd_moments_lm

    return cmd_moments_lm(args)


def cmd_audit_moments_image(args) -> int:
    from ankus.audits.moments_image import cmd_moments_image

    return cmd_moments_image(args)


def _add_audit_moments(audits) -> None:
    p = audits.add_parser("moments", help="statistics of increasing order (Belrose et al. 2024): lm | image",
                          description="Do networks learn low-order statistics first? lm: n-gram KL and losses across "
                                      "pretraining snapshots; image: digits classifiers on max-entropy, Gaussian and "
                                      "OT-edited samples across training.")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    kinds = p.add_subparsers(dest="moments_command", metavar="KIND")
    lm = kinds.add_parser("lm", help="KL to unigram/bigram and loss on n-gram samples, per pretraining snapshot")
    lm.add_argument("run_dir", help="a pretrain run directory with snapshots/step-N/ (recipe pretrain_moments)")
    lm.add_argument("--corpus", required=True, help="the `ankus data corpus` directory the run trained on")
    lm.add_argument("--out", required=True, help="directory for table.csv, rows.jsonl and moments_lm.png")
    lm.add_argument("--n-seqs", dest="n_seqs", type=int, default=32, help="sequences of each kind (default 32)")
    lm.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    lm.add_argument("--k", type=float, default=0.1, help="add-k smoothing of the n-grams the KL is taken to")
    lm.add_argument("--sample-k", dest="sample_k", type=float, default=0.0,
                    help="add-k smoothing of the n-grams sampled from (default 0: empirical)")
    lm.add_argument("--seed", type=int, default=0)
    lm.set_defaults(func=cmd_audit_moments_lm)
    im = kinds.add_parser("image", help="digits MLP/CNN checkpoints on max-entropy, Gaussian and OT-edited samples")
    im.add_argument("--out", required=True, help="directory for table.csv, rows.jsonl and moments_image.png")
    im.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    im.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    im.add_argument("--checkpoints", type=int, default=12, help="checkpoints, log-spaced over the steps (default 12)")
    im.add_argument("--samples", type=int, default=200, help="synthetic samples per class (default 200)")
    im.add_argument("--seed", type=int, default=0)
    im.set_defaults(func=cmd_audit_moments_image)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main demo: PPO on SmolLM2 towards positive movie reviews")
    p.add_argument("overrides", nargs="*", help="dotted overrides for ppo_sentiment")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ankus", description="Align, steer and audit language models (PPO, ILQL, SFT, DPO, CFG...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ankus generate \"Write a haiku about elephants.\"\n"
               "  ankus train ppo_sentiment trainer.lr=1e-5\n  ankus models",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_models, _add_recipes, _add_generate, _add_train, _add_make_sentiment_dataset, _add_data, _add_eval,
                _add_serve, _add_dpf, _add_qd, _add_audit, _add_steer, _add_search, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from ankus.data.io import DataError
    from ankus.models.loading import ModelLoadError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
