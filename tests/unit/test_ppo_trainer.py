"""The PPO trainer's wiring on tiny models: alignment of the training forward with generation,
every estimator and reference mode, and reward-function failures."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import ankus
from ankus import load_model
from ankus.models.heads import ValueHead
from ankus.rewards import RewardError
from ankus.runs import read_metrics
from ankus.rl.rollouts import policy_forward


def _recipe(tmp_path, **sections):
    base = {
        "algorithm": "ppo",
        "model": {"spec": "tiny-llama"},
        "trainer": {"total_steps": 2, "batch_size": 4},
        "method": {"num_rollouts": 8, "chunk_size": 8, "ppo_epochs": 1, "num_layers_unfrozen": 2},
        "generation": {"max_new_tokens": 6},
        "data": {"num_eval": 4},
        "run": {"out_dir": str(tmp_path), "name": "r", "progress": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return base


def length_reward(samples, prompts, outputs, **kw):
    return [len(o) / 10.0 for o in outputs]


def test_policy_forward_slices_the_response_positions():
    model, tok = load_model("tiny-llama", seed=2)
    head = ValueHead(model.config.hidden_size)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left padded
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    resp = torch.tensor([[20, 21, 22], [23, 24, 2]])
    ids, am = torch.cat([prompt, resp], 1), torch.cat([pmask, torch.ones_like(resp)], 1)
    logits, values, hidden = policy_forward(model, head, ids, am, n_resp=3, need_hidden_at=2)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    full = model(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True)
    # logits at position P-1+t predict response token t
    assert torch.allclose(logits, full.logits[:, 4:7], atol=1e-6)
    assert torch.allclose(values, head(full.hidden_states[-1][:, 4:7]), atol=1e-6)
    assert torch.equal(hidden, full.hidden_states[2])
    # the unpadded row equals a forward without padding
    alone = model(input_ids=ids[:1, 2:]).logits
    assert torch.allclose(logits[0], alone[0, 2:5], atol=1e-5)


@pytest.mark.parametrize("method", [
    {"estimator": "gae", "reference": "hydra"},
    {"estimator": "gae", "reference": "lora"},
    {"estimator": "gae", "reference": "copy", "num_layers_unfrozen": -1},
    {"estimator": "rloo", "samples_per_prompt": 4, "reference": "hydra"},
    {"estimator": "grpo", "samples_per_prompt": 4, "reference": "copy", "init_kl_coef": 0.1},
])
def test_every_estimator_and_reference_trains(tmp_path, method):
    before, _ = load_model("tiny-llama")
    lora = {"lora": {"enabled": True}} if method["reference"] == "lora" else {}
    result = ankus.train(_recipe(tmp_path, method=method, **lora), reward_fn=length_reward)
    run = tmp_path / "r"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "kl/mean", "kl/beta", "loss/pg", "policy/clipfrac", "policy/approx_kl",
                "policy/entropy", "perf/tokens_per_s"):
        assert math.isfinite(rows[-1][key]), key
    assert ("loss/vf" in rows[-1]) == (method["estimator"] == "gae")
    assert (run / "metrics.png").exists() and (run / "eval_before_after.csv").exists()
    after = AutoModelForCausalLM.from_pretrained(run / "model")
    changed = [n for n, p in after.named_parameters() if not torch.equal(p, before.state_dict()[n])]
    assert changed, "no parameter changed"
    if method.get("reference") == "hydra":
        # only the top 2 of 4 blocks (and the final norm) may move
        assert all(".layers.2." in n or ".layers.3." in n or n == "model.norm.weight" for n in changed), changed
        assert not any("embed" in n for n in changed)
    assert result["reference"] == method["reference"]


def test_reward_fn_that_raises_stops_with_batch_and_checkpoint(tmp_path):
    calls = {"n": 0}

    def broken(samples, prompts, outputs, **kw):
        calls["n"] += 1
        if calls["n"] > 1:  # the first call scores the held-out prompts before training
            raise KeyError("label")
        return [0.0] * len(samples)

    with pytest.raises(RewardError, match=r"raised on batch 0: KeyError") as e:
        ankus.train(_recipe(tmp_path), reward_fn=broken)
    assert "checkpoint-0" in str(e.value)
    assert (tmp_path / "r" / "checkpoint-0" / "model.safetensors").exists()


@pytest.mark.parametrize("bad,match", [
    (lambda n: [float("nan")] * n, "nan"),
    (lambda n: [1.0] * (n - 1), "length|expected"),
])
def test_bad_reward_values_name_the_batch(tmp_path, bad, match):
    calls = {"n": 0}

    def reward(samples, prompts, outputs, **kw):
        calls["n"] += 1
        return [0.0] * len(samples) if calls["n"] <= 1 else bad(len(samples))  # first call is the eval

    with pytest.raises(RewardError, match=f"(?i)batch 0.*({match})|({match}).*batch 0"):
        ankus.train(_recipe(tmp_path), reward_fn=reward)


def test_reward_failure_before_training_names_the_eval_batch(tmp_path):
    with pytest.raises(RewardError, match=r"raised on batch eval: ZeroDivisionError"):
        ankus.train(_recipe(tmp_path), reward_fn=lambda samples, **kw: [1 / 0 for _ in samples])


def test_grpo_needs_several_samples(tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        ankus.train(_recipe(tmp_path, method={"estimator": "grpo"}), reward_fn=length_reward)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox"])
def test_trunk_cache_gives_the_full_forward_and_its_gradients(spec):
    # Hydra's PPO steps run only the top blocks from the scoring forward's hidden state at the
    # split: logits, values and the trainable parameters' gradients equal a full forward's.
    from ankus.models.hydra import freeze_for_hydra
    from ankus.models.hydra import TrunkCache

    model, _ = load_model(spec, seed=3)
    freeze_for_hydra(model, 2)
    head = ValueHead(model.config.hidden_size)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left padded
    pmask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    resp = torch.tensor([[20, 21, 0], [23, 24, 2]])  # right padded
    ids = torch.cat([prompt, resp], 1)
    am = torch.cat([pmask, torch.tensor([[1, 1, 0], [1, 1, 1]])], 1)
    with torch.no_grad():
        _, _, hidden = policy_forward(model, head, ids, am, n_resp=3, need_hidden_at=2)
    trunk = TrunkCache(model, split_index=2)

    def grads(logits, values):
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        loss = logits.log_softmax(-1)[..., :50].sum() + values.pow(2).sum()
        return torch.autograd.grad(loss, params)

    full_logits, full_values, _ = policy_forward(model, head, ids, am, n_resp=3)
    cached_logits, cached_values = trunk.forward(head, hidden, am, n_resp=3)
    assert torch.allclose(cached_logits, full_logits, atol=1e-5)
    assert torch.allclose(cached_values, full_values, atol=1e-5)
    for a, b in zip(grads(full_logits, full_values), grads(cached_logits, cached_values)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_hydra_with_and_without_the_trunk_cache_train_alike(tmp_path):
    ends = []
    for cache in (True, False):
        method = {"estimator": "gae", "reference": "hydra", "cache_trunk": cache}
        ankus.train(_recipe(tmp_path / str(cache), method=method), reward_fn=length_reward)
        ends.append(AutoModelForCausalLM.from_pretrained(tmp_path / str(cache) / "r" / "model").state_dict())
    diff = max(float((ends[0][n] - ends[1][n]).abs().max()) for n in ends[0])
    assert diff < 1e-4, diff


def test_eval_summary_standard_errors_are_over_prompts_and_paired():
    from ankus.rl.heldout import eval_summary

    # 3 prompts x 2 samples; prompt means before 0, 0.5, 1 and after 0.5, 0.5, 2
    before = [{"prompt": p, "score": s} for p, s in
              [("a", -1.0), ("a", 1.0), ("b", 0.5), ("b", 0.5), ("c", 1.0), ("c", 1.0)]]
    after = [{"prompt": p, "score": s} for p, s in
             [("a", 0.0), ("a", 1.0), ("b", 0.0), ("b", 1.0), ("c", 2.0), ("c", 2.0)]]
    s = eval_summary(before, after)
    assert s["eval_prompts"] == 3 and s["eval_samples"] == 2
    assert s["score_before"] == pytest.approx(0.5) and s["score_after"] == pytest.approx(1.0)
    assert s["se_before"] == pytest.approx(math.sqrt(0.25 / 3))  # sample variance of 0, .5, 1 is .25
    assert s["se_after"] == pytest.approx(math.sqrt(0.75 / 3))  # of .5, .5, 2: (.25+.25+1)/2
    assert s["diff"] == pytest.approx(0.5)  # per-prompt changes .5, 0, 1
    assert s["se_diff"] == pytest.approx(math.sqrt(0.25 / 3))


def test_eval_samples_scores_each_held_out_prompt_k_times(tmp_path, capsys):
    ankus.train(_recipe(tmp_path, data={"num_eval": 3, "eval_samples": 2}, trainer={"total_steps": 1}),
                reward_fn=length_reward)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "r" / "eval_before_after.csv")))
    assert len(rows) == 6 and [r["sample"] for r in rows] == ["0", "1"] * 3
    assert "(3 prompts x 2 samples; s.e." in capsys.readouterr().out


def _grpo_runs(tmp_path, monkeypatch, ppo_epochs):
    """Two GRPO runs, the update's forward reused for the behaviour log-probs or not; their end
    parameters, metrics and whether each scoring phase ran the policy forward."""
    from ankus.rl import rollouts

    score = rollouts.score_rollouts
    calls: list[bool] = []

    def recording(*a, **k):
        calls.append(k.get("behaviour", True))
        return score(*a, **k)

    monkeypatch.setattr(rollouts, "score_rollouts", recording)
    ends, metrics, behaviour = [], [], []
    for reuse in (True, False):
        calls.clear()
        # one minibatch of all 8 rollouts; adaptive β, so the KL fed to the controller counts too
        method = {"estimator": "grpo", "samples_per_prompt": 2, "reference": "copy", "num_layers_unfrozen": -1,
                  "ppo_epochs": ppo_epochs, "init_kl_coef": 0.05, "target": 0.01, "horizon": 100,
                  "reuse_update_forward": reuse}
        ankus.train(_recipe(tmp_path / str(reuse), method=method, trainer={"batch_size": 8, "total_steps": 3}),
                    reward_fn=length_reward)
        ends.append(AutoModelForCausalLM.from_pretrained(tmp_path / str(reuse) / "r" / "model").state_dict())
        metrics.append(read_metrics(tmp_path / str(reuse) / "r" / "metrics.jsonl"))
        behaviour.append(list(calls))
    diff = max(float((ends[0][n] - ends[1][n]).abs().max()) for n in ends[0])
    return diff, metrics, behaviour


def test_grpo_one_update_reuses_its_forward_for_the_behaviour_logps(tmp_path, monkeypatch):
    # One epoch of one minibatch: the behaviour log-probs are the update's own forward, detached,
    # so the scoring phase runs only the reference; the run ends where the separate forward's does.
    diff, metrics, behaviour = _grpo_runs(tmp_path, monkeypatch, ppo_epochs=1)
    assert behaviour == [[False] * 3, [True] * 3]
    assert diff < 1e-6, diff
    for a, b in zip(*metrics):
        assert math.isclose(a["kl/mean"], b["kl/mean"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(a["kl/beta"], b["kl/beta"], rel_tol=1e-6)
        assert a["policy/ratio_mean"] == 1.0 and a["policy/approx_kl"] == 0.0  # exactly the current policy
        assert math.isclose(a["loss/kl"], b["loss/kl"], rel_tol=1e-5, abs_tol=1e-7)


def test_grpo_several_epochs_keep_the_separate_behaviour_forward(tmp_path, monkeypatch):
    # With ppo_epochs > 1 the later updates need the rollout-time log-probs: nothing changes.
    diff, metrics, behaviour = _grpo_runs(tmp_path, monkeypatch, ppo_epochs=2)
    assert behaviour == [[True] * 3, [True] * 3]
    assert diff == 0.0
    def untimed(row):
        return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/tokens"))}

    assert [untimed(r) for r in metrics[0]] == [untimed(r) for r in metrics[1]]


def test_rollout_bf16_samples_in_bf16_scores_and_evaluates_in_fp32(tmp_path, monkeypatch):
    """method.rollout_bf16: the rollouts' generate calls ask for bf16 linears, the held-out
    evaluation's do not; the behaviour log-probs still come from the fp32 scoring forward (the
    first update's ratio is 1 up to rounding), and training moves the parameters."""
    from ankus.rl import heldout, rollouts

    seen = {"rollouts": [], "heldout": []}
    for mod, key in ((rollouts, "rollouts"), (heldout, "heldout")):
        real = mod.generate

        def spy(model, tok, prompts, config, *a, _real=real, _key=key, **k):
            seen[_key].append(config.bf16)
            return _real(model, tok, prompts, config, *a, **k)

        monkeypatch.setattr(mod, "generate", spy)
    before, _ = load_model("tiny-llama")
    recipe = _recipe(tmp_path, method={"rollout_bf16": True, "reference": "copy"}, trainer={"batch_size": 8})
    ankus.train(recipe, reward_fn=length_reward)  # one minibatch: the update sees the behaviour policy itself
    assert seen["rollouts"] and all(seen["rollouts"]), seen
    assert seen["heldout"] and not any(seen["heldout"]), seen
    rows = read_metrics(tmp_path / "r")
    assert abs(rows[0]["policy/ratio_mean"] - 1.0) < 1e-5
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")
    assert any(not torch.equal(p, before.state_dict()[n]) for n, p in after.named_parameters())


def test_rollout_bf16_falls_back_to_fp32_with_a_warning_where_bf16_cannot_run(monkeypatch, caplog):
    from ankus.generation import onednn
    from ankus.generation.engine import GenerationConfig
    from ankus.rl.rollouts import rollout_config

    model, _ = load_model("tiny-llama")
    cfg = GenerationConfig(max_new_tokens=4)
    assert rollout_config(model, cfg, bf16=False) is cfg
    assert rollout_config(model, cfg, bf16=True).bf16 is True  # this CPU runs oneDNN's packed linears
    monkeypatch.setattr(onednn, "probe", lambda: (False, "no oneDNN here"))
    with caplog.at_level("WARNING", logger="ankus.rl"):
        assert rollout_config(model, cfg, bf16=True) is cfg
    assert "sampled in fp32" in caplog.text and "no oneDNN here" in caplog.text


def test_auto_rollout_precision_is_decided_once_and_kept_by_a_resumed_run(tmp_path, monkeypatch):
    """method.rollout_bf16=auto (the default) measures once, at the first iteration; the choice
    goes into the checkpoint, so a resumed run samples as the first did without measuring again."""
    from ankus.generation import onednn
    from ankus.rl import rollouts

    seen = []
    real = rollouts.generate

    def spy(model, tok, prompts, config, *a, **k):
        seen.append(config.bf16)
        return real(model, tok, prompts, config, *a, **k)

    monkeypatch.setattr(rollouts, "generate", spy)
    monkeypatch.setattr(rollouts, "fastest_path", lambda *a, **k: (onednn.PACKED_BF16, {}))
    ankus.train(_recipe(tmp_path, trainer={"total_steps": 1, "checkpoint_every": 1}), reward_fn=length_reward)
    assert seen == [True]
    monkeypatch.setattr(rollouts, "fastest_path", lambda *a, **k: pytest.fail("measured again after resuming"))
    ankus.train(_recipe(tmp_path, trainer={"total_steps": 2, "checkpoint_every": 1}), reward_fn=length_reward,
                resume=True)
    assert seen == [True, True]
