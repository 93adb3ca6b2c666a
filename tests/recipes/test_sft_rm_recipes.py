"""Smoke runs of the SFT and reward-model recipes through the CLI, with the numbers they promise:
a tiny model fitted to random walks samples legal walks; the synthetic reward model reaches
>= 90% held-out pairwise accuracy and, loaded as a reward function, prefers the chosen responses."""

from __future__ import annotations

import json

import pytest

from ankus.cli import main
from ankus.runs import read_metrics


def _final(run_dir) -> dict:
    """The metrics of the last logged step, merged."""
    rows = read_metrics(run_dir)
    last = rows[-1]["step"]
    out: dict = {}
    for r in rows:
        if r["step"] == last:
            out.update(r)
    return out


def test_sft_tiny_recipe(tmp_path):
    assert main(["train", "sft_tiny", f"run.out_dir={tmp_path}"]) == 0
    run = tmp_path / "sft_tiny"
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "model/config.json", "model/model.safetensors"):
        assert (run / name).exists(), name
    final = _final(run)
    assert final["step"] == 6 and final["loss/sft"] > 0 and final["loss/sft_eval"] > 0
    assert any((run / "checkpoints").iterdir())
    # the recipe trains LoRA adapters: the saved (merged) model differs from the initial one in
    # the adapted linear layers only
    import torch
    from transformers import AutoModelForCausalLM

    from ankus import load_model

    init = load_model("tiny-llama")[0].state_dict()
    merged = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert torch.equal(merged["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], init["model.norm.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           init["model.layers.0.self_attn.q_proj.weight"])


def test_sft_randomwalks_recipe_samples_legal_walks(tmp_path):
    """The shipped recipe, shortened: after training, most sampled walks are legal (every step an
    edge of the graph); the untrained model's samples are not walks at all."""
    assert main(["train", "sft_randomwalks", f"run.out_dir={tmp_path}", "trainer.total_steps=100",
                 "eval.samples_per_prompt=3", "run.save_model=false", "run.progress=false"]) == 0
    final = _final(tmp_path / "sft_randomwalks")
    print({k: v for k, v in final.items() if k.startswith("eval/")})
    assert final["eval/legal_fraction_before"] < 0.05
    assert final["eval/legal_fraction"] >= 0.5  # the full 200-step recipe: 0.81
    assert final["eval/optimality"] > final["eval/optimality_before"]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    assert main(["train", "rm_synthetic", f"run.out_dir={out}", "run.progress=false"]) == 0
    return out / "rm_synthetic"


def test_rm_synthetic_reaches_90_percent_held_out(rm_run):
    final = _final(rm_run)
    print("held-out pairwise accuracy:", final["eval/accuracy"])
    assert final["eval/accuracy"] >= 0.9
    assert read_metrics(rm_run)[0]["eval/accuracy"] <= 0.7  # before training: chance level
    meta = json.loads((rm_run / "model" / "reward_head.json").read_text())
    assert meta["eval_accuracy"] == pytest.approx(final["eval/accuracy"])


def test_trained_reward_model_as_reward_fn(rm_run):
    from ankus.rewards.model import reward_model_fn
    from ankus.trainers.reward_model import synthetic_preferences

    _, held_out = synthetic_preferences(n_train=2000, n_eval=200, seed=0)  # the recipe's held-out pairs
    held_out = held_out[:100]
    reward_fn = reward_model_fn(rm_run)
    prompts = [r["prompt"] for r in held_out]
    chosen = reward_fn(samples=[p + r["chosen"] for p, r in zip(prompts, held_out)], prompts=prompts,
                       outputs=[r["chosen"] for r in held_out])
    rejected = reward_fn(samples=[p + r["rejected"] for p, r in zip(prompts, held_out)], prompts=prompts,
                         outputs=[r["rejected"] for r in held_out])
    assert len(chosen) == 100 and all(isinstance(x, float) for x in chosen)
    wins = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    print("reward_model_fn prefers chosen on", wins, "of held-out pairs")
    assert wins >= 0.9
    negated = [i for i, r in enumerate(held_out) if r["negated"]]
    assert sum(chosen[i] > rejected[i] for i in negated) / len(negated) >= 0.8  # "not dull" > "not brilliant"


def test_trained_reward_model_drives_a_short_ppo_run(rm_run, tmp_path):
    """The trained reward model as the reward of PPO (one iteration, tiny policy): it runs, and the
    scores PPO logs are the reward model's (finite, standardised)."""
    import math

    from ankus.config import build
    from ankus.rewards.model import reward_model_fn
    from ankus.trainers import ppo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Review the plot.\nReview the music.\nReview the cast.\nReview the twist.\n")
    cfg = build(ppo.Config, {
        "model": {"spec": "tiny-llama"},
        "data": {"prompts": str(prompts), "eval_prompts": str(prompts), "num_eval": 4},
        "generation": {"max_new_tokens": 6, "chat_template": False},
        "method": {"num_rollouts": 8, "chunk_size": 8, "ppo_epochs": 1, "reference": "copy",
                   "num_layers_unfrozen": -1},
        "trainer": {"batch_size": 8, "total_steps": 1},
        "run": {"out_dir": str(tmp_path), "name": "ppo", "progress": False, "save_model": False}})
    summary = ppo.train(cfg, reward_fn=reward_model_fn(rm_run))
    rows = read_metrics(tmp_path / "ppo")
    assert rows and math.isfinite(rows[0]["reward/mean"])
    assert math.isfinite(summary["score_before"]) and math.isfinite(summary["score_after"])
