"""Passkey trials and perplexity by length, on oracle and uniform models whose answers are known."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ankus import load_model
from ankus.evals.long_context import compare_scalings, passkey, passkey_ids, passkey_trial, perplexity_by_length, \
    window_nll

V = 49152  # the tiny-llama tokenizer's vocabulary: every token id is a valid index


class Uniform(nn.Module):
    """Equal logits for every token: loss log V everywhere."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=0, **_):
        T = input_ids.shape[1] if not logits_to_keep else logits_to_keep
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], T, V) + self.w)


class Oracle(Uniform):
    """Puts all its mass on the true next token of the sequence it was shown (a model that knows)."""

    def __init__(self, answer_ids):
        super().__init__()
        self.answer = answer_ids

    def forward(self, input_ids, logits_to_keep=0, **_):
        T = input_ids.shape[1]
        logits = torch.full((1, T, V), -1e4)
        nxt = torch.tensor(self.answer[1:] + [0])
        logits[0, torch.arange(T), nxt] = 0.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama")[1]


def test_passkey_layout(tok):
    for depth in (0.0, 0.5, 1.0):
        t = passkey_ids(tok, 300, depth, "48213")
        assert len(t.input_ids) == 300
        assert tok.decode(t.input_ids[t.key_start:]) == " 48213"
        text = tok.decode(t.input_ids[:t.key_start])
        assert text.count("48213") == 2 and text.endswith("The pass key is")
    head = tok.decode(passkey_ids(tok, 300, 0.0, "48213").input_ids[:60])
    assert "pass key is 48213" in head  # depth 0: right after the introduction
    with pytest.raises(ValueError, match="too short"):
        passkey_ids(tok, 40, 0.5, "12345")


def test_passkey_trial_on_known_models(tok):
    t = passkey_ids(tok, 200, 0.3, "90417")
    ok, logp = passkey_trial(Oracle(t.input_ids), t)
    assert ok and logp == pytest.approx(0.0, abs=1e-3)
    ok, logp = passkey_trial(Uniform(), t)
    K = len(t.input_ids) - t.key_start
    assert not ok and logp == pytest.approx(-K * math.log(V), rel=1e-6)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    rows = perplexity_by_length(Uniform(), list(range(40)), [8, 16], windows=2)
    assert [r["length"] for r in rows] == [8, 16]
    for r in rows:
        assert r["ppl"] == pytest.approx(V) and r["nll"] == pytest.approx(math.log(V))
    with pytest.raises(ValueError, match="too few"):
        perplexity_by_length(Uniform(), list(range(10)), [8], windows=2)


class Recording(Uniform):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, input_ids, logits_to_keep=0, **_):
        self.seen.append(input_ids[0].tolist())
        return super().forward(input_ids, logits_to_keep)


def test_every_length_scores_the_same_text():
    model = Recording()
    rows = perplexity_by_length(model, list(range(100)), [4, 8, 16], windows=2)
    assert [r["windows"] for r in rows] == [8, 4, 2]
    spans = [sum(model.seen[:8], []), sum(model.seen[8:12], []), sum(model.seen[12:], [])]
    assert spans == [list(range(32))] * 3  # the first 2 x 16 tokens, whatever the window length


def test_chunked_head_equals_the_full_logits(tok):
    """window_nll applies the head a chunk of rows at a time (no (n, V) logits): the same sum as
    the ordinary forward's full logits, for chunks that divide n or not; the head's output during
    the chunked forward is the hidden state (H wide), not logits (V wide)."""
    model, _ = load_model("tiny-llama")
    model.eval()
    ids = torch.tensor([tok.encode("def f(x):\n    return x * 2 + 1\n" * 8)[:50]])  # (1, 50)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]  # (49, V)
    full = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    for chunk in (1, 7, 49, 1024):
        assert window_nll(model, ids, chunk) == pytest.approx(full, rel=1e-5)
    hook.remove()
    assert set(widths) == {model.config.hidden_size}
    assert window_nll(model, ids, 0) == pytest.approx(full, rel=1e-6)  # 0: the full logits
    assert perplexity_by_length(model, ids[0].tolist(), [25], windows=2, chunk=4)[0]["nll"] == pytest.approx(
        perplexity_by_length(model, ids[0].tolist(), [25], windows=2, chunk=0)[0]["nll"], rel=1e-5)


def test_compare_scalings_runs_each_method_on_a_copy(tok):
    model, _ = load_model("tiny-llama")
    tokens = tok.encode("the quick brown fox jumps over the lazy dog " * 20)
    before = perplexity_by_length(model, tokens, [32], windows=2)
    rows = compare_scalings(model, ["none", "yarn", "dynamic-yarn"], 4.0, 16,
                            lambda m: perplexity_by_length(m, tokens, [32], windows=2))
    assert [r["method"] for r in rows] == ["none", "yarn", "dynamic-yarn"]
    assert rows[0]["nll"] == pytest.approx(before[0]["nll"], rel=1e-6)  # "none" is the model itself
    assert rows[1]["nll"] != pytest.approx(before[0]["nll"], rel=1e-6)
    assert perplexity_by_length(model, tokens, [32], windows=2) == before  # the model was not touched
    rows = passkey(model, tok, [120], trials=2)
    assert rows[0]["trials"] == 2 and 0.0 <= rows[0]["pass_rate"] <= 1.0 and rows[0]["key_logp"] < 0


# ---------------------------------------------------------------------------------------------
# ankus eval passkey | perplexity-by-length


def test_argument_parsing_and_checks():
    from ankus.evals.long_context import check_scaling_args, parse_lengths, parse_scalings

    assert parse_lengths("1024, 2048,") == [1024, 2048]
    for bad, msg in (("1k", "'1k' is not an integer"), ("", "empty"), ("0", "out of range"), ("1.5", "not an integer")):
        with pytest.raises(ValueError, match=msg):
            parse_lengths(bad)
    assert parse_scalings("yarn,none,yarn") == ["yarn", "none"]
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk'"):
        parse_scalings("none,ntk")
    assert check_scaling_args(["none", "yarn"], [512, 2048], None, 512) == 4.0  # default: longest / original
    assert check_scaling_args(["none"], [1024], None, 512) == 2.0
    with pytest.raises(ValueError, match="--factor must be > 1 for yarn"):
        check_scaling_args(["none", "yarn"], [512], 1.0, 512)
    with pytest.raises(ValueError, match="within the original context"):
        check_scaling_args(["linear"], [256, 512], None, 512)
    with pytest.raises(ValueError, match="4096 tokens is past the extended context of 2048"):
        check_scaling_args(["yarn"], [1024, 4096], 2.0, 1024)
    with pytest.raises(ValueError, match="past the extended context of 2048"):  # 'none' alone: up to 4x
        check_scaling_args(["none"], [4096], None, 512)


@pytest.mark.parametrize("argv,msg", [
    (["passkey", "--lengths", "1k"], "'1k' is not an integer"),
    (["passkey", "--lengths", "256", "--scalings", "none,ntk"], "unknown RoPE scaling 'ntk'"),
    (["passkey", "--lengths", "256", "--scalings", "yarn", "--factor", "1", "--original-max", "128"],
     "--factor must be > 1"),
    (["perplexity-by-length", "--lengths", "256,9000", "--scalings", "yarn", "--factor", "2", "--original-max", "128"],
     "past the extended context"),
    (["passkey", "--lengths", "20", "--scalings", "none"], "too short for a passkey trial"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, msg):
    from ankus.cli import main

    rc = main(["eval", *argv, "--model", "tiny-llama", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and msg in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_cli_passkey_and_perplexity_write_a_table_and_a_plot(tmp_path):
    import csv

    from ankus.cli import main

    assert main(["eval", "passkey", "--model", "tiny-llama", "--lengths", "128,256", "--scalings", "none,yarn",
                 "--original-max", "128", "--trials", "2", "--out", str(tmp_path / "pk")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pk" / "table.csv")))
    assert [(r["method"], r["length"], r["trials"], r["factor"]) for r in rows] == [
        ("none", "128", "2", "1.0"), ("none", "256", "2", "1.0"), ("yarn", "128", "2", "2.0"), ("yarn", "256", "2", "2.0")]
    assert all(0.0 <= float(r["pass_rate"]) <= 1.0 and float(r["key_logp"]) < 0 for r in rows)
    assert (tmp_path / "pk" / "passkey.png").stat().st_size > 0

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(" ".join(f"token{i % 97}" for i in range(800)))
    assert main(["eval", "perplexity-by-length", "--model", "tiny-llama", "--lengths", "64,128", "--scalings",
                 "none", "--corpus", str(texts), "--windows", "2", "--out", str(tmp_path / "pp")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pp" / "table.csv")))
    model, tok = load_model("tiny-llama")
    tokens = tok.encode((texts / "a.txt").read_text(), add_special_tokens=False) + [tok.eos_token_id]
    want = perplexity_by_length(model, tokens, [64, 128], windows=2)
    assert [float(r["ppl"]) for r in rows] == pytest.approx([w["ppl"] for w in want], rel=1e-5)
    assert (tmp_path / "pp" / "perplexity-by-length.png").exists()
