"""Full-rank pretraining vs ReLoRA vs plain LoRA: memory held and step time, side by side in one run.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relora_memory.py                 # llama-5m
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relora_memory.py --model llama-20m

Each configuration runs in a child process of its own (``benchmarks/_workers.py``), through the
pretrain trainer's own code: ``trainers.pretrain._setup_model`` (the model, ``apply_relora`` for
the ReLoRA sides), ``ankus.optim.make_optimizer`` (fused AdamW, the trainer's LR multiplier) and
``trainers.pretrain._step`` (fused linear cross-entropy, clipping, step), with ``relora_step``
before every step as the trainer calls it. Same model, seed, batch and rows (random tokens):

* ``full``: every weight trains;
* ``lora``: rank-r adapters on every attention and MLP linear, never merged (ReLoRA with
  ``reset_every`` > steps), nothing else trains;
* ``relora``: the same adapters merged and restarted every ``--reset`` steps (magnitude pruning
  0.9 of their Adam moments), so restarts fall inside the timed steps;
* ``relora+emb``: ReLoRA with ``relora.train_embeddings`` (embeddings, head and norms in full).

No warm start (``warm_start_steps`` 0): a warm start holds full-rank state until the switch, so
its peak would be the full run's. Per side: peak RSS (``ru_maxrss`` of the child: the model, the
tokenizer, the activations of a step and everything Python holds), the bytes of the parameters,
of their gradients (one per trainable parameter, as backward makes them) and of Adam's moments
(the optimizer's state tensors shaped like their parameter), and the median wall s/step over
``--steps`` steps after ``--warmup``.

Measured 2026-12-06 ~04:08-04:12 UTC on this project's shared 2-core AMD EPYC (a test-suite run
beside it, load average ~3), fp32, 1 thread, batch 8 x 128, r 8, the defaults; llama-5m (90 s):

    model llama-5m, batch 8 x 128, fp32, 1 thread, r 8, restart every 3; median of 2 x 6 steps after 2; wall 87 s
                  trainable params MB grads MB  Adam MB  held MB peak RSS MB  s/step CPU s/step last loss
    full          5,124,960      19.6     19.6     39.1     78.2         938   0.763      0.754     9.797
    lora             55,296      19.8      0.2      0.4     20.4         883   0.647      0.640    10.721
    relora           55,296      19.8      0.2      0.4     20.4         884   0.628      0.625    10.740
    relora+emb    4,774,752      19.8     18.2     36.4     74.4         965   0.795      0.787     9.921
    ratio lora/full: held 0.26x, grads+Adam 0.011x, peak RSS 0.94x, s/step 0.85x, CPU s/step 0.85x
    ratio relora/full: held 0.26x, grads+Adam 0.011x, peak RSS 0.94x, s/step 0.82x, CPU s/step 0.83x
    ratio relora+emb/full: held 0.95x, grads+Adam 0.932x, peak RSS 1.03x, s/step 1.04x, CPU s/step 1.04x

``--model llama-20m`` (160 s wall):

    model llama-20m, batch 8 x 128, fp32, 1 thread, r 8, restart every 3; median of 2 x 6 steps after 2; wall 160 s
                  trainable params MB grads MB  Adam MB  held MB peak RSS MB  s/step CPU s/step last loss
    full         20,452,608      78.0     78.0    156.0    312.1        1376   1.996      1.978     8.600
    lora            389,120      79.5      1.5      3.0     84.0        1272   1.570      1.562    10.515
    relora          389,120      79.5      1.5      3.0     84.0        1269   1.551      1.533    10.562
    relora+emb   12,977,408      79.5     49.5     99.0    228.0        1432   1.995      1.978     8.548
    ratio lora/full: held 0.27x, grads+Adam 0.019x, peak RSS 0.92x, s/step 0.79x, CPU s/step 0.79x
    ratio relora/full: held 0.27x, grads+Adam 0.019x, peak RSS 0.92x, s/step 0.78x, CPU s/step 0.77x
    ratio relora+emb/full: held 0.73x, grads+Adam 0.635x, peak RSS 1.04x, s/step 1.00x, CPU s/step 1.00x

Gradients + Adam moments fall to 1-2% of full rank's, but the weights stay and the process's fixed
cost (~850 MB: torch, the tokenizer) and the activations are most of the peak RSS at these sizes,
so peak RSS falls only 6-8%; steps are 15-23% faster. With train_embeddings the embeddings (92% of
llama-5m, 49% of llama-20m) train in full again and nothing is saved.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

SIDES = ("full", "lora", "relora", "relora+emb")


def _config(args: argparse.Namespace, side: str):
    from ankus.config import build
    from ankus.trainers.pretrain import Config

    relora = {} if side == "full" else {
        "enabled": True, "r": args.r, "alpha": 2.0 * args.r, "restart_warmup": 1,
        "reset_every": args.warmup + args.steps + 1 if side == "lora" else args.reset,
        "train_embeddings": side == "relora+emb"}
    return build(Config, {"model": {"spec": args.model}, "relora": relora,
                          "trainer": {"lr": 1e-3, "batch_size": args.batch, "total_steps": args.warmup + args.steps,
                                      "warmup_steps": 0, "lr_schedule": "constant", "device": "cpu"},
                          "data": {"seq_length": args.seq}})


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def worker(side: str, args: argparse.Namespace) -> dict:
    """One side: ``args.warmup + args.steps`` pretrain steps; bytes held, s/step, peak RSS."""
    import torch

    from ankus.checkpoint import NonFiniteGuard
    from ankus.models.relora import relora_step
    from ankus.optim import make_optimizer
    from ankus.trainers.pretrain import _setup_model, _step, make_rows

    torch.set_num_threads(1)
    cfg = _config(args, side)
    model, tok, params, multiplier = _setup_model(cfg, torch.device("cpu"), False)
    opt, sched = make_optimizer(params, cfg.trainer, multiplier=multiplier, fused=cfg.method.fused_adamw)
    B, T = args.batch, args.seq
    tokens = torch.randint(0, len(tok), (B * T,), generator=torch.Generator().manual_seed(0)).numpy()
    batch = make_rows(tokens, torch.zeros(B * T, dtype=torch.bool).numpy(), list(range(B)), T, False)
    guard, times, cpu, losses = NonFiniteGuard(cfg.trainer.max_bad_steps), [], [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg.relora.enabled:
            relora_step(model, opt, cfg.relora, step, cfg.trainer.seed)
        loss, _, _ = _step(model, [batch], params, opt, sched, guard, cfg.trainer,
                           (cfg.method.loss_chunk, torch.float32), False)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = [v for p, s in opt.state.items() for v in s.values() if torch.is_tensor(v) and v.shape == p.shape]
    return {"params": _nbytes(model.parameters()), "trainable": _nbytes(trainable), "cpu": cpu[args.warmup:],
            "n_trainable": sum(p.numel() for p in trainable), "grads": _nbytes(trainable), "adam": _nbytes(moments),
            "s_step": statistics.median(times[args.warmup:]),
            "times": times[args.warmup:], "loss": losses[-1],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-5m", help="llama-5m or llama-20m (any scratch/tiny spec)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reset", type=int, default=3, help="ReLoRA restart every this many steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="times each side runs (in alternating order)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    from _workers import run_worker

    argv = sys.argv[1:]
    t0 = time.time()
    res: dict[str, dict | None] = {}
    for k in range(args.rounds):  # the sides in turn, the order reversed every other round
        for side in SIDES if k % 2 == 0 else SIDES[::-1]:
            r = run_worker(str(Path(__file__).resolve()), side, argv)
            if r and side in res and res[side]:
                res[side]["times"] += r["times"]
                res[side]["cpu"] += r["cpu"]
                res[side]["rss_mb"] = max(res[side]["rss_mb"], r["rss_mb"])
            elif k == 0 or r is None:
                res[side] = r
    for r in res.values():
        if r:
            r["s_step"], r["cpu_step"] = statistics.median(r["times"]), statistics.median(r["cpu"])
    mb = 1 / 2 ** 20
    print(f"model {args.model}, batch {args.batch} x {args.seq}, fp32, 1 thread, r {args.r}, restart every "
          f"{args.reset}; median of {args.rounds} x {args.steps} steps after {args.warmup}; wall {time.time() - t0:.0f} s")
    print(f"{'':12s}{'trainable':>11s}{'params MB':>10s}{'grads MB':>9s}{'Adam MB':>9s}{'held MB':>9s}"
          f"{'peak RSS MB':>12s}{'s/step':>8s}{'CPU s/step':>11s}{'last loss':>10s}   wall s per step")
    for side, r in res.items():
        if r:
            held = r["params"] + r["grads"] + r["adam"]
            print(f"{side:12s}{r['n_trainable']:11,d}{r['params'] * mb:10.1f}{r['grads'] * mb:9.1f}"
                  f"{r['adam'] * mb:9.1f}{held * mb:9.1f}{r['rss_mb']:12.0f}{r['s_step']:8.3f}"
                  f"{r['cpu_step']:11.3f}{r['loss']:10.3f}   "
                  + " ".join(f"{t:.2f}" for t in r["times"]))
    full = res.get("full")
    for side in SIDES[1:]:
        r = res.get(side)
        if full and r:
            held = lambda x: x["params"] + x["grads"] + x["adam"]
            print(f"ratio {side}/full: held {held(r) / held(full):.2f}x, grads+Adam "
                  f"{(r['grads'] + r['adam']) / (full['grads'] + full['adam']):.3f}x, peak RSS "
                  f"{r['rss_mb'] / full['rss_mb']:.2f}x, s/step {r['s_step'] / full['s_step']:.2f}x, "
                  f"CPU s/step {r['cpu_step'] / full['cpu_step']:.2f}x")


if __name__ == "__main__":
    main()
