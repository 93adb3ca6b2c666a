"""A run killed with SIGKILL and resumed ends bitwise identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from ankus.cli import main
from ankus.runs import read_metrics

ARGS = ["ppo_randomwalks", "warm_start.steps=20", "trainer.total_steps=8", "method.num_rollouts=32",
        "method.chunk_size=32", "trainer.batch_size=16", "method.ppo_epochs=2", "data.num_eval=4",
        "trainer.checkpoint_every=2", "run.progress=false"]


def test_ppo_killed_and_resumed_equals_uninterrupted(tmp_path):
    assert main(["train", *ARGS, f"run.out_dir={tmp_path}", "run.name=straight"]) == 0

    cmd = [sys.executable, "-m", "ankus.cli", "train", *ARGS, f"run.out_dir={tmp_path}", "run.name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step-00000002" / "state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it was killed"

    assert main(["train", *ARGS, f"run.out_dir={tmp_path}", "run.name=killed", "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    steps = [r["step"] for r in read_metrics(tmp_path / "killed")]
    assert steps == list(range(1, 9))  # continues without a gap or a repeat
    ra, rb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]


def test_sigterm_checkpoints_and_stops(tmp_path):
    cmd = [sys.executable, "-m", "ankus.cli", "train", *ARGS, "trainer.checkpoint_every=0", "trainer.total_steps=500",
           f"run.out_dir={tmp_path}", "run.name=t"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert "stopped by signal" in out
    ckpts = list((tmp_path / "t" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "policy.safetensors").exists()


def test_pretrain_killed_and_resumed_equals_uninterrupted(tmp_path):
    import random

    import pytest

    from ankus.data.corpus import build_corpus
    from ankus.data.io import DataError

    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away from home to see what is there".split()
    for i in range(10):
        (texts / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(100 + 20 * i)))
    build_corpus(str(texts), tmp_path / "corpus")
    args = ["pretrain_tiny", f"data.corpus={tmp_path / 'corpus'}", "trainer.total_steps=6",
            "trainer.checkpoint_every=2", "trainer.lr_schedule=cosine", "trainer.warmup_steps=2",
            "data.isolate_documents=true", "run.progress=false", f"run.out_dir={tmp_path}"]
    assert main(["train", *args, "run.name=straight"]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "ankus.cli", "train", *args, "run.name=killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "step-00000002" / "state.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert not (tmp_path / "killed" / "model").exists(), "the run finished before it was killed"

    # resuming onto another corpus is refused by name
    build_corpus(str(texts), tmp_path / "other", shard_tokens=50)  # the same texts, other shards: another hash
    with pytest.raises(DataError, match="another corpus"):
        from ankus.cli import run_recipe

        run_recipe(args[0], [*args[1:], "run.name=killed", f"data.corpus={tmp_path / 'other'}"], resume=True)

    assert main(["train", *args, "run.name=killed", "--resume"]) == 0
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    ra, rb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in rb if "loss/train" in r] == list(range(1, 7))  # no gap, no repeat
    assert [r["loss/train"] for r in ra if "loss/train" in r] == [r["loss/train"] for r in rb if "loss/train" in r]


RM_ARGS = ["rm_synthetic", "data.kwargs={n_train: 12, n_eval: 4, seed: 0, negation: 0.25}",
           "trainer.batch_size=4", "trainer.warmup_steps=2", "method.eval_every=0", "run.progress=false",
           "run.save_model=false"]


def test_reward_model_stopped_and_resumed_equals_uninterrupted(tmp_path):
    """4 steps straight vs. 2 steps (3 batches an epoch, so the resumed part crosses an epoch
    boundary) continued to 4 with --resume: the trunk and the head end bitwise equal."""
    from ankus.checkpoint import latest_checkpoint

    out = f"run.out_dir={tmp_path}"
    assert main(["train", *RM_ARGS, out, "run.name=straight", "trainer.total_steps=4"]) == 0
    assert main(["train", *RM_ARGS, out, "run.name=cut", "trainer.total_steps=2"]) == 0
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000002"
    assert main(["train", *RM_ARGS, out, "run.name=cut", "trainer.total_steps=4", "--resume"]) == 0
    a_dir, b_dir = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "cut")
    assert a_dir.name == b_dir.name == "step-00000004"
    files = sorted(p.name for p in a_dir.glob("*.safetensors"))
    assert {"model.safetensors", "value_head.safetensors"} <= set(files)
    assert files == sorted(p.name for p in b_dir.glob("*.safetensors"))
    moved = 0
    for name in files:
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (name, k)
        moved += 1
    ra = [r for r in read_metrics(tmp_path / "straight") if "loss/rm" in r]
    rb = [r for r in read_metrics(tmp_path / "cut") if "loss/rm" in r]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]  # continues without a gap or a repeat
    assert [r["loss/rm"] for r in ra] == [r["loss/rm"] for r in rb]
    assert ra[0]["loss/rm"] != ra[-1]["loss/rm"]  # it trained
