import math

import pytest
import torch

from ankus.atomic import atomic_write_dir
from ankus.config import RunConfig
from ankus.runs import (MetricsLogger, create_run_dir, plot_metrics, read_metrics, save_hf_model,
                        truncate_metrics)


def test_run_dir_metrics_plot(tmp_path):
    run = create_run_dir(RunConfig(out_dir=str(tmp_path), name="r1"), "ppo", RunConfig())
    assert (run / "config.yaml").read_text().startswith("out_dir:")
    with MetricsLogger(run / "metrics.jsonl") as log:
        for step in range(1, 4):
            log.log(step, {"reward/mean": torch.tensor(0.1 * step), "kl/mean": step * 1.0, "bad": math.nan})
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["reward/mean"] == pytest.approx(0.3) and rows[0]["bad"] == "nan"
    png = plot_metrics(run, ["reward/mean", "kl/mean", "never-logged"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truncate_metrics(run / "metrics.jsonl", 2)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    with pytest.raises(FileExistsError, match="--resume"):
        create_run_dir(RunConfig(out_dir=str(tmp_path), name="r1"), "ppo")


def test_atomic_write_leaves_old_copy_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("v1"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, crash)
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_saved_model_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ankus import load_model

    model, tok = load_model("tiny-llama")
    save_hf_model(model, tok, tmp_path / "model")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, again(ids).logits)
