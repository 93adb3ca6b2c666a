"""Evaluation tasks on a model whose answers are known: a tiny Llama whose output head ignores the
hidden state (zero weight) and carries a hand-set bias, so every next-token distribution is
softmax(bias) and every metric is computable by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ankus.cli import main
from ankus.evals import goal_reach as gr
from ankus.evals import implicature as imp
from ankus.evals import steering as st
from ankus.evals.common import TaskDataError, mean_se, read_task
from ankus.evals.lm import EvalLM, common_prefix

BIAS = 3.0


@pytest.fixture(scope="module")
def biased():
    """(EvalLM, the token id the head prefers): log p(tok) = BIAS - Z, any other token -Z."""
    from ankus.models.loading import load_model

    model, tok = load_model("tiny-llama")
    V = model.config.vocab_size
    yes = tok(" yes", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1
    head = nn.Linear(model.config.hidden_size, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[yes[0]] = BIAS
    model.lm_head = head
    model.eval()
    return EvalLM(model, tok, batch_size=3), yes[0]


def _z(V: int) -> float:
    return math.log(math.exp(BIAS) + V - 1)


def test_loglikelihood_hand_computed(biased):
    lm, _ = biased
    V = lm.model.config.vocab_size
    two = lm.tokenizer(" no way", add_special_tokens=False)["input_ids"]
    lps = lm.loglikelihood(["Is it?", "Is it?", "Other context here"], [" yes", " no", " no way"])
    assert lps[0] == pytest.approx(BIAS - _z(V), abs=1e-4)
    assert lps[1] == pytest.approx(-_z(V), abs=1e-4)
    assert lps[2] == pytest.approx(-len(two) * _z(V), abs=1e-4)
    greedy = [g for _, g in lm.score(["Is it?", "Is it?"], [" yes", " no"])]
    assert greedy == [True, False]


def test_shared_prefix_matches_plain_forward():
    """Rows with a long common prefix (cache run once, repeated) score as each row alone."""
    from ankus.models.loading import load_model

    model, tok = load_model("tiny-llama")
    shots = "Q: Are you hungry? A: I just ate. Meaning: no.\n" * 3
    ctx = [shots + f"Q: Is it {w}? A: Look outside. Meaning:" for w in ("raining", "sunny", "late")]
    conts = [" yes", " no", " maybe so"]
    C, K = [c for c in ctx for _ in conts], conts * len(ctx)
    batched = EvalLM(model, tok, batch_size=8).loglikelihood(C, K)
    alone = [EvalLM(model, tok).loglikelihood([c], [k])[0] for c, k in zip(C, K)]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 1


def test_implicature_accuracy_hand_computed(biased):
    """The model always prefers ' yes': an item is resolved iff its label is yes."""
    lm, _ = biased
    items, pool = imp.load_items()
    items = items[:4]  # labels yes, no, yes, no
    assert [i["implicature"] for i in items] == ["yes", "no", "yes", "no"]
    rows = imp.evaluate(lm, items, pool, templates=[0, 2], ks=[0, 1])
    assert [r["correct"] for r in rows] == [1, 0, 1, 0] * 4
    table = imp.summarize(rows)
    per_template = [r for r in table if r["template"] != "mean"]
    assert all(r["accuracy"] == 0.5 and r["se"] == pytest.approx(0.25) for r in per_template)
    assert all(r["prefers_yes"] == 1.0 for r in table)
    mean = [r for r in table if r["template"] == "mean"]
    assert [r["k"] for r in mean] == [0, 1]
    assert mean[0]["accuracy"] == 0.5 and mean[0]["template_std"] == 0.0
    assert mean[0]["se"] == pytest.approx(math.sqrt(1 / 3) / 2)  # items 1, 0, 1, 0


def test_implicature_data_and_prompts():
    items, pool = imp.load_items()
    assert len(items) >= 150 and len(pool) >= 5
    assert sum(i["implicature"] == "yes" for i in items) == len(items) // 2
    p = imp.build_prompt(items[0], 0, pool[:2])
    assert p.count("which means") == 3 and p.endswith("which means")
    assert len(imp.TEMPLATES) >= 4


def test_goal_reach_mirror_cancels_noun_preference(biased):
    """A head that prefers one noun gives that noun's scene +BIAS and its mirror -BIAS: mean 0."""
    lm, _ = biased
    item = {"id": "t", "agent": "Ann", "pronoun": "she", "object_a": "yes", "object_b": "cup", "place_a": "left",
            "place_b": "right", "thing": "toy train"}
    rows = gr.evaluate(lm, [item], conditions=["purposeful", "inanimate"], paraphrases=[0, 1])
    assert len(rows) == 4
    for r in rows:
        assert r["bias_a"] == pytest.approx(BIAS, abs=1e-4) and r["bias_b"] == pytest.approx(-BIAS, abs=1e-4)
        assert r["bias"] == pytest.approx(0.0, abs=1e-4)
    ctx, obj, loc = gr.scene(item, "accidental", 2, mirrored=True)
    assert (obj, loc) == (" cup", " yes") and "accidentally brushes against the cup" in ctx


def test_goal_reach_summary_hand_computed():
    rows = [{"condition": "c", "paraphrase": p, "id": i, "bias": b}
            for p, i, b in [(0, "a", 1.0), (1, "a", 3.0), (0, "b", -1.0), (1, "b", 1.0)]]
    (row,) = gr.summarize(rows)
    assert row["object_bias"] == pytest.approx(1.0)  # item means 2 and 0
    assert row["se"] == pytest.approx(1.0)  # std([2, 0]) / sqrt(2)
    assert row["object_pref_rate"] == 0.5 and row["sign_stable"] == 0.5
    assert row["bias_p0"] == 0.0 and row["bias_p1"] == 2.0
    assert row["paraphrase_std"] == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("kind,arg,text,ok", [
    ("all_caps", None, "HELLO THERE, 42!", True), ("all_caps", None, "HELLO there", False),
    ("lowercase", None, "hello there.", True), ("lowercase", None, "Hello", False),
    ("include_word", "banana", "A Banana split.", True), ("include_word", "banana", "bananas", False),
    ("max_words", 3, "one two three", True), ("max_words", 3, "one two three four", False),
    ("no_comma", None, "no commas here", True), ("no_comma", None, "a, b", False)])
def test_adherence_checks(kind, arg, text, ok):
    assert st.check({"check": kind, "arg": arg}, text) is ok


def test_rate_table_and_mean_se():
    rows = [{"guidance_scale": 1.0, "adheres": h, "response": "a b"} for h in (True, False, False, False)]
    (row,) = st.rate_table(rows, ["adheres"])
    assert row["adheres_rate"] == 0.25 and row["adheres_se"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)


def test_task_file_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "imp.jsonl"
    good = {"id": "a", "question": "Q?", "answer": "A.", "implicature": "yes", "split": "test"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "answer"}) + "\n")
    with pytest.raises(TaskDataError, match=r"line 2: missing field 'answer'"):
        read_task(path, imp.FIELDS)
    path.write_text(json.dumps(dict(good, implicature="maybe")) + "\n")
    with pytest.raises(TaskDataError, match=r"line 1: field 'implicature' must be one of"):
        imp.load_items(str(path))


def test_cli_bad_task_file_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "reach.jsonl"
    path.write_text(json.dumps({"id": "x", "agent": "A"}) + "\n")
    assert main(["eval", "goal-reach", "--model", "tiny-llama", "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 1" in err and "missing field 'pronoun'" in err
    assert main(["eval", "adherence", "--model", "tiny-llama", "--guidance-scale", "1,x", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv", [
    ["implicature", "--limit", "2", "--templates", "0,1", "--shots", "0,1"],
    ["goal-reach", "--limit", "2"],
    ["pink-elephants", "--limit", "2", "--max-new-tokens", "3", "--guidance-scale", "1,2", "--chat-template"],
    ["adherence", "--limit", "2", "--max-new-tokens", "3", "--guidance-scale", "1,2"]])
def test_cli_smoke(argv, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", *argv, "--model", "tiny-llama", "--out", str(out)]) == 0
    for name in ("rows.jsonl", "table.csv", "table.md"):
        assert (out / name).is_file()
    lines = (out / "table.csv").read_text().splitlines()
    assert len(lines) >= 3 and "se" in lines[0]


def test_steering_moves_scores_and_generations_alpha_zero_does_not():
    """A direction steers every forward of an EvalLM: alpha 0 scores and writes exactly as the
    unsteered model; alpha 8 changes the scores (batched as one by one); another model's direction
    is refused."""
    from ankus.generation.steering import Direction, DirectionMismatchError
    from ankus.models.loading import load_model

    model, tok = load_model("tiny-llama")
    hidden = model.config.hidden_size
    d = Direction(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), 1)
    C, K = ["Is it raining? Look outside. Meaning:"] * 2 + ["Are you hungry? I just ate. Meaning:"], [" yes", " no"] * 1 + [" no"]
    plain = EvalLM(model, tok)
    zero, steered = EvalLM(model, tok, direction=d, alpha=0.0), EvalLM(model, tok, direction=d, alpha=8.0, batch_size=1)
    assert zero.loglikelihood(C, K) == plain.loglikelihood(C, K)
    assert zero.generate(["Tell me"], max_new_tokens=6) == plain.generate(["Tell me"], max_new_tokens=6)
    moved = steered.loglikelihood(C, K)
    assert max(abs(a - b) for a, b in zip(moved, plain.loglikelihood(C, K))) > 1e-3
    assert EvalLM(model, tok, direction=d, alpha=8.0, batch_size=8).loglikelihood(C, K) == pytest.approx(moved, abs=1e-4)
    assert plain.loglikelihood(C, K) == plain.loglikelihood(C, K)  # the hook is gone after each call
    with pytest.raises(DirectionMismatchError):
        EvalLM(model, tok, direction=Direction(torch.randn(hidden + 1), 1), alpha=1.0)
