"""lm-evaluation-harness on ankus models: the ``ankus`` model type and offline tasks.

Needs the optional ``evals`` extra (``pip install 'ankus[evals]'``: lm-eval 0.4.x). Importing
this module registers the model type, so the harness' own entry points work too::

    import ankus.evals.harness  # registers "ankus"
    lm_eval.simple_evaluate(model="ankus", model_args="pretrained=smollm2-135m-instruct,guidance_scale=2", ...)

:class:`AnkusLM` answers the harness' three request types through :class:`~ankus.evals.lm.EvalLM`:
``loglikelihood`` (summed log-prob and is-greedy), ``loglikelihood_rolling`` (whole-text
log-prob) and ``generate_until`` (the ankus engine, greedy unless the task asks to sample, with
classifier-free guidance: ``guidance_scale`` and ``negative_prompt`` as model arguments, or
per task in its ``generation_kwargs``).

:func:`offline_tasks` writes task YAMLs over ankus' own implicature items (a local JSON file, no
hub): ``ankus_implicature`` (multiple choice, yes/no by log-likelihood) and
``ankus_implicature_gen`` (the model writes its answer; exact match of the first word).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ankus.evals.lm import EvalLM

__all__ = ["AnkusLM", "offline_tasks", "run_harness"]


@register_model("ankus")
class AnkusLM(LM):
    """An ankus model behind the harness' LM interface (the harness requires subclassing ``LM``)."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", chat_template: bool = False, batch_size: int = 16,
                 guidance_scale: float = 1.0, negative_prompt: str | None = None, lm: EvalLM | None = None,
                 direction: str | None = None, alpha: float = 0.0, **_ignored) -> None:
        super().__init__()
        if isinstance(chat_template, str):
            chat_template = chat_template.lower() in ("1", "true", "yes")
        self.lm = lm or EvalLM.load(pretrained, chat_template=bool(chat_template), batch_size=int(batch_size))
        if direction:  # steering: every loglikelihood and generation runs with alpha x the direction added
            from ankus.generation.steering import load_direction

            self.lm.direction, self.lm.alpha = load_direction(direction, self.lm.model), float(alpha)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts = [r.args[0] for r in requests]
        conts = [r.args[1] for r in requests]
        return self.lm.score(contexts, conts)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:  # one at a time: each request may carry its own settings
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            scale = float(kwargs.get("guidance_scale", self.guidance_scale))
            negative = kwargs.get("negative_prompt", self.negative_prompt)
            text = self.lm.generate([context], max_new_tokens=int(kwargs.get("max_gen_toks", 32)),
                                    guidance_scale=scale, negative_prompts=[negative] if negative else None,
                                    stop=until, do_sample=bool(kwargs.get("do_sample", False)),
                                    temperature=float(kwargs.get("temperature", 1.0) or 1.0))[0]
            for stop in until:  # the engine cuts before a stop string; be sure for the harness
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out


_MC = """task: ankus_implicature
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: 'Esther asked "{{{{question}}}}" and Juan responded "{{{{answer}}}}", which means'
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{0 if implicature == 'yes' else 1}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_GEN = """task: ankus_implicature_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: 'Question: {{{{question}}}}\\nReply: {{{{answer}}}}\\nDoes the reply mean yes or no? Answer with one word:'
doc_to_target: "{{{{implicature}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 4
filter_list:
  - name: first_word
    filter:
      - function: lowercase
      - function: regex
        regex_pattern: "(yes|no)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def offline_tasks(directory: str | Path) -> Path:
    """Write the ankus task YAMLs and their data (the implicature ``test`` items) into ``directory``."""
    from ankus.evals.implicature import load_items

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items, _ = load_items()
    data = directory / "implicature_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    (directory / "ankus_implicature.yaml").write_text(_MC.format(data=data), encoding="utf-8")
    (directory / "ankus_implicature_gen.yaml").write_text(_GEN.format(data=data), encoding="utf-8")
    return directory


def evaluate(lm: AnkusLM, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             num_fewshot: int = 0) -> dict:
    """``lm_eval.simple_evaluate`` offline on the given tasks; returns its results dict."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ankus-harness-") as tmp:
        paths = [str(offline_tasks(tmp))] + ([include_path] if include_path else [])
        manager = TaskManager(include_path=paths)
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               bootstrap_iters=100, log_samples=False)


def results_table(results: dict) -> list[dict]:
    """One row per (task, metric) with its standard error where the harness gives one."""
    table = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or "," not in key:
                continue
            name, _, flt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{flt}")
            table.append({"task": task, "metric": name, "filter": flt, "value": float(value),
                          "se": float(err) if isinstance(err, (int, float)) else ""})
    return table


def run_harness(args) -> int:
    """``ankus eval harness``: write table.csv / table.md (and results.json) into ``--out``."""
    from ankus.evals.common import markdown_table, write_outputs

    lm = AnkusLM(args.model, chat_template=args.chat_template, batch_size=args.batch_size,
                 guidance_scale=args.guidance_scale, direction=args.direction, alpha=args.alpha)
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    results = evaluate(lm, tasks, args.include_path, args.limit or None, args.num_fewshot)
    table = results_table(results)
    write_outputs(args.out, [], table, f"lm-evaluation-harness: {args.model}")
    Path(args.out, "results.json").write_text(json.dumps(results["results"], indent=1, default=str), encoding="utf-8")
    print(markdown_table(table), end="")
    print(f"wrote {Path(args.out) / 'table.csv'}", file=sys.stderr)
    return 0
