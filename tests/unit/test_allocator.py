"""ankus.allocator: inside the block a training step reuses the pages it freed (counted as minor
page faults), and training gives the same numbers with it on and off."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from ankus.allocator import reuse_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the block is a no-op without glibc")


def _step_faults(model, opt, batch, n_targets: int) -> int:
    """Minor page faults during one pretraining step (fused loss, backward, AdamW)."""
    from ankus.trainers.pretrain import batch_loss

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _ = batch_loss(model, batch, 1.0 / n_targets, 1024)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_a_training_step_reuses_its_freed_pages_inside_the_block():
    """llama-5m, 2 x 128 tokens: each step allocates (256, 49152) fp32 logits (50 MB) and other
    blocks above glibc's mmap threshold; outside the block their pages are mapped afresh every
    step, inside it the steps after the first reuse them."""
    from ankus import load_model
    from ankus.trainers.pretrain import make_rows

    model, tok = load_model("llama-5m", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, len(tok), (256,), generator=torch.Generator().manual_seed(0)).numpy()
    batch = make_rows(tokens, torch.zeros(256, dtype=torch.bool).numpy(), [0, 1], 128, isolate=False)
    n = int(batch.loss_mask[:, 1:].sum())
    for _ in range(2):
        _step_faults(model, opt, batch, n)
    outside = min(_step_faults(model, opt, batch, n) for _ in range(2))
    with reuse_freed_memory() as on:
        assert on is True
        for _ in range(2):
            _step_faults(model, opt, batch, n)
        inside = min(_step_faults(model, opt, batch, n) for _ in range(2))
    assert outside > 12_000  # at least the logits' 50 MB in 4 KiB pages
    assert inside < outside / 10, (inside, outside)


def test_disabled_is_a_no_op():
    with reuse_freed_memory(False) as on:
        assert on is False


def test_pretraining_gives_the_same_numbers_with_and_without_it(tmp_path):
    from test_pretrain import write_texts

    from ankus.cli import run_recipe
    from ankus.data.corpus import build_corpus
    from ankus.runs import read_metrics

    build_corpus(str(write_texts(tmp_path / "texts")), tmp_path / "corpus", shard_tokens=600)
    losses = []
    for flag in ("true", "false"):
        out = run_recipe("pretrain_tiny", [f"data.corpus={tmp_path / 'corpus'}", f"run.out_dir={tmp_path}",
                                           f"run.name=r{flag}", "run.progress=false", "trainer.total_steps=2",
                                           f"method.reuse_freed_memory={flag}"])
        losses.append([r["loss/train"] for r in read_metrics(out["run_dir"]) if "loss/train" in r])
    assert losses[0] == losses[1] and len(losses[0]) == 2
