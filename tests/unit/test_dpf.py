"""The Direct Principle Feedback pipeline: each step with scripted writers (exact bookkeeping),
the evaluation and the whole pipeline on a tiny model, and the HTTP path against a real
``ankus serve`` on loopback."""

from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch

from ankus.chat import HTTPChat, LocalChat
from ankus.config import ConfigError, build, read_yaml
from ankus.recipes import resolve_recipe
from ankus.data.assets import PinkElephantPair
from ankus.data.io import DataError, read_jsonl, write_jsonl
from ankus.generation.engine import GenerationConfig
from ankus.models.loading import load_model
from ankus.pipelines import dpf
from ankus.rewards.mentions import mentions

CITY = PinkElephantPair(domain="cities", x="New York City", x_aliases=("NYC",), y="Chicago", y_aliases=())
PHONE = PinkElephantPair(domain="phones", x="Nokia 3310", y="Motorola Razr")
GAME = PinkElephantPair(domain="board games", x="Gloomhaven", y="Spirit Island")


class Scripted:
    """A chat backend whose reply is ``script(conversation, attempt)``; records every call."""

    def __init__(self, script):
        self.script = script
        self.calls: list[dict] = []
        self.seen: dict[str, int] = {}

    def chat(self, conversations, config=None, negative=None):
        self.calls.append({"n": len(conversations), "config": config, "negative": negative})
        out = []
        for c in conversations:
            key = json.dumps(c)
            self.seen[key] = self.seen.get(key, 0) + 1
            out.append(self.script(c, self.seen[key]))
        return out


def last(conv) -> str:
    return conv[-1]["content"]


def test_clean_question():
    assert dpf.clean_question('A user might ask: "Is NYC safe at night?" and more') == "Is NYC safe at night?"
    assert dpf.clean_question("Question: Where is Chicago?\nsecond line") == "Where is Chicago?"
    assert dpf.clean_question("\n  'Why Rust?'  ") == "Why Rust?"


def test_question_conversation_is_few_shot():
    conv = dpf.question_conversation(CITY)
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant", "user"]
    assert "New York City (cities)" in last(conv)


def test_dialogues_keep_questions_naming_x_and_answers_breaking_the_principle():
    # city: question names X at the 2nd attempt; answers mention X at the 3rd attempt
    # phone: question never names X -> dropped_no_question
    # game: question fine; answer never mentions X -> dropped_no_violation
    def write(conv, attempt):
        if "New York City" in last(conv):
            return "What is there to do?" if attempt == 1 else 'A user asks: "What is fun in NYC?"'
        if "Nokia" in last(conv):
            return "What phone should I buy?"
        return "Is Gloomhaven worth it?"

    def answer(conv, attempt):
        assert conv[0]["role"] == "system" and conv[0]["content"].startswith("Do not mention")
        if "NYC" in last(conv):
            return "Go to Central Park in NYC." if attempt == 3 else "Chicago is lovely."
        return "Try Spirit Island."

    lm, answerer = Scripted(write), Scripted(answer)
    cfg = dpf.DialogueConfig(attempts=3)
    rows, stats = dpf.write_dialogues(lm, answerer, [CITY, PHONE, GAME], cfg, require_violation=True)
    assert stats == {"pairs": 3, "dropped_no_question": 1, "dropped_no_violation": 1, "dialogues": 1}
    (row,) = rows
    assert row["user"] == "What is fun in NYC?" and row["original"] == "Go to Central Park in NYC."
    assert row["system"] == "Do not mention New York City. Discuss Chicago instead."
    assert row["answer_attempts"] == 3 and row["x_aliases"] == ["NYC"]
    # only unresolved conversations are asked again: 3, then 2 (city, phone), then 1 (phone)
    assert [c["n"] for c in lm.calls] == [3, 2, 1]
    assert [c["n"] for c in answerer.calls] == [2, 2, 2]  # neither answer passes before attempt 3
    # the evaluation split keeps every question that names X and answers nothing
    rows, stats = dpf.write_dialogues(Scripted(write), Scripted(answer), [CITY, PHONE, GAME], cfg,
                                      require_violation=False)
    assert stats["dialogues"] == 2 and all("original" not in r for r in rows)


def _dialogue(pair, original):
    return {**dpf._pair_row(pair), "system": dpf.principle(pair, dpf.DialogueConfig().principle),
            "user": f"Tell me about {pair.x}.", "original": original}


def test_revision_drops_and_counts_and_builds_preferences():
    dialogues = [_dialogue(CITY, "NYC is great."), _dialogue(PHONE, "The Nokia 3310 is tough."),
                 _dialogue(GAME, "Gloomhaven is long."), _dialogue(PinkElephantPair("x", "Rust", "Go"), "Rust!")]

    def write(conv, attempt):
        if conv[-1]["content"].startswith("Principle"):
            return "It names the entity."
        about = re.search(r"that is about (.+?) instead", last(conv)).group(1)
        if about == "Chicago":  # the positive request for the city
            return "Chicago has deep-dish pizza." if attempt == 2 else "New York City, obviously."
        if about == "Motorola Razr":
            return "Nokia 3310 again."  # always mentions X -> dropped
        if about == "Spirit Island":
            return "It is a fine game."  # no Y -> dropped with require_y
        return ""  # empty -> dropped

    lm = Scripted(write)
    cfg = dpf.RevisionConfig(attempts=3, guidance_scale=2.0, require_y=True)
    rows, stats = dpf.critique_and_revise(lm, dialogues, cfg)
    assert stats == {"dialogues": 4, "kept": 1, "dropped_mentions_x": 1, "dropped_no_y": 1, "dropped_empty": 1}
    assert [r["kept"] for r in rows] == [True, False, False, False]
    assert rows[0]["revision"] == "Chicago has deep-dish pizza." and rows[0]["revision_attempts"] == 2
    assert [r["drop_reason"] for r in rows] == [None, "mentions_x", "no_y", "empty"]
    # CFG: the negative conversation asks for X and to avoid Y
    rev_call = lm.calls[1]
    assert rev_call["config"].guidance_scale == 2.0 and rev_call["negative"] is not None
    assert "about New York City instead" in last(rev_call["negative"][0])
    assert "never names Chicago" in last(rev_call["negative"][0])
    (pref,) = dpf.preference_rows(rows)
    assert pref == {"system": dialogues[0]["system"], "prompt": "Tell me about New York City.",
                    "chosen": "Chicago has deep-dish pizza.", "rejected": "NYC is great.", "x": "New York City",
                    "y": "Chicago"}
    # without require_y the Spirit Island revision is kept
    rows, stats = dpf.critique_and_revise(Scripted(write), dialogues, dpf.RevisionConfig(attempts=3, require_y=False,
                                                                                        guidance_scale=1.0))
    assert stats["kept"] == 2 and stats["dropped_no_y"] == 0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny-llama")


def test_response_nll_matches_a_full_forward(tiny):
    model, tok = tiny
    conv = [{"role": "user", "content": "Hi there"}]
    total, count = dpf.response_nll(model, tok, [conv, conv], ["Hello you", ""])
    prompt = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    resp = tok("Hello you", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    expect = -sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(resp))
    assert count == len(resp)  # the empty response adds nothing
    assert total == pytest.approx(expect, rel=1e-5)


def test_evaluate_table_and_determinism(tiny):
    model, tok = tiny
    base = LocalChat(model=model, tokenizer=tok, seed=0)
    dialogues = [_dialogue(CITY, ""), _dialogue(GAME, "")]
    cfg = dpf.EvalConfig(samples=2, max_new_tokens=6)
    responses, table = dpf.evaluate(base, base, dialogues, cfg)
    assert [r["system"] for r in table] == list(dpf.SYSTEMS)
    assert len(responses) == 4 * 2 * 2
    for row in table:
        mine = [r for r in responses if r["system"] == row["system"]]
        assert row["n"] == 4 and row["x_rate"] == sum(r["mentions_x"] for r in mine) / 4
        for r in mine:  # each response's flags are the detector's verdicts on its own text
            pair = (CITY, GAME)[r["dialogue"]]
            assert r["mentions_x"] == mentions(r["response"], pair.x_names)
            assert r["mentions_y"] == mentions(r["response"], pair.y_names)
        assert row["y_rate"] == sum(r["mentions_y"] for r in mine) / 4
        assert row["perplexity"] > 1 and math.isfinite(row["perplexity"])
    # the same seed gives the same responses; the base with and without DPF differ only by model
    again, _ = dpf.evaluate(base, None, dialogues, cfg)
    assert [r["response"] for r in again] == [r["response"] for r in responses if r["system"] != "DPF + principle"]
    same = [r["response"] for r in responses if r["system"] == "DPF + principle"]
    assert same == [r["response"] for r in responses if r["system"] == "base + principle"]
    text = dpf.format_table(table)
    assert "X mention rate" in text and "DPF + principle" in text


def test_recipe_builds_and_unknown_keys_raise():
    data = read_yaml(resolve_recipe("dpf_smollm2"))
    assert data.pop("algorithm") == "dpf"
    cfg = build(dpf.Config, data)
    assert cfg.revision.guidance_scale == 2.0 and cfg.dpo.beta == 0.1
    with pytest.raises(ConfigError, match="revision.attempt"):
        build(dpf.Config, data, ["revision.attempt=3"])


@pytest.mark.parametrize("override,field", [
    ("trainer.fsdp=true", "trainer.fsdp"), ("trainer.device=cuda", "trainer.device"),
    ("lm.served_model=big", "lm.served_model"), ("trainer.total_steps=5", None),
    ("lora.r=4", "lora.r"), ("method=x", None)])
def test_unused_settings_are_rejected_before_any_work(override, field):
    data = read_yaml(resolve_recipe("dpf_smollm2"))
    data.pop("algorithm")
    if override == "method=x":  # a section DPF does not have
        with pytest.raises(ConfigError, match="unknown key 'method'"):
            build(dpf.Config, data, [override])
        return
    cfg = build(dpf.Config, data, [override] + (["train.epochs=2"] if field is None else []))
    with pytest.raises(ConfigError, match=rf"{field or 'train.epochs'} is not used by the (dpf|dpo) trainer"):
        dpf.check_config(cfg)
    dpf.check_config(build(dpf.Config, data))  # the recipe itself sets nothing that is ignored


def test_whole_pipeline_from_user_data_on_a_tiny_model(tmp_path, tiny):
    """Bring-your-own data: the run directory already holds the step outputs, so `--resume`
    reads them, trains DPO on the tiny model and evaluates four systems."""
    run = tmp_path / "dpf_run"
    run.mkdir()
    pairs = [CITY, GAME]
    write_jsonl(run / "pairs_train.jsonl", [dpf._pair_row(p) for p in pairs])
    write_jsonl(run / "pairs_eval.jsonl", [dpf._pair_row(PHONE)])
    dialogues = [_dialogue(CITY, "NYC is great."), _dialogue(GAME, "Gloomhaven is long.")]
    write_jsonl(run / "dialogues_train.jsonl", dialogues)
    write_jsonl(run / "dialogues_eval.jsonl", [{k: v for k, v in _dialogue(PHONE, "").items() if k != "original"}])
    revisions = [{**d, "critique": "c", "revision": f"Let us talk about {d['y']}.", "kept": True} for d in dialogues]
    write_jsonl(run / "revisions.jsonl", revisions)
    cfg = build(dpf.Config, {
        "model": {"spec": "tiny-llama"}, "lm": {"spec": "tiny-llama"},
        "trainer": {"lr": 1e-3, "batch_size": 2}, "train": {"epochs": 2},
        "evaluation": {"max_new_tokens": 4, "samples": 2},
        "run": {"out_dir": str(tmp_path), "name": "dpf_run", "progress": False}})
    before = {k: v.clone() for k, v in load_model("tiny-llama")[0].state_dict().items()}
    summary = dpf.train(cfg, resume=True, log=lambda *_: None)
    prefs = read_jsonl(run / "preferences.jsonl")
    assert [p["rejected"] for p in prefs] == ["NYC is great.", "Gloomhaven is long."]
    assert summary["stats"]["dpo"]["steps"] == 2  # 2 epochs x 2 pairs / batch 2
    assert [r["system"] for r in summary["table"]] == list(dpf.SYSTEMS)
    trained = load_model(str(run / "dpo" / "model"))[0].state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before if k in trained)
    assert (run / "table.csv").read_text().splitlines()[0].startswith("system,n,x_rate")
    assert len(read_jsonl(run / "eval_responses.jsonl")) == 4 * 2


def test_no_surviving_pairs_is_a_clear_error(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for name in ("pairs_train", "pairs_eval"):
        write_jsonl(run / f"{name}.jsonl", [dpf._pair_row(CITY)])
    write_jsonl(run / "dialogues_train.jsonl", [_dialogue(CITY, "NYC.")])
    write_jsonl(run / "dialogues_eval.jsonl", [_dialogue(CITY, "")])
    write_jsonl(run / "revisions.jsonl", [{**_dialogue(CITY, "NYC."), "revision": "NYC", "kept": False}])
    cfg = build(dpf.Config, {"model": {"spec": "tiny-llama"}, "lm": {"spec": "tiny-llama"},
                             "run": {"out_dir": str(tmp_path), "name": "r"}})
    with pytest.raises(DataError, match="no preference pairs survived revision"):
        dpf.train(cfg, resume=True, log=lambda *_: None)


def test_read_pairs_names_bad_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"x": "A", "y": "B"}\n{"x": "C"}\n')
    with pytest.raises(DataError, match="line 2.*'y'"):
        dpf.read_pairs(path)
    path.write_text('{"x": "A", "y": "B", "x_aliases": "AA"}\n')
    with pytest.raises(DataError, match="x_aliases"):
        dpf.read_pairs(path)


def test_revision_over_http_against_a_real_server(tiny):
    """The pipeline's HTTP path: critique and revision written by `ankus serve` on loopback."""
    from ankus.serve import make_server

    model, tok = tiny
    srv = make_server(model, tok, "127.0.0.1", 0, name="tiny-llama", seed=0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        lm = HTTPChat(f"http://127.0.0.1:{srv.server_address[1]}/v1", workers=2)
        dialogues = [_dialogue(CITY, "NYC is great."), _dialogue(GAME, "Gloomhaven is long.")]
        cfg = dpf.RevisionConfig(attempts=2, critique_tokens=4, revision_tokens=4, guidance_scale=1.5)
        rows, stats = dpf.critique_and_revise(lm, dialogues, cfg)
        assert len(rows) == 2 and all(r["critique"] is not None for r in rows)
        dropped = stats["dropped_mentions_x"] + stats["dropped_no_y"] + stats["dropped_empty"]
        assert stats["kept"] + dropped == 2
        # greedy questions over HTTP equal the local backend's
        greedy = GenerationConfig(max_new_tokens=5, do_sample=False)
        convs = [dpf.question_conversation(p) for p in (CITY, GAME)]
        assert lm.chat(convs, greedy) == LocalChat(model=model, tokenizer=tok).chat(convs, greedy)
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def test_cli_pairs_step(tmp_path):
    from ankus.cli import main

    out = tmp_path / "p.jsonl"
    assert main(["dpf", "pairs", "--split", "eval", "--limit", "4", "--out", str(out)]) == 0
    rows = read_jsonl(out, required=("x", "y"))
    assert len(rows) == 4 and {r["split"] for r in rows} == {"eval"}


def test_lm_judge_parses_yes_no_and_reports_a_rate(tiny):
    replies = iter(["Yes, it does.", "no", "Maybe?"])
    judge = Scripted(lambda conv, attempt: next(replies))
    verdicts = dpf.judge_mentions(judge, ["NYC!", "Chicago.", "hm"], [CITY, CITY, CITY])
    assert verdicts == [True, False, None]
    echo = Scripted(lambda conv, a: last(conv))  # answers with the question itself: neither yes nor no
    assert dpf.judge_mentions(echo, ["x"], [CITY]) == [None]
    assert "mention New York City (also called NYC)? Answer yes or no." in next(iter(echo.seen))
    model, tok = tiny
    base = LocalChat(model=model, tokenizer=tok, seed=0)
    always_yes = Scripted(lambda conv, a: "yes")
    _, table = dpf.evaluate(base, None, [_dialogue(CITY, "")], dpf.EvalConfig(max_new_tokens=3), judge=always_yes)
    assert [r["judge_x_rate"] for r in table] == [1.0, 1.0, 1.0]
    assert "judge X rate" in dpf.format_table(table)
