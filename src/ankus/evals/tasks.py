"""``ankus eval implicature | goal-reach | pink-elephants | adherence | harness``: parsers and runs.

Each run loads one :class:`~ankus.evals.lm.EvalLM` (``--model``, ``--chat-template``), runs the
task and writes ``rows.jsonl``, ``table.csv`` and ``table.md`` into ``--out``. Heavy imports
happen inside the runs, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import sys
import time

__all__ = ["TASKS", "add_parsers", "run"]

TASKS = {
    "implicature": "binary implicatures (question, indirect answer -> yes/no): ranking accuracy by template and k",
    "goal-reach": "object- vs location-goal of a reach in three conditions (purposeful, inanimate, accidental)",
    "pink-elephants": "'do not mention X' mention rate of X and Y over CFG guidance scales",
    "adherence": "instructions with checkable constraints: adherence rate over CFG guidance scales",
    "harness": "an lm-evaluation-harness task on the ankus model (needs the 'evals' extra: lm-eval)",
}


def _common(q) -> None:
    q.add_argument("--model", default="smollm2-135m-instruct", help="model spec (see `ankus models`)")
    q.add_argument("--chat-template", action="store_true", help="wrap contexts in the tokenizer's chat template")
    q.add_argument("--batch-size", type=int, default=16, help="rows per forward")
    q.add_argument("--out", required=True, help="directory for rows.jsonl, table.csv and table.md")


def add_parsers(evals) -> None:
    """Add the task subcommands to ``ankus eval``'s subparsers."""
    for name, help in TASKS.items():
        q = evals.add_parser(name, help=help, description=help + ".")
        _common(q)
        if name in ("implicature", "goal-reach", "adherence"):
            q.add_argument("--data", default=f"{name.replace('-', '_')}.jsonl",
                           help="task file: a shipped name or a JSONL path")
        q.add_argument("--limit", type=int, default=0, help="first N items only; 0 = all")
        if name == "implicature":
            q.add_argument("--templates", default="0,1,2,3,4,5", help="comma-separated template indices")
            q.add_argument("--shots", default="0,1,5", help="comma-separated k for k-shot prompts")
            q.add_argument("--seed", type=int, default=0, help="which shot examples")
        if name in ("pink-elephants", "adherence"):
            q.add_argument("--guidance-scale", default="1,1.5,3", help="comma-separated CFG scales to sweep")
            q.add_argument("--max-new-tokens", type=int, default=48)
        if name == "harness":
            q.add_argument("--tasks", default="ankus_implicature", help="harness task names (comma-separated)")
            q.add_argument("--include-path", help="more task YAMLs (default: ankus' own, offline)")
            q.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale for generate_until")
            q.add_argument("--direction", help="steer with this direction file (ankus audit directions writes them)")
            q.add_argument("--alpha", type=float, default=0.0, help="steering strength with --direction")
            q.add_argument("--num-fewshot", type=int, default=0)


def _check(args) -> dict:
    from ankus.config import ConfigError
    from ankus.evals import common

    try:
        if args.limit < 0 or args.batch_size < 1:
            raise ValueError("--limit must be >= 0 and --batch-size >= 1")
        if args.eval_command == "implicature":
            from ankus.evals.implicature import TEMPLATES

            templates = common.parse_ints(args.templates, "--templates")
            shots = common.parse_ints(args.shots, "--shots")
            if not templates or any(not 0 <= t < len(TEMPLATES) for t in templates):
                raise ValueError(f"--templates must be indices in 0..{len(TEMPLATES) - 1}, got {args.templates!r}")
            if not shots or any(k < 0 for k in shots):
                raise ValueError(f"--shots must be k >= 0, got {args.shots!r}")
            return {"templates": templates, "shots": shots}
        if args.eval_command in ("pink-elephants", "adherence"):
            scales = common.parse_floats(args.guidance_scale, "--guidance-scale")
            if not scales or any(g <= 0 for g in scales):
                raise ValueError(f"--guidance-scale must be positive numbers, got {args.guidance_scale!r}")
            return {"scales": scales}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {}


def _evaluate(args, lm, opts: dict) -> tuple[list[dict], list[dict], str]:
    """(rows, table, title) of one task."""
    if args.eval_command == "implicature":
        from ankus.evals import implicature as imp

        items, pool = imp.load_items(args.data)
        items = items[:args.limit] if args.limit else items
        rows = imp.evaluate(lm, items, pool, opts["templates"], opts["shots"])
        return rows, imp.summarize(rows), "Implicature resolution (ranking accuracy)"
    if args.eval_command == "goal-reach":
        from ankus.evals import goal_reach as gr
        from ankus.evals.common import read_task

        items = read_task(args.data, gr.FIELDS)
        items = items[:args.limit] if args.limit else items
        rows = gr.evaluate(lm, items)
        return rows, gr.summarize(rows), "Goal of a reach: object-goal bias (nats) by condition"
    from ankus.evals import steering as st

    if args.eval_command == "pink-elephants":
        rows = st.pink_elephants(lm, opts["scales"], args.limit, args.max_new_tokens)
        return rows, st.rate_table(rows, ["mentions_x", "mentions_y"]), "Pink elephants: mention rates by CFG scale"
    items = st.load_adherence(args.data)
    items = items[:args.limit] if args.limit else items
    rows = st.adherence(lm, items, opts["scales"], args.max_new_tokens)
    return rows, st.rate_table(rows, ["adheres"]), "Instruction adherence by CFG scale"


def run(args) -> int:
    """Run ``args.eval_command`` and write its outputs; the table goes to stdout."""
    from ankus.evals.common import markdown_table, write_outputs
    from ankus.evals.lm import EvalLM

    opts = _check(args)
    if args.eval_command == "harness":
        try:
            from ankus.evals.harness import run_harness
        except ImportError as e:
            from ankus.config import ConfigError

            raise ConfigError(f"ankus eval harness needs lm-eval ({e}); install it with: pip install 'ankus[evals]'"
                              ) from None
        return run_harness(args)
    t0 = time.perf_counter()
    lm = EvalLM.load(args.model, chat_template=args.chat_template, batch_size=args.batch_size)
    rows, table, title = _evaluate(args, lm, opts)
    seconds = time.perf_counter() - t0
    for r in table:
        r.update({"model": args.model, "chat_template": args.chat_template})
    path = write_outputs(args.out, rows, table, f"{title}: {args.model}, chat template "
                         f"{'on' if args.chat_template else 'off'} ({seconds:.0f} s)")
    print(markdown_table(table), end="")
    print(f"wrote {path} ({seconds:.1f} s)", file=sys.stderr)
    return 0
