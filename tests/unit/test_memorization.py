"""k-extractability: scores by hand on a model built to follow a known token map, windows,
precision/recall, the named errors, and a smoke run through ``ankus.cli.main``."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from ankus.audits import memorization as mem
from ankus.cli import main
from ankus.config import ConfigError
from ankus.data.io import DataError
from ankus.models.loading import ModelLoadError, default_tokenizer

A, B, C, D = 100, 200, 300, 400
NEXT = {A: A, B: C, C: B, D: D}  # greedy continuation: A A A ..., B C B C ..., D D D ...


def successor_model(tok, successor: dict[int, int], max_positions: int = 1024):
    """A Llama whose next token depends on the current one only: attention and MLP outputs are
    zero, so the last hidden state is the (normalised) embedding of the current token; token i of
    ``successor`` embeds as basis vector i and the head maps basis vector i to ``successor[token]``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (tok_in, tok_out) in enumerate(successor.items()):
            model.model.embed_tokens.weight[tok_in, i] = 1.0
            model.lm_head.weight[tok_out, i] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return successor_model(tok, NEXT)


# four windows of 4 context + 4 continuation tokens, side by side (stride 8)
WINDOWS = [[D, D, D, A, A, A, A, A],  # A -> A A A A: all 4 match, 1.0
           [D, D, D, B, C, B, A, A],  # B -> C B C B: positions 0, 1 match, 0.5 (prefix 2)
           [D, D, D, A, A, D, A, D],  # A -> A A A A: positions 0, 2 match, 0.5 (prefix 1)
           [D, D, D, D, A, A, A, A]]  # D -> D D D D: none match, 0.0
SCORES, PREFIX = [1.0, 0.5, 0.5, 0.0], [4, 2, 1, 0]
SMALL = mem.MemorizationConfig(context=4, continuation=4, stride=8, batch_size=3)


def test_extractability_by_hand():
    gen = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [9, 2, 3, 4], [9, 9, 9, 9], [1, 9, 3, 9]])
    tgt = np.array([[1, 2, 3, 4]] * 5)
    score, prefix = mem.extractability(gen, tgt)
    assert score.tolist() == [1.0, 0.5, 0.75, 0.0, 0.5]
    assert prefix.tolist() == [4, 2, 0, 0, 1]


def test_windows_by_hand():
    docs = [("a", np.arange(10)), ("b", np.arange(3)), ("c", np.arange(100, 108))]
    cfg = mem.MemorizationConfig(context=2, continuation=2, stride=3)
    ws = mem.make_windows(docs, cfg)
    assert [(w.name, w.start) for w in ws] == [("a", 0), ("a", 3), ("a", 6), ("c", 0), ("c", 3)]
    assert ws[1].tokens.tolist() == [3, 4, 5, 6] and ws[4].tokens.tolist() == [103, 104, 105, 106]
    capped = mem.make_windows(docs, mem.MemorizationConfig(context=2, continuation=2, stride=3, max_windows=2))
    assert [(w.name, w.start) for w in capped] == [("a", 0), ("a", 3)]
    with pytest.raises(mem.NoWindowsError, match="longest of 3 documents has 10 tokens"):
        mem.make_windows(docs, mem.MemorizationConfig(context=8, continuation=4))


def test_scores_by_hand_through_the_engine(model, tok):
    docs = [("doc", np.array(sum(WINDOWS, [])))]
    rows = mem.audit(model, tok, mem.make_windows(docs, SMALL), SMALL)
    assert [r["score"] for r in rows] == SCORES
    assert [r["prefix_match"] for r in rows] == PREFIX
    assert [r["memorized"] for r in rows] == [True, False, False, False]
    assert rows[1]["generated_ids"] == [C, B, C, B] and rows[1]["target_ids"] == [C, B, A, A]


def test_default_32_plus_32_half_memorized(model, tok):
    """The paper's setting: 32 tokens of context, 32 generated; 16 of 32 reproduced = 0.5."""
    doc = [D] * 31 + [A] + [A] * 16 + [D] * 16  # context ends in A; greedy makes 32 A's
    full = [D] * 31 + [B] + [C, B] * 16  # greedy B -> C B C B ...: all 32 match
    rows = mem.audit(model, tok, mem.make_windows([("x", np.array(doc)), ("y", np.array(full))],
                                                  mem.MemorizationConfig()), mem.MemorizationConfig())
    assert [r["score"] for r in rows] == [0.5, 1.0]
    assert [r["prefix_match"] for r in rows] == [16, 32]


def test_precision_recall_by_hand():
    def rows(memorized):
        return [{"name": "d", "start": s, "score": 1.0 if s in memorized else 0.25} for s in range(0, 80, 8)]

    # predictor memorizes {0, 8, 16}; target {8, 16, 24, 32}: tp 2, precision 2/3, recall 2/4
    pr = mem.precision_recall(rows({0, 8, 16}), rows({8, 16, 24, 32}))
    assert (pr["tp"], pr["fp"], pr["fn"], pr["predicted"], pr["actual"]) == (2, 1, 2, 3, 4)
    assert pr["precision"] == pytest.approx(2 / 3) and pr["recall"] == 0.5
    none = mem.precision_recall(rows(set()), rows({8}))
    assert math.isnan(none["precision"]) and none["recall"] == 0.0
    assert mem.precision_recall(rows({8}), rows({8}), threshold=0.25)["precision"] == 1.0  # all windows at 0.25
    with pytest.raises(mem.MemorizationDataError, match="different windows"):
        mem.precision_recall(rows({8})[:5], rows({8}))


def test_named_errors(tok, tmp_path):
    short = successor_model(tok, NEXT, max_positions=16)
    with pytest.raises(mem.SequenceTooLongError, match="64 tokens exceed the model's context of 16"):
        mem.check_fits(short, mem.MemorizationConfig())
    assert issubclass(mem.SequenceTooLongError, ConfigError) and issubclass(mem.NoWindowsError, DataError)
    with pytest.raises(ConfigError, match="stride must be >= 1"):
        mem.check_config(mem.MemorizationConfig(stride=0))
    with pytest.raises(mem.MemorizationDataError, match="no such file"):
        mem.load_documents(tmp_path / "missing.jsonl", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 2]}\n{"words": "x"}\n')
    with pytest.raises(mem.MemorizationDataError, match=r"bad.jsonl:2: expected an object with 'tokens'"):
        mem.load_documents(bad, tok)
    from ankus.data.corpus import build_corpus
    from ankus.models.loading import letters_tokenizer

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("abc abc abc\n")
    build_corpus(str(tmp_path / "t"), tmp_path / "letters", tokenizer=letters_tokenizer())
    with pytest.raises(mem.MemorizationDataError, match="not the model's tokenizer"):
        mem.load_documents(tmp_path / "letters", tok)


def test_inputs_text_jsonl_and_corpus(tok, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello world")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "hello there", "name": "greet"}) + "\n"
                                            + json.dumps({"tokens": [5, 6, 7]}) + "\n")
    docs = mem.load_documents(tmp_path / "d", tok)
    assert [n for n, _ in docs] == ["a.txt", "greet", "b.jsonl:2"]
    assert docs[0][1].tolist() == tok("hello world", add_special_tokens=False)["input_ids"]
    assert docs[2][1].tolist() == [5, 6, 7]
    odd = tmp_path / "odd.jsonl"  # form feeds and line separators inside a row are not line breaks
    odd.write_text(json.dumps({"text": "a\x0cb\u2028c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(mem.load_documents(odd, tok)) == 1
    from ankus.data.corpus import build_corpus

    build_corpus(str(tmp_path / "d"), tmp_path / "corpus", tokenizer=tok)
    cdocs = mem.load_documents(tmp_path / "corpus", tok)
    assert [n for n, _ in cdocs] == ["a.txt"] and cdocs[0][1].tolist()[-1] == tok.eos_token_id


def test_checkpoint_weights_are_loaded(model, tok, tmp_path):
    from ankus.checkpoint import save_checkpoint
    from ankus.runs import save_hf_model

    save_hf_model(successor_model(tok, {A: B}), tok, tmp_path / "base")  # another map on disk
    save_checkpoint(tmp_path / "run", 7, modules={"model": model})
    loaded, _ = mem.load_audited_model(str(tmp_path / "base"), str(tmp_path / "run/checkpoints/step-00000007"), "cpu")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ModelLoadError, match="holds no model.safetensors"):
        mem.load_audited_model(str(tmp_path / "base"), str(tmp_path), "cpu")


def test_cli_smoke(model, tok, tmp_path, capsys):
    from ankus.runs import save_hf_model

    save_hf_model(model, tok, tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"tokens": sum(WINDOWS, []), "name": "doc"}) + "\n")
    out = tmp_path / "audit"
    rc = main(["audit", "memorization", "--model", str(tmp_path / "model"), "--data", str(data), "--context", "4",
               "--continuation", "4", "--stride", "8", "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert "1 of 4 windows memorized" in capsys.readouterr().out
    rows = mem.read_sequences(out)
    assert [r["score"] for r in rows] == SCORES
    table = list(csv.DictReader(open(out / "summary.csv")))
    assert table[-1]["name"] == "ALL" and float(table[-1]["mean_score"]) == 0.5 and table[-1]["memorized"] == "1"
    assert json.loads((out / "summary.json").read_text())["windows"] == 4
    assert (out / "histogram.png").stat().st_size > 1000
    # a window longer than the model's context: one line on stderr, exit status 2
    rc = main(["audit", "memorization", "--model", str(tmp_path / "model"), "--data", str(data), "--context", "1000",
               "--continuation", "100", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.splitlines()[-1]  # (after the weight-loading progress bar)
    assert rc == 2 and err.startswith("error: windows of 1000 context + 100 continuation = 1100 tokens exceed")


def test_recipe_builds():
    from ankus.config import build, read_yaml
    from ankus.recipes import resolve_recipe
    from ankus.trainers.pretrain import Config

    cfg = build(Config, read_yaml(resolve_recipe("audit_memorization")), ["model.spec=tiny-llama"])
    assert cfg.trainer.keep_last == 0 and cfg.trainer.checkpoint_every == 50 and cfg.data.seq_length == 64
