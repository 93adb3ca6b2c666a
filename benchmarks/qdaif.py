"""QDAIF evaluations per second: one generation of the search batched (all mutations in one
batched generate, all judgements in one batched forward) against the same work one prompt at
a time, side by side on the same LMX prompts, with the ratio.

    python benchmarks/qdaif.py                           # SmolLM2-135M, 8 texts, 32 new tokens
    python benchmarks/qdaif.py --model tiny-llama --texts 16 --repeats 3

An "evaluation" is one candidate text written by the LM (LMX from 3 parents) and judged (a
quality question plus the recipe's diversity measures). Runs alternate between the two modes so
that load from other processes hits both alike; on a shared machine quote the ratio, and check
`uptime` first. Prints the median over the repeats of evaluations per wall-clock second and per
CPU-second. Measured numbers: docs/qdaif.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ankus.chat import LocalChat
from ankus.config import build, read_yaml
from ankus.models.loading import load_model
from ankus.pipelines.qd_lm import LocalLM, judge, lmx_prompt, mutate
from ankus.pipelines.qdaif import Config, _generation, _questions
from ankus.recipes import resolve_recipe


def one_generation(lm: LocalLM, cfg: Config, prompts: list[str], batched: bool) -> tuple[int, float, float]:
    """(texts evaluated, wall s, CPU s) of one generation: mutate all, then judge all."""
    t0, c0 = time.perf_counter(), time.process_time()
    lm.reseed(0)
    texts = [t for t in mutate(lm, prompts, _generation(cfg), cfg.mutation.separator, batched) if t]
    judge(lm, texts, _questions(cfg), cfg.judge.top_logprobs, cfg.judge.chat_template, batched)
    return len(prompts), time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--recipe", default="qdaif_opinions")
    ap.add_argument("--texts", type=int, default=8, help="candidates per generation")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = build(Config, read_yaml(resolve_recipe(args.recipe)), [f"mutation.max_new_tokens={args.new_tokens}"])
    model, tok = load_model(args.model)
    lm = LocalLM(LocalChat(model=model, tokenizer=tok, batch_size=max(16, args.texts)))
    seeds = cfg.mutation.seeds
    prompts = [lmx_prompt([seeds[(i + j) % len(seeds)] for j in range(cfg.mutation.parents)], cfg.mutation.header,
                          cfg.mutation.separator) for i in range(args.texts)]
    one_generation(lm, cfg, prompts[:2], True)  # warm-up: packed weights, the vocabulary table
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for batched in (True, False):
            n, wall, cpu = one_generation(lm, cfg, prompts, batched)
            runs[batched].append((n / wall, n / max(cpu, 1e-9)))
    med = {b: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for b, v in runs.items()}
    print(f"{args.model}, {args.texts} texts x ({cfg.mutation.parents}-parent LMX, {args.new_tokens} new tokens, "
          f"{len(_questions(cfg))} judge questions), median of {args.repeats}")
    print(f"{'mode':<16}{'evals/s (wall)':>16}{'evals/CPU-s':>14}")
    for b, name in ((True, "batched"), (False, "one at a time")):
        print(f"{name:<16}{med[b][0]:>16.3f}{med[b][1]:>14.3f}")
    print(f"ratio batched / one at a time: {med[True][0] / med[False][0]:.2f}x wall, "
          f"{med[True][1] / med[False][1]:.2f}x CPU")


if __name__ == "__main__":
    main()
