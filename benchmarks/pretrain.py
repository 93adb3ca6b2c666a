"""ankus's pretraining step vs a plain transformers training loop, side by side in one process.

    .venv/bin/python benchmarks/pretrain.py                          # llama-20m, batch 4 x 256 tokens
    .venv/bin/python benchmarks/pretrain.py --model pythia-20m --batch 8 --seq 512 --repeats 7

Both sides train the same from-scratch model (same seed, fp32, CPU) on the same random token
rows, one optimizer step at a time, with gradient clipping at 1.0:

* plain: ``loss = model(input_ids, labels=input_ids).loss`` (transformers' own shifted
  cross-entropy over the full (B, T, V) logits), ``backward``, ``clip_grad_norm_``, and a plain
  ``torch.optim.AdamW`` (its default for-each implementation);
* ankus: :func:`ankus.trainers.pretrain.batch_loss` -- the model's forward with its head bypassed
  and :func:`ankus.losses.lm.linear_cross_entropy` making the head's gradients chunk by chunk,
  never the whole (B, T, V) logits -- then ``backward``, clipping, and ``ankus.optim.make_optimizer``
  with ``fused=True`` (one AdamW kernel over every tensor), as the trainer runs them.

The steps alternate (ankus, plain, ankus, ...) so that noise from other jobs hits both alike; the
table gives medians over ``--repeats`` steps after ``--warmup`` each, tokens/s = B x T / median,
and MFU = the step's model FLOPs (6 x matmul parameters x tokens, the head included once, plus
the attention's 12 x layers x T x width x tokens) / the measured peak: the median FLOP/s of a
large fp32 matrix product on the same threads.

Measured here once (2-core CPU shared with four other jobs, so absolute numbers are noisy; the
ratio is what to read), ``--model llama-20m --batch 4 --seq 256 --repeats 5``:

    (filled in below by the run quoted in the report)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an (n x n) @ (n x n) fp32 product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def step_flops(model, tokens: int, seq: int) -> float:
    """6 x (matmul parameters) x tokens + attention (12 x layers x seq x width x tokens)."""
    c = model.config
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - emb  # without the input lookup...
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        n += head  # ...but with the (tied) head's matmul
    return 6 * n * tokens + 12 * c.num_hidden_layers * seq * c.hidden_size * tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-20m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk of ankus's fused loss")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ankus import load_model
    from ankus.config import TrainerConfig
    from ankus.optim import make_optimizer
    from ankus.trainers.pretrain import batch_loss, make_rows

    B, T = args.batch, args.seq
    ours, tok = load_model(args.model, seed=0)
    plain, _ = load_model(args.model, seed=0)
    ours.train()
    plain.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tok), (B * T,), generator=gen).numpy()
    starts = torch.zeros(B * T, dtype=torch.bool).numpy()
    batch = make_rows(tokens, starts, list(range(B)), T, isolate=False)
    n_targets = int(batch.loss_mask[:, 1:].sum())

    tc = TrainerConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999))
    opt_ours, _ = make_optimizer([p for p in ours.parameters()], tc, fused=True)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)

    def make_step(model, opt, head_dtype):
        def step() -> float:
            loss, _ = batch_loss(model, batch, 1.0 / n_targets, args.chunk, head_dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    bf16, _ = load_model(args.model, seed=0)
    bf16.train()
    opt_bf16, _ = make_optimizer([p for p in bf16.parameters()], tc, fused=True)
    steps = {"ankus": make_step(ours, opt_ours, None), "ankus-bf16head": make_step(bf16, opt_bf16, torch.bfloat16)}

    def step_plain() -> float:
        loss = plain(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps["plain"] = step_plain
    times: dict[str, list[float]] = {k: [] for k in steps}
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            losses[name].append(fn())
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
    peak = matmul_peak()
    flops = step_flops(ours, B * T, T)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model} ({sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M params), batch {B} x {T} "
          f"tokens, fp32, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{flops / 1e9:.1f} GFLOP/step")
    print(f"{'':15s}{'s/step (median)':>17s}{'tokens/s':>11s}{'MFU':>8s}   per-step s")
    for name in steps:
        print(f"{name:15s}{med[name]:17.3f}{B * T / med[name]:11.0f}{flops / med[name] / peak:8.1%}   "
              + " ".join(f"{t:.2f}" for t in times[name]))
    for name in ("ankus", "ankus-bf16head"):
        print(f"ratio {name}/plain tokens/s: {med['plain'] / med[name]:.2f}x")
        diff = max(abs(a - b) for a, b in zip(losses[name], losses["plain"]))
        print(f"  {name} losses equal plain's to within {diff:.2g} over {len(losses[name])} steps")


if __name__ == "__main__":
    main()
