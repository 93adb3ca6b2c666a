"""ankus DPO vs TRL's DPOTrainer, side by side: same model, data, batch, optimizer, precision.

    .venv/bin/python benchmarks/dpo.py                  # 6 steps each, SmolLM2-135M, batch 8, CPU
    .venv/bin/python benchmarks/dpo.py --steps 10 --threads 1

Both run full fine-tuning of SmolLM2-135M-Instruct (``ankus.load_model()``, fp32) on the first
``steps * batch_size`` pairs of ``prefs_tiny`` in file order (TRL: ``train_sampling_strategy=
"sequential"``), formatted with the chat template (~48 tokens per prompt + completion), with
AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), a constant learning rate, no warm-up,
gradient clipping at 1.0, beta 0.1, sigmoid loss, dropout off. TRL needs ``pip install
'trl>=1.0,<2'`` (a benchmark-only dependency; ankus never imports it).

Each framework runs in its own child process, so one's memory and threads cannot colour the
other's numbers. Reported per framework:

* s/step: median over the steps after ``--warmup`` (time between the ends of consecutive
  optimizer steps for TRL, as seen by a callback; the trainer's own step timer for ankus);
* wall: the whole ``train()`` call (ankus: tokenizing, the reference pass, the steps, the plot
  and the end-of-run resumable checkpoint; TRL: trainer construction, dataset tokenization, and
  ``trainer.train()``, saving nothing);
* peak memory: the largest resident set size (RSS) sampled every 5 ms while training, minus the
  RSS right after the model was loaded (so TRL's reference copy counts, as does the optimizer);
* per-step losses, and their largest absolute difference between the two.

Measured here (2-core CPU shared with other jobs, load average ~8, so ``--threads 1``; two runs
of the default 6 steps): ankus 11.9 / 12.6 s/step, TRL 41.1 / 37.9 s/step, i.e. 3.5x / 3.0x;
wall 2.6x / 2.2x (ankus's wall includes its reference pass and a 1.6 GB checkpoint); peak RSS
+2.8 GiB vs +3.4 GiB; losses equal to within 3.6e-7 on all 6 steps. Where TRL's step went
(``--breakdown``): policy forward 8.4 s, reference forward 7.7 s, optimizer 0.5 s, backward and
the rest 22 s; ankus: forward 4.1 s, no reference forward, optimizer 0.5 s, backward 8.2 s. The
data's prompts are long (38 tokens with SmolLM2's default system prompt, completions ~10), so
encoding each prompt once matters here; ``--no-packing`` (padded chosen + rejected, still with the
precomputed reference) measured 18.3 s/step, i.e. ~2.1x over TRL without the shared prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _workers import run_worker  # benchmarks/_workers.py (this directory is on sys.path when run as a script)


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, every: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.every = every
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class Breakdown:
    """Seconds spent in the policy forward, the reference forward and the optimizer step, told
    apart by wrapping ``forward`` (a module in train mode is the policy, in eval mode the
    reference) and ``torch.optim.AdamW.step``; the rest of a step is mostly the backward."""

    def __init__(self):
        self.total = {"forward": 0.0, "ref_forward": 0.0, "optimizer": 0.0}

    def wrap_module(self, module):
        forward = module.forward

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return forward(*a, **k)
            finally:
                self.total["forward" if module.training else "ref_forward"] += time.perf_counter() - t

        module.forward = timed

    def wrap_optimizer(self):
        import torch

        step = torch.optim.AdamW.step

        def timed(opt, *a, **k):
            t = time.perf_counter()
            try:
                return step(opt, *a, **k)
            finally:
                self.total["optimizer"] += time.perf_counter() - t

        torch.optim.AdamW.step = timed


def bench_rows(n: int) -> list[dict]:
    from ankus.trainers.dpo import load_pairs

    rows = load_pairs("prefs_tiny")
    if n > len(rows):
        rows = (rows * (n // len(rows) + 1))
    return rows[:n]


def worker_ankus(args) -> dict:
    import torch

    from ankus import load_model
    from ankus.config import build
    from ankus.data.io import write_jsonl
    from ankus.trainers import dpo

    model, tok = load_model()
    rss0 = PeakRSS().peak
    tmp = Path(tempfile.mkdtemp(prefix="ankus-dpo-bench-"))
    data = write_jsonl(tmp / "pairs.jsonl", bench_rows(args.steps * args.batch_size))
    cfg = build(dpo.Config, {
        "data": {"path": str(data), "chat_template": True, "shuffle": False},
        "method": {"beta": args.beta, "loss_type": "sigmoid", "packing": not args.no_packing},
        "trainer": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                    "batch_size": args.batch_size, "total_steps": args.steps, "warmup_steps": 0,
                    "max_grad_norm": 1.0, "seed": 0},
        "run": {"out_dir": str(tmp), "name": "run", "progress": False, "save_model": False},
    })
    parts = Breakdown()
    if args.breakdown:
        parts.wrap_module(model)
        parts.wrap_optimizer()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        summary = dpo.train(cfg, model=model, tokenizer=tok)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(tmp / "run" / "metrics.jsonl")]
    shutil.rmtree(tmp, ignore_errors=True)  # the end-of-run checkpoint alone is 1.6 GB
    # the reference pass runs before the steps, in eval mode: it is not part of any step
    parts.total["ref_forward"] = 0.0
    return {"framework": "ankus", "threads": torch.get_num_threads(), "step_s": [r["perf/step_s"] for r in rows],
            "loss": [r["loss"] for r in rows], "margins": [r["rewards/margins"] for r in rows],
            "wall_s": wall, "ref_precompute_s": summary["ref_precompute_s"], "peak_rss_delta": mem.peak - rss0,
            "breakdown": parts.total if args.breakdown else None}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ankus import load_model

    model, tok = load_model()
    rss0 = PeakRSS().peak
    rows = bench_rows(args.steps * args.batch_size)
    # TRL's conversational format: the chat template is applied the same way ankus applies it
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    tmp = tempfile.mkdtemp(prefix="trl-dpo-bench-")
    config = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        beta=args.beta, loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, seed=0, train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True, disable_dropout=True,
    )
    step_ends: list[float] = []
    losses: list[float] = []

    class Times(TrainerCallback):
        def on_train_begin(self, *a, **k):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config, train_dataset=ds,
                             processing_class=tok, callbacks=[Times()])
        compute_loss = trainer.compute_loss

        def recording(*a, **k):  # the exact per-step loss (log_history averages and rounds)
            loss = compute_loss(*a, **k)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

        trainer.compute_loss = recording
        parts = Breakdown()
        if args.breakdown:
            parts.wrap_module(trainer.model)
            parts.wrap_module(trainer.ref_model)
            parts.wrap_optimizer()
        setup = time.perf_counter() - t0
        trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(tmp, ignore_errors=True)
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {"framework": "trl", "threads": torch.get_num_threads(),
            "step_s": [b - a for a, b in zip(step_ends, step_ends[1:])], "loss": losses, "margins": margins,
            "wall_s": wall, "setup_s": setup, "peak_rss_delta": mem.peak - rss0,
            "breakdown": parts.total if args.breakdown else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads in both workers; 0 = torch's default")
    p.add_argument("--no-packing", action="store_true", help="ankus: padded chosen+rejected batches instead")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the policy forward, reference forward and optimizer (adds a little overhead)")
    p.add_argument("--only", choices=["ankus", "trl"], help="run one framework")
    p.add_argument("--worker", choices=["ankus", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        result = (worker_ankus if args.worker == "ankus" else worker_trl)(args)
        print("RESULT " + json.dumps(result))
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--only") and a not in ("ankus", "trl")]
    names = [args.only] if args.only else ["ankus", "trl"]
    print(f"DPO, SmolLM2-135M fp32 full fine-tuning, batch {args.batch_size} pairs, {args.steps} steps, "
          f"lr {args.lr}, beta {args.beta}, CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    results = {}
    for name in names:
        results[name] = r = run_worker(__file__, name, argv)
        if r is None:
            raise SystemExit(f"the {name} worker failed")
        timed = r["step_s"][args.warmup:] or r["step_s"]
        r["median_step_s"] = statistics.median(timed)
        extra = (f"reference pass {r['ref_precompute_s']:.1f} s" if name == "ankus"
                 else f"trainer setup {r['setup_s']:.1f} s")
        print(f"  {name:5s}  {r['median_step_s']:7.2f} s/step (median of {len(timed)})   wall {r['wall_s']:7.1f} s "
              f"({extra})   peak RSS +{r['peak_rss_delta'] / 2**20:7.0f} MiB   threads {r['threads']}")
        print(f"         steps: {' '.join(f'{t:.2f}' for t in r['step_s'])}")
        if r.get("breakdown"):
            n = len(r["step_s"])
            b = {k: v / n for k, v in r["breakdown"].items()}
            rest = sum(r["step_s"]) / n - sum(b.values())
            print(f"         per step: policy forward {b['forward']:.2f} s, reference forward {b['ref_forward']:.2f} s, "
                  f"optimizer {b['optimizer']:.2f} s, backward and rest {rest:.2f} s")
        print(f"         loss:  {' '.join(f'{x:.6f}' for x in r['loss'])}")
    if len(results) == 2:
        a, t = results["ankus"], results["trl"]
        diffs = [abs(x - y) for x, y in zip(a["loss"], t["loss"])]
        mdiffs = [abs(x - y) for x, y in zip(a["margins"], t["margins"])]
        print(f"  speed-up (TRL s/step / ankus s/step): {t['median_step_s'] / a['median_step_s']:.2f}x   "
              f"wall: {t['wall_s'] / a['wall_s']:.2f}x   "
              f"peak memory (ankus / TRL): {a['peak_rss_delta'] / max(t['peak_rss_delta'], 1):.2f}")
        print(f"  loss |ankus - TRL| per step: {' '.join(f'{d:.1e}' for d in diffs)}   max {max(diffs):.1e} "
              f"({'within' if max(diffs) <= 1e-3 else 'NOT within'} 1e-3)")
        if mdiffs:
            print(f"  rewards/margins |ankus - TRL| max {max(mdiffs):.1e}")


if __name__ == "__main__":
    main()
