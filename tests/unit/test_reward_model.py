"""Reward-model trainer: the synthetic preference set, tokenization and read-out position,
packed == separate rewards, a short training run, and loading it back as a reward function."""

from __future__ import annotations

import json

import pytest
import torch

from ankus import load_model
from ankus.config import build
from ankus.data.batching import make_batch
from ankus.models.heads import ValueHead
from ankus.rewards.model import HEAD_FILE, META_FILE, reward_model_fn, sequence_rewards, tokenize_response
from ankus.trainers import reward_model as rm
from ankus.trainers.reward_model import _NEGATIVE, _POSITIVE, load_pairs, pair_rewards, synthetic_preferences

B, H, A, EOS = 82, 294, 253, 2  # SmolLM2 ids of 'b', ' h', ' a', '<|im_end|>'


def test_synthetic_pairs_differ_in_one_adjective_and_negation_flips():
    train, held_out = synthetic_preferences(n_train=400, n_eval=100, seed=7)
    assert (train, held_out) == synthetic_preferences(n_train=400, n_eval=100, seed=7)  # deterministic
    assert len(train) == 400 and len(held_out) == 100
    n_negated = 0
    for row in train + held_out:
        c, r = row["chosen"].rstrip(".").split(), row["rejected"].rstrip(".").split()
        diff = [(a, b) for a, b in zip(c, r) if a != b]
        assert len(c) == len(r) and len(diff) == 1
        (c_word, r_word), = diff
        negated = "not" in c
        assert negated == row["negated"]
        n_negated += negated
        # the chosen response *means* something positive
        if negated:
            assert c_word in _NEGATIVE and r_word in _POSITIVE
        else:
            assert c_word in _POSITIVE and r_word in _NEGATIVE
        assert row["prompt"].startswith("Review the ")
    assert 0.15 < n_negated / 500 < 0.35  # negation=0.25
    nouns = lambda rows: {r["prompt"][len("Review the "):-1] for r in rows}  # noqa: E731
    assert not nouns(train) & nouns(held_out)  # held-out nouns never seen in training


def test_tokenize_response_appends_eos_and_cuts_from_the_left():
    tok = load_model("tiny-llama")[1]
    ex = tokenize_response(tok, "b", " h a")
    assert ex.input_ids == [B, H, A, EOS] and ex.loss_mask == [0, 0, 0, 0]
    assert tokenize_response(tok, "b", " h a", max_length=2).input_ids == [A, EOS]  # the read-out EOS survives


@torch.no_grad()
def _naive_rewards(trunk, head, examples) -> list[float]:
    """One example at a time: the head on the last layer's hidden state at the last token."""
    out = []
    for ex in examples:
        hidden = trunk(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states[-1]
        out.append(float(head(hidden[:, -1:])[0, 0]))
    return out


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_packed_rewards_equal_separate(spec):
    trunk, tok = load_model(spec, seed=1)
    torch.manual_seed(0)
    head = ValueHead(64)
    texts = [("Review the plot.", " It was good."), ("b", " h a"), ("A longer prompt here, with words", " and a reply.")]
    examples = [tokenize_response(tok, p, r) for p, r in texts]
    expected = _naive_rewards(trunk, head, examples)
    with torch.no_grad():
        for mode in ("pack", "pad"):
            got = sequence_rewards(trunk, head, make_batch(examples, EOS, mode, 4096)).tolist()
            assert got == pytest.approx(expected, abs=1e-5), mode
        # pairs: chosen at even, rejected at odd positions of the flat batch
        c, r = pair_rewards(trunk, head, [(examples[0], examples[1]), (examples[2], examples[0])], EOS, "pack", 4096)
    assert c.tolist() == pytest.approx([expected[0], expected[2]], abs=1e-5)
    assert r.tolist() == pytest.approx([expected[1], expected[0]], abs=1e-5)


def test_jsonl_pairs_split_and_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(20)))
    train, held_out = load_pairs(rm.RMData(name=str(path), eval_fraction=0.25), seed=0)
    assert len(train) == 15 and len(held_out) == 5
    assert {r["prompt"] for r in train} | {r["prompt"] for r in held_out} == {f"p{i}" for i in range(20)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*rejected"):
        load_pairs(rm.RMData(name=str(bad)), seed=0)


def test_short_training_run_saves_a_loadable_reward_model(tmp_path):
    cfg = build(rm.Config, {"model": {"spec": "tiny-llama"},
                            "data": {"kwargs": {"n_train": 48, "n_eval": 16}},
                            "method": {"eval_every": 0},
                            "trainer": {"lr": 1e-3, "batch_size": 16, "total_steps": 3},
                            "run": {"out_dir": str(tmp_path), "name": "rm", "progress": False}})
    summary = rm.train(cfg)
    model_dir = tmp_path / "rm" / "model"
    assert (model_dir / HEAD_FILE).exists() and (model_dir / "config.json").exists()
    meta = json.loads((model_dir / META_FILE).read_text())
    assert meta["hidden_size"] == 64 and meta["eval_accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert meta["score_std"] > 0

    # the trunk moved away from its initialisation
    from transformers import AutoModelForCausalLM

    init = load_model("tiny-llama")[0].state_dict()
    trained = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])

    # reward_model_fn gives the trained model's scores: raw, and standardised with the stored stats
    _, held_out = synthetic_preferences(n_train=48, n_eval=16)
    prompts = [r["prompt"] for r in held_out[:4]]
    outputs = [r["chosen"] for r in held_out[:4]]
    raw = reward_model_fn(tmp_path / "rm", normalize=False)(samples=None, prompts=prompts, outputs=outputs)
    trunk, tok = load_model(str(model_dir))
    head = ValueHead(64)
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
    with torch.no_grad():
        expected = _naive_rewards(trunk, head, [tokenize_response(tok, p, o) for p, o in zip(prompts, outputs)])
    assert raw == pytest.approx(expected, abs=1e-5)
    norm = reward_model_fn(model_dir)(samples=None, prompts=prompts, outputs=outputs)
    assert norm == pytest.approx([(x - meta["score_mean"]) / meta["score_std"] for x in raw], abs=1e-5)


def test_reward_model_fn_refuses_a_directory_without_a_head(tmp_path):
    from ankus.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="no trained reward model"):
        reward_model_fn(tmp_path)
