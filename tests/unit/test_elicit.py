"""Reverse-LM elicitation: token reversal, GCG's gradient, beam search by hand, budgets, the CLI."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ankus.audits.gcg import gcg_search, onehot_grad, sample_swaps, suffix_loss_from_onehot
from ankus.audits.prefix_search import (Budget, BudgetExceeded, SuffixTooLongError, check_context, random_best_of_n,
                                        reverse_beam, reverse_beam_search, reverse_best_of_n, score_prefixes)
from ankus.cli import main
from ankus.data.corpus import build_corpus, load_corpus
from ankus.data.io import DataError
from ankus.data.reverse import reverse_corpus, reverse_document, reverse_tokens
from ankus.models.loading import load_model

WORDS = "the king and queen of love shall speak to thee my lord what is this night".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    import random

    root = tmp_path_factory.mktemp("elicit")
    r = random.Random(0)
    (root / "texts").mkdir()
    for i in range(10):
        (root / "texts" / f"doc{i}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(60)) + "\n")
    build_corpus(str(root / "texts"), root / "fwd", shard_tokens=300)
    return root / "fwd"


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama")
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# token reversal


def test_reverse_document_keeps_eos_last_and_round_trips():
    doc = np.array([5, 6, 7, 2])
    assert reverse_document(doc, eos=2).tolist() == [7, 6, 5, 2]
    assert reverse_document(reverse_document(doc, 2), 2).tolist() == doc.tolist()
    assert reverse_tokens([1, 2, 3]) == [3, 2, 1]
    assert reverse_tokens(torch.tensor([1, 2, 3])).tolist() == [3, 2, 1]
    with pytest.raises(DataError, match="EOS"):
        reverse_document(np.array([5, 6]), eos=2)


def test_reverse_corpus_round_trip(corpus_dir, tmp_path):
    fwd = load_corpus(corpus_dir)
    m = reverse_corpus(corpus_dir, tmp_path / "rev", shard_tokens=300)
    rev = load_corpus(tmp_path / "rev")
    assert m["reversed"] is True and m["reversed_from"] == fwd.manifest["content_hash"]
    assert m["tokenizer"] == fwd.manifest["tokenizer"]  # the pretrain trainer accepts it for the same model
    assert m["documents"] == fwd.manifest["documents"] and m["tokens"] == fwd.manifest["tokens"]
    for a, b in zip(fwd.documents, rev.documents):
        assert b.tolist() == a[:-1][::-1].tolist() + [a[-1]]
    reverse_corpus(tmp_path / "rev", tmp_path / "back", shard_tokens=300)
    back = load_corpus(tmp_path / "back")
    assert [d.tolist() for d in back.documents] == [d.tolist() for d in fwd.documents]
    assert back.manifest["reversed"] is False


def test_cli_data_reverse_from_text_dir(corpus_dir, tmp_path, capsys):
    texts = corpus_dir.parent / "texts"
    assert main(["data", "reverse", str(texts), "--out", str(tmp_path / "r"), "--shard-tokens", "300"]) == 0
    assert "reversed documents" in capsys.readouterr().out
    fwd = load_corpus(tmp_path / "r.forward")  # the forward corpus is kept beside it
    assert fwd.manifest["content_hash"] == load_corpus(corpus_dir).manifest["content_hash"]
    assert load_corpus(tmp_path / "r").documents[0][:-1].tolist() == fwd.documents[0][:-1][::-1].tolist()


# ---------------------------------------------------------------------------------------------
# GCG's gradient, by hand


def test_onehot_gradient_is_embedding_gradient_dot_product_and_finite_difference(tiny):
    model, _ = tiny
    model = model.double()
    try:
        prefix, suffix = torch.tensor([11, 300, 42]), torch.tensor([7, 19])
        grad = onehot_grad(model, prefix, suffix)  # (P, V)
        emb = model.get_input_embeddings().weight.detach()  # (V, d)
        # by hand: d loss / d (input embedding of prefix position i), then dot with every row of W
        x = torch.cat([emb[prefix], emb[suffix]])[None].clone().requires_grad_(True)
        logits = model(inputs_embeds=x).logits[0, 2:-1]
        loss = -torch.log_softmax(logits, -1).gather(-1, suffix[:, None]).sum()
        (g_x,) = torch.autograd.grad(loss, x)
        assert torch.allclose(grad, g_x[0, :3] @ emb.T, rtol=1e-9, atol=1e-12)
        # and a central finite difference along one one-hot coordinate (Llama's RMSNorm computes in
        # float32 even in a float64 model, so the step is large enough to sit above its rounding)
        onehot = torch.nn.functional.one_hot(prefix, emb.shape[0]).double()
        for i, v in ((0, 5), (2, 1000)):
            d = torch.zeros_like(onehot)
            d[i, v] = 1.0
            eps = 1e-2
            with torch.no_grad():
                fd = (suffix_loss_from_onehot(model, onehot + eps * d, suffix)
                      - suffix_loss_from_onehot(model, onehot - eps * d, suffix)) / (2 * eps)
            assert abs(float(grad[i, v])) > 0.01
            assert abs(float(fd) - float(grad[i, v])) < 1e-3
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
    finally:
        model.float()


def test_sample_swaps_change_one_position_to_a_top_k_allowed_token():
    grad = torch.tensor([[0.0, -3.0, -1.0, -2.0, 5.0], [1.0, 0.0, -4.0, -0.5, 2.0]])  # (P=2, V=5)
    allowed = torch.tensor([0, 1, 2, 4])  # token 3 excluded
    cands = sample_swaps(torch.tensor([4, 4]), grad, 50, topk=2, allowed=allowed,
                         generator=torch.Generator().manual_seed(0))
    top = {0: {1, 2}, 1: {2, 1}}  # by -grad among allowed: row 0 -> 1 (3.0), 2 (1.0); row 1 -> 2 (4.0), 1 (0.0)
    for c in cands.tolist():
        changed = [i for i in range(2) if c[i] != 4]
        assert len(changed) == 1 and c[changed[0]] in top[changed[0]]


# ---------------------------------------------------------------------------------------------
# beam search and scoring on hand-built bigram models


class Bigram(torch.nn.Module):
    """Next-token log-probs from the last token alone: logits[b, t] = log P[ids[b, t]]."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log(), requires_grad=False)
        self.config = SimpleNamespace(max_position_embeddings=16)

    def forward(self, input_ids=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


E = 1e-12  # token 3 = EOS, banned and (almost) never likely
REVERSE = Bigram([[0.3, 0.3, 0.4, E], [0.9, 0.05, 0.05, E], [0.5, 0.4, 0.1, E], [0.25, 0.25, 0.5, E]])
FORWARD = Bigram([[0.8, 0.1, 0.1, E], [0.1, 0.1, 0.8, E], [0.2, 0.2, 0.6, E], [0.3, 0.3, 0.4, E]])


def test_reverse_beam_finds_the_best_prefix_greedy_misses():
    # reverse LM after the suffix [2]: greedy 2 -> 0 (0.5) -> 2 (0.4) = 0.20; best 2 -> 1 (0.4) -> 0 (0.9) = 0.36
    prefixes, scores = reverse_beam(REVERSE, torch.tensor([2]), prefix_len=2, width=2, banned=[3])
    assert prefixes.tolist() == [[0, 1], [2, 0]]  # forward order: the reverse LM's [1, 0] flipped
    assert scores.tolist() == pytest.approx([math.log(0.36), math.log(0.20)], abs=1e-6)
    # the forward model ranks them by log p(suffix | prefix): p(2 | 1) = 0.8 > p(2 | 0) = 0.1
    budget = Budget(2)
    best = reverse_beam_search(FORWARD, REVERSE, torch.tensor([2]), 2, budget, banned=[3])
    assert best["prefix"].tolist() == [0, 1] and best["suffix_logprob"] == pytest.approx(math.log(0.8))
    assert budget.forward == 2 and budget.reverse == 1 + 2  # one beam at the first step, two at the second


def test_score_prefixes_by_hand():
    sc = score_prefixes(FORWARD, torch.tensor([[0, 1], [2, 0]]), torch.tensor([2, 2]))
    # [0, 1 | 2, 2]: p(2|1) p(2|2) = 0.8 * 0.6; prefix NLL = -log p(1|0) = -log 0.1
    assert sc["suffix_logprob"].tolist() == pytest.approx([math.log(0.8 * 0.6), math.log(0.1 * 0.6)])
    assert sc["prefix_nll"].tolist() == pytest.approx([-math.log(0.1), -math.log(0.2)])
    assert sc["elicited"].tolist() == [True, False]  # argmax after 0 is 0, not 2


# ---------------------------------------------------------------------------------------------
# budgets


def test_every_search_spends_exactly_its_budget(tiny):
    model, _ = tiny
    suffix, allowed, gen = torch.tensor([100, 200, 300]), torch.arange(50, 500), torch.Generator().manual_seed(0)
    b = Budget(64)
    r = gcg_search(model, suffix, allowed[:4], b, batch=15, topk=8, allowed=allowed, generator=gen)
    # 1 scored start + 3 x (1 gradient + 15) + (1 gradient + 14) = 64
    assert (b.forward, b.backward, r["steps"]) == (64, 4, 4)
    assert r["trace"] == sorted(r["trace"]) and r["suffix_logprob"] == r["trace"][-1]
    b = Budget(16)
    reverse_best_of_n(model, model, suffix, 4, b, banned=[0], generator=gen)
    assert (b.forward, b.reverse) == (16, 16 * 4)
    b = Budget(16)
    reverse_beam_search(model, model, suffix, 4, b, banned=[0])
    assert (b.forward, b.reverse) == (16, 1 + 16 * 3)
    b = Budget(16)
    random_best_of_n(model, suffix, 4, b, allowed, generator=gen)
    assert b.forward == 16
    with pytest.raises(BudgetExceeded):
        Budget(3).charge(4)


def test_suffix_longer_than_the_context_is_a_named_error(tiny):
    model, _ = tiny  # max_position_embeddings = 1024
    check_context(model, 8, 1016)
    with pytest.raises(SuffixTooLongError, match="longer than the forward model's context of 1024"):
        check_context(model, 8, 1017, "forward model")
    assert issubclass(SuffixTooLongError, DataError)


# ---------------------------------------------------------------------------------------------
# the command


def _args(corpus_dir, tmp_path, *extra):
    return ["audit", "elicit", "models.forward=tiny-llama", "models.reverse=tiny-llama",
            f"targets.corpus={corpus_dir}", "targets.n=2", "targets.suffix_len=3", "targets.val_fraction=0.2",
            "search.prefix_len=3", "search.budget=8", "search.gcg_batch=3", "search.gcg_topk=4",
            f"run.out_dir={tmp_path}", *extra]


def test_cli_smoke(corpus_dir, tmp_path, capsys):
    assert main(_args(corpus_dir, tmp_path, "run.name=e")) == 0
    run = tmp_path / "e"
    assert {"config.yaml", "results.jsonl", "summary.csv", "elicit.png"} <= {p.name for p in run.iterdir()}
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5
    for r in rows:
        assert r["forward_rows"] == (0 if r["method"] == "true_prefix" else 8)
        assert len(r["prefix_ids"]) == 3 and len(r["suffix_ids"]) == 3
    true = [r for r in rows if r["method"] == "true_prefix"]
    assert all(r["elicited"] for r in true)  # targets.source=model: the true prefix's greedy continuation
    header = (run / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("method,targets,elicitation_rate,suffix_logprob_per_token,prefix_nll")
    assert "reverse_beam" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(corpus_dir, tmp_path, capsys):
    assert main(_args(corpus_dir, tmp_path, "targets.suffix_len=1022", "run.name=bad")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: target suffix of 1022 tokens") and "Traceback" not in err
    assert main(_args(corpus_dir, tmp_path, "search.methods=[gcg,beam]", "run.name=bad2")) == 2
    assert "search.methods" in capsys.readouterr().err
