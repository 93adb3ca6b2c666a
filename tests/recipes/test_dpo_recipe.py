"""``ankus train dpo_tiny`` end to end: metrics, plot and a loadable HF model."""

import json
import math

import pytest
import torch

from ankus.cli import main
from ankus.recipes import resolve_recipe

RECIPE = resolve_recipe("dpo_tiny")


def test_dpo_tiny_recipe_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster on a busy 2-core machine
    try:
        rc = main(["train", str(RECIPE), f"run.out_dir={tmp_path}", "run.progress=false"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    run = tmp_path / "dpo_tiny"
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
            "perf/tokens_per_s"} <= set(rows[0])
    assert (run / "metrics.png").stat().st_size > 1000
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    # the saved weights are the trained ones, not the initial ones
    from ankus import load_model

    init, _ = load_model("tiny-llama")
    saved = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved[name], dict(init.named_parameters())[name])


def test_dpo_smollm2_recipe_parses():
    from ankus.config import build, read_yaml
    from ankus.recipes import resolve_recipe, trainer_module

    data = read_yaml(resolve_recipe("dpo_smollm2"))
    module = trainer_module(data["algorithm"])
    cfg = build(module.Config, data)
    # every value the recipe spells reaches the config (most differ from the trainer's defaults)
    for section, values in data.items():
        if section == "algorithm":
            continue
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == pytest.approx(value), f"{section}.{key}"
    default = module.Config()
    assert (cfg.trainer.lr, default.trainer.lr) == (5e-6, 5e-7)
    assert cfg.trainer.total_steps == 18 != default.trainer.total_steps
    assert cfg.data.chat_template is True and default.data.chat_template is None
    assert cfg.run.name == "dpo_smollm2" and cfg.lora.enabled is False
    module.check_config(cfg)  # nothing the recipe sets is ignored
