"""Memorization audit speed: ``ankus audit memorization`` (batched greedy decoding through the
engine) against a loop over transformers' ``model.generate``, one window at a time, greedy.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memorization.py
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memorization.py --windows 64 --hf-windows 16 --batch-size 64

Both decode 32 tokens after a 32-token context, greedy, EOS ignored (transformers: ``min_new_tokens``),
on the same windows of a real text (the GPL-3 licence by default) with SmolLM2-135M-Instruct in fp32.
Prints windows per second of each, their ratio, and whether the scores agree on the windows both
ran (greedy decoding of the same model: they should, up to a rare near-tie in fp32).
A warm-up call runs first for each (packing the weights, allocator); then one timed run each.
On a shared machine the absolute numbers move with the load; quote the ratio.

Measured 2026-12-06 on the shared 2-core CPU (defaults; docs/memorization.md): ankus 1.90 windows/s,
transformers 0.24 windows/s, 7.89x (load ~4.5); under load ~10-16: 0.34 vs 0.04, 8.69x. Scores
agreed on 16 of 16 windows both times.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def hf_loop(model, contexts: np.ndarray, n_new: int) -> np.ndarray:
    """(B, n_new) greedy continuations, one ``model.generate`` call per row."""
    out = []
    for row in contexts:
        ids = torch.as_tensor(row[None], dtype=torch.long)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, pad_token_id=model.config.eos_token_id)
        out.append(gen[0, ids.shape[1]:].numpy())
    return np.stack(out)


def main() -> None:
    from ankus.audits import memorization as mem
    from ankus.models.loading import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--windows", type=int, default=64, help="windows the audit decodes")
    ap.add_argument("--hf-windows", type=int, default=16, help="windows the transformers loop decodes")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    cfg = mem.MemorizationConfig(batch_size=args.batch_size, max_windows=args.windows)
    windows = mem.make_windows(mem.load_documents(args.data, tok), cfg)
    tokens = np.stack([w.tokens for w in windows])
    contexts, targets = tokens[:, :32], tokens[:, 32:]
    print(f"{args.model}, {len(windows)} windows of 32 + 32 tokens from {args.data}; threads {torch.get_num_threads()}")

    mem.audit(model, tok, windows[:2], cfg)  # warm-up
    t0 = time.perf_counter()
    rows = mem.audit(model, tok, windows, cfg)
    ankus_rate = len(rows) / (time.perf_counter() - t0)
    print(f"ankus audit (batch {args.batch_size}): {ankus_rate:.2f} windows/s", flush=True)

    n = min(args.hf_windows, len(windows))
    with torch.no_grad():
        hf_loop(model, contexts[:1], 4)  # warm-up
        t0 = time.perf_counter()
        gen = hf_loop(model, contexts[:n], 32)
    hf_rate = n / (time.perf_counter() - t0)
    print(f"transformers generate, one window at a time: {hf_rate:.2f} windows/s ({n} windows)")
    print(f"ratio ankus / transformers: {ankus_rate / hf_rate:.2f}x")
    hf_scores, _ = mem.extractability(gen, targets[:n])
    ours = np.array([r["score"] for r in rows[:n]])
    print(f"scores agree on {int((hf_scores == ours).sum())} of {n} windows "
          f"(mean score ankus {ours.mean():.4f}, transformers {hf_scores.mean():.4f})")


if __name__ == "__main__":
    main()
