"""PPO's configuration is honest: the LR schedule (per iteration), grad_accum, the lora section,
and fields PPO cannot use raise; the rollout batch's row indexing."""

import math

import pytest
import torch
from test_ppo_trainer import _recipe, length_reward
from transformers import AutoModelForCausalLM

import ankus
from ankus.config import ConfigError, LoRAConfig
from ankus.rl.rollouts import Rollouts
from ankus.runs import read_metrics


def _end_state(tmp_path, name, **sections):
    ankus.train(_recipe(tmp_path / name, **sections), reward_fn=length_reward)
    run = tmp_path / name / "r"
    return AutoModelForCausalLM.from_pretrained(run / "model").state_dict(), read_metrics(run)


@pytest.mark.parametrize("method", [
    {"estimator": "gae", "reference": "hydra", "ppo_epochs": 2},
    {"estimator": "grpo", "samples_per_prompt": 4, "reference": "copy", "init_kl_coef": 0.1, "ppo_epochs": 2},
])
def test_grad_accum_two_gives_the_parameters_of_one(tmp_path, method):
    # one iteration: both runs see the same rollouts; 2 epochs x 2 minibatches of 4 = 4 optimizer
    # steps, each from 2 micro-batches of 2 rows or from the whole minibatch at once
    ends, metrics = {}, {}
    for accum in (1, 2):
        ends[accum], metrics[accum] = _end_state(tmp_path, f"accum{accum}", method=method,
                                                  trainer={"total_steps": 1, "grad_accum": accum})
    diff = max(float((ends[1][n] - ends[2][n]).abs().max()) for n in ends[1])
    assert diff < 1e-6, diff
    a, b = metrics[1][0], metrics[2][0]
    for key in ("loss/pg", "loss/total", "policy/entropy", "grad_norm", "reward/mean", "kl/mean"):
        assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a[key], b[key])
    assert a["policy/ratio_max"] == pytest.approx(b["policy/ratio_max"], abs=1e-6)


def test_grad_accum_changes_nothing_but_the_micro_batches(tmp_path):
    # a real change of settings moves the end point: the comparison above can fail
    one, _ = _end_state(tmp_path, "a", trainer={"total_steps": 1})
    other, _ = _end_state(tmp_path, "b", trainer={"total_steps": 1, "batch_size": 8})
    assert max(float((one[n] - other[n]).abs().max()) for n in one) > 1e-5


def test_lr_schedule_steps_once_per_iteration(tmp_path):
    # warm-up over 3 iterations: every optimizer step of iteration i runs at lr·(i+1)/3
    _, rows = _end_state(tmp_path, "warm", trainer={"total_steps": 4, "warmup_steps": 3, "lr": 3e-4})
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4], rel=1e-9)
    _, rows = _end_state(tmp_path, "cos", trainer={"total_steps": 3, "lr": 1e-3, "lr_schedule": "cosine",
                                                    "min_lr_ratio": 0.0})
    # half a cosine from 1 at iteration 0 to 0 at total_steps: 1, 0.75, 0.25
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 0.75e-3, 0.25e-3], rel=1e-9)


def test_lr_schedule_survives_resume(tmp_path):
    sections = {"trainer": {"total_steps": 2, "warmup_steps": 3, "lr": 3e-4, "checkpoint_every": 1}}
    ankus.train(_recipe(tmp_path, **sections), reward_fn=length_reward)
    again = _recipe(tmp_path, **{"trainer": {**sections["trainer"], "total_steps": 3}})
    ankus.train(again, reward_fn=length_reward, resume=True)
    rows = read_metrics(tmp_path / "r")
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 2e-4, 3e-4], rel=1e-9)


def test_lora_section_reaches_the_adapters(tmp_path, monkeypatch):
    from ankus.models import reference

    seen = []
    real = reference.apply_lora
    monkeypatch.setattr(reference, "apply_lora", lambda model, lora: seen.append(lora) or real(model, lora))
    ankus.train(_recipe(tmp_path, method={"reference": "lora"}, lora={"enabled": True, "r": 4, "alpha": 8},
                        trainer={"total_steps": 1}), reward_fn=length_reward)
    assert seen == [LoRAConfig(enabled=True, r=4, alpha=8)]


@pytest.mark.parametrize("sections,field", [
    ({"lora": {"enabled": True}}, "lora"),
    ({"lora": {"r": 4}, "method": {"reference": "copy"}}, "lora.r"),
    ({"method": {"reference": "lora"}}, "lora.enabled"),
    ({"trainer": {"grad_accum": 0}}, "trainer.grad_accum"),
    ({"warm_start": {"steps": 5}}, "warm_start.steps"),
])
def test_fields_ppo_cannot_use_raise(tmp_path, sections, field):
    with pytest.raises(ConfigError, match=f"{field}.*ppo|ppo.*{field}"):
        ankus.train(_recipe(tmp_path, **sections), reward_fn=length_reward)


def test_old_lora_keys_are_unknown(tmp_path):
    with pytest.raises(ValueError, match="lora_r"):
        ankus.train(_recipe(tmp_path, method={"reference": "lora", "lora_r": 4}), reward_fn=length_reward)


def test_rollouts_index_every_tensor_by_row():
    B, N = 5, 3
    batch = Rollouts(input_ids=torch.arange(B * 7).view(B, 7), attention_mask=torch.ones(B, 7, dtype=torch.long),
                     response_ids=torch.arange(B * N).view(B, N), mask=torch.ones(B, N), scores=torch.arange(B) * 1.0,
                     ref_logps=-torch.rand(B, N), values=torch.rand(B, N))
    idx = torch.tensor([4, 1])
    part = batch[idx]
    assert len(part) == 2 and part.n_resp == N
    assert part.scores.tolist() == [4.0, 1.0] and torch.equal(part.input_ids, batch.input_ids[idx])
    assert torch.equal(part.values, batch.values[idx]) and torch.equal(part.ref_logps, batch.ref_logps[idx])
    assert part.logps is None and part.hidden is None and part.advantages is None
    assert torch.equal(batch[1:3].response_ids, batch.response_ids[1:3])
    assert batch.gathered() is batch  # one process: nothing to gather
