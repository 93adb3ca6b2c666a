"""ReLoRA in the pretrain trainer, and re-warming as a continued pretraining run."""

import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ankus.cli import run_recipe
from ankus.config import ConfigError, build
from ankus.data.corpus import build_corpus
from ankus.runs import read_metrics

WORDS = "the cat sat on a mat and dog ran far away from home to see what is there".split()
OTHER = "thou art wherefore doth hath sweet prince my lord good night fair kind gentle".split()


def _corpus(root: Path, words: list[str], seed: int) -> Path:
    r = random.Random(seed)
    (root / "texts").mkdir(parents=True)
    for i in range(12):
        (root / "texts" / f"d{i:02d}.txt").write_text(" ".join(r.choice(words) for _ in range(80 + 10 * i)))
    build_corpus(str(root / "texts"), root / "corpus")
    return root / "corpus"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("relora")
    return _corpus(root / "a", WORDS, 0), _corpus(root / "b", OTHER, 1)


RELORA = ["relora.enabled=true", "relora.r=4", "relora.alpha=8", "relora.reset_every=2", "relora.restart_warmup=2",
          "trainer.lr_schedule=cosine", "trainer.warmup_steps=1", "trainer.total_steps=5",
          "trainer.checkpoint_every=1", "trainer.keep_last=0", "run.progress=false"]


def _peft_model(overrides):
    from ankus import load_model
    from ankus.models.relora import apply_relora
    from ankus.trainers.pretrain import Config

    cfg = build(Config, {"model": {"spec": "tiny-llama"}}, overrides)
    model, _ = load_model("tiny-llama")
    model, params, _ = apply_relora(model, cfg.relora, cfg.trainer)
    return model, params, cfg


def test_relora_run_trains_adapters_merges_and_saves_plain(tmp_path, corpora):
    from transformers import AutoModelForCausalLM

    from ankus.models.relora import lora_parameters, relora_step
    from ankus.optim import jagged, schedule_fn

    out = run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", *RELORA])
    run = Path(out["run_dir"])
    model, params, cfg = _peft_model(RELORA)
    lora = lora_parameters(model)
    assert out["trainable_params"] == sum(p.numel() for p in lora) > 0
    # (a) the optimizer holds the adapters only, and has state for every one of them
    opt_state = torch.load(run / "checkpoints" / "step-00000005" / "optimizer.pt", weights_only=True)
    assert len(opt_state["param_groups"][0]["params"]) == len(lora) == len(params)
    assert sorted(opt_state["state"]) == list(range(len(lora)))
    assert [tuple(opt_state["state"][i]["exp_avg"].shape) for i in range(len(lora))] == [tuple(p.shape) for p in lora]
    # (b) base weights are frozen between resets and change across one (the merge at step 2, taken before
    # the optimizer step 2, so between checkpoints step-2 and step-3)
    ck = {s: load_file(str(run / "checkpoints" / f"step-{s:08d}" / "model.safetensors")) for s in (1, 2, 3)}
    base = [k for k in ck[1] if k.endswith("base_layer.weight")]
    assert base and all(torch.equal(ck[1][k], ck[2][k]) for k in base)
    assert all(not torch.equal(ck[2][k], ck[3][k]) for k in base)
    # ... and the model's output right after a reset equals right before
    model.load_state_dict(ck[2], strict=False)
    model.eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert relora_step(model, opt, cfg.relora, 2, cfg.trainer.seed) == {"relora/restart": 1}
        after = model(input_ids=ids).logits
    assert not torch.equal(model.state_dict()[base[0]], ck[2][base[0]])
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(float(p.abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    # (c) LR: jagged cosine, by hand at the reset step and the one after
    rows = {r["step"]: r for r in read_metrics(run) if "lr" in r}
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4))  # warmup 1, total 5
    lr = cfg.trainer.lr
    assert rows[3]["lr"] == pytest.approx(lr * cosine(2) * 1 / 2)  # step 2 (logged as 3): reset, re-warm 1 of 2
    assert rows[4]["lr"] == pytest.approx(lr * cosine(3))
    assert rows[5]["lr"] == pytest.approx(lr * cosine(4) / 2)  # the second reset
    multiplier = jagged(schedule_fn(cfg.trainer), 2, 2)
    assert [rows[s + 1]["lr"] for s in range(5)] == pytest.approx([lr * multiplier(s) for s in range(5)])
    assert [r.get("relora/restart") for r in read_metrics(run) if "lr" in r] == [None, None, 1, None, 2]
    # (d) a plain transformers model, adapters merged: equal to the trained peft model
    saved = load_file(str(run / "model" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    hf = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    model.load_state_dict(load_file(str(run / "checkpoints" / "step-00000005" / "model.safetensors")), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_warm_start_trains_everything_then_adapters_only(tmp_path, corpora):
    args = [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", *RELORA, "relora.warm_start_steps=2",
            "relora.reset_every=3", "relora.restart_warmup=1"]
    run = Path(run_recipe("pretrain_tiny", args)["run_dir"])
    model, params, cfg = _peft_model(args)
    names = {id(p): n for n, p in model.named_parameters()}
    ck = {s: load_file(str(run / "checkpoints" / f"step-{s:08d}" / "model.safetensors")) for s in (1, 2, 3, 4)}
    embed = next(k for k in ck[1] if "embed_tokens" in k)
    assert not torch.equal(ck[1][embed], ck[2][embed])  # full rank: the embeddings train
    assert torch.equal(ck[3][embed], ck[4][embed])  # adapters only afterwards
    lora_b = next(k for k in ck[1] if "lora_B" in k)
    assert float(ck[2][lora_b].abs().sum()) == 0 < float(ck[3][lora_b].abs().sum())  # adapters off, then on
    state = torch.load(run / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    with_state = {names[id(params[i])] for i in state["state"]}
    assert with_state and all("lora_" in n for n in with_state)  # the full-rank moments were dropped
    first = torch.load(run / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert any("lora_" not in names[id(params[i])] for i in first["state"])


def test_relora_resumed_equals_uninterrupted(tmp_path, corpora):
    args = [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", *RELORA, "trainer.total_steps=6",
            "relora.warm_start_steps=1", "relora.prune=random", "relora.prune_ratio=0.5", "relora.dropout=0.1"]
    straight = Path(run_recipe("pretrain_tiny", [*args, "run.name=straight"])["run_dir"])
    for cut in (1, 3):  # at the switch to adapters; at a reset (both happen at the start of the resumed step)
        again = tmp_path / f"cut{cut}"
        shutil.copytree(straight, again)
        shutil.rmtree(again / "model")
        for ck in (again / "checkpoints").iterdir():
            if int(ck.name.split("-")[1]) > cut:
                shutil.rmtree(ck)
        run_recipe("pretrain_tiny", [*args, f"run.name=cut{cut}"], resume=True)
        a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(again / "model" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cut
        ra, rb = read_metrics(straight), read_metrics(again)
        assert [r["loss/train"] for r in ra if "loss/train" in r] == [r["loss/train"] for r in rb if "loss/train" in r]
        assert [r["step"] for r in rb if "loss/train" in r] == list(range(1, 7))


@pytest.mark.parametrize("override,field", [
    (["relora.reset_every=0"], "relora.reset_every"),
    (["relora.prune_ratio=1.5"], "relora.prune_ratio"),
    (["relora.prune_ratio=-0.1"], "relora.prune_ratio"),
    (["relora.r=0"], "relora.r"),
    (["relora.restart_warmup=5", "relora.reset_every=2"], "relora.restart_warmup"),
    (["relora.warm_start_steps=-1"], "relora.warm_start_steps"),
    (["trainer.fsdp=true"], "trainer.fsdp"),
])
def test_bad_relora_settings_are_named(tmp_path, corpora, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", "relora.enabled=true",
                                     "run.progress=false", *override])
    assert not (tmp_path / "pretrain_tiny").exists()  # refused before anything ran


def test_relora_fields_without_relora_are_refused(tmp_path, corpora):
    with pytest.raises(ConfigError, match=r"relora\.r is not used by the pretrain trainer"):
        run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", "relora.r=8"])


def test_rewarming_continues_from_the_weights_with_a_new_warmup(tmp_path, corpora):
    """Run A on corpus 1, then continue on corpus 2 from A's model/ with warm-up and cosine: the LR
    curve is the by-hand one and the first step's loss is A's model's loss on that step's rows."""
    import numpy as np

    from ankus import load_model
    from ankus.data.corpus import load_corpus
    from ankus.trainers.pretrain import batch_loss, epoch_rows, epoch_stream, make_rows, split_documents

    common = ["run.progress=false", f"run.out_dir={tmp_path}"]
    a = Path(run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", "run.name=A", *common])["run_dir"])
    b_args = [f"data.corpus={corpora[1]}", f"model.spec={a / 'model'}", "trainer.warmup_steps=3",
              "trainer.lr=2e-3", "trainer.lr_schedule=cosine", "trainer.total_steps=6", "trainer.min_lr_ratio=0.2",
              f"data.extra_val=[{corpora[0]}]", "run.name=B", *common]
    b = Path(run_recipe("pretrain_tiny", b_args)["run_dir"])
    rows = [r for r in read_metrics(b) if "lr" in r]
    by_hand = [2e-3 * (s + 1) / 3 if s < 3 else 2e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 3)))
               for s in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(by_hand)
    # the continued run starts from A's weights: its first loss is A's model's loss on B's first rows
    model, _ = load_model(str(a / "model"))
    corpus = load_corpus(corpora[1])
    train_ix, _ = split_documents(len(corpus.documents), 0.25, 0)
    n_rows = int(sum(len(corpus.documents[i]) for i in train_ix)) // 64
    tokens, starts = epoch_stream(corpus.documents, train_ix, 0 * 100003 + 0)
    first = make_rows(tokens, starts, epoch_rows(n_rows, 4, 0)[0], 64, False)
    with torch.no_grad():
        _, ce = batch_loss(model, first, 1.0, 0)
    assert rows[0]["loss/train"] == pytest.approx(float(ce) / int(first.loss_mask[:, 1:].sum()), rel=1e-5)
    # forgetting is measured on A's held-out documents, the same ones A's run validated on
    val_rows = [r for r in read_metrics(b) if "loss/val" in r]
    name = corpora[0].resolve().name
    assert all(np.isfinite(r[f"loss/val_{name}"]) for r in val_rows) and len(val_rows) >= 3
    a_val = [r for r in read_metrics(a) if "loss/val" in r][-1]["loss/val"]
    assert val_rows[-1][f"loss/val_{name}"] != pytest.approx(a_val, abs=1e-6)  # B's training moved it


def test_rewarm_recipe_continues_a_saved_model_with_its_own_warmup():
    from ankus.config import read_yaml
    from ankus.recipes import resolve_recipe
    from ankus.trainers.pretrain import Config

    data = read_yaml(resolve_recipe("pretrain_rewarm"))
    cfg = build(Config, data)
    stdlib = read_yaml(resolve_recipe("pretrain_stdlib"))
    assert cfg.model.spec == f"runs/{stdlib['run']['name']}/model" and cfg.trainer.warmup_steps > 0
    assert cfg.data.extra_val == [stdlib["data"]["corpus"]] and cfg.data.corpus != stdlib["data"]["corpus"]
    assert cfg.trainer.lr_schedule == "cosine" and cfg.trainer.seed == build(Config, stdlib).trainer.seed
    assert cfg.data.val_fraction == stdlib["data"]["val_fraction"]  # the same held-out stdlib documents


def test_a_validation_is_logged_even_off_the_log_cadence(tmp_path, corpora):
    run = Path(run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", "run.progress=false",
                                            "trainer.log_every=3", "method.eval_every=2", "trainer.total_steps=5",
                                            "run.save_model=false"])["run_dir"])
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss/val" in r] == [2, 4, 5]
    assert [r["step"] for r in rows if "loss/train" in r] == [2, 3, 4, 5]


def test_train_embeddings_trains_them_keeps_their_moments_and_saves_them(tmp_path, corpora):
    """relora.train_embeddings: the embeddings (and norms) train next to the adapters, a restart
    prunes the adapters' Adam moments only, and the merged model/ loads with the trained embeddings."""
    from transformers import AutoModelForCausalLM

    from ankus.models.relora import full_parameters, lora_parameters, relora_step

    args = [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", *RELORA, "relora.train_embeddings=true",
            "relora.prune=full"]
    out = run_recipe("pretrain_tiny", args)
    run = Path(out["run_dir"])
    model, params, cfg = _peft_model(args)
    lora, full = lora_parameters(model), full_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("embed_tokens" in names[id(p)] for p in full) and any("norm" in names[id(p)] for p in full)
    assert out["trainable_params"] == sum(p.numel() for p in lora + full) == sum(p.numel() for p in params)
    final = load_file(str(run / "checkpoints" / "step-00000005" / "model.safetensors"))
    embed = next(k for k in final if "embed_tokens" in k)
    assert not torch.equal(final[embed], model.state_dict()[embed])  # moved from the (same seeded) init
    hf = AutoModelForCausalLM.from_pretrained(run / "model")
    assert torch.equal(hf.get_input_embeddings().weight.detach(), final[embed])
    # a restart: the adapters' moments are zeroed (prune=full), the embeddings' kept as they were
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    kept = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in full}
    assert relora_step(model, opt, cfg.relora, 2, cfg.trainer.seed) == {"relora/restart": 1}
    assert all(float(opt.state[p]["exp_avg"].abs().sum()) == 0 for p in lora)
    assert all(torch.equal(opt.state[p][k], v) for p in full for k, v in kept[id(p)].items())


def test_without_train_embeddings_they_stay_frozen(tmp_path, corpora):
    from ankus.models.relora import full_parameters

    args = [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}", *RELORA]
    run = Path(run_recipe("pretrain_tiny", args)["run_dir"])
    model, _, _ = _peft_model(args)
    assert not any(p.requires_grad for p in full_parameters(model))
    final = load_file(str(run / "checkpoints" / "step-00000005" / "model.safetensors"))
    embed = next(k for k in final if "embed_tokens" in k)
    assert torch.equal(final[embed], model.state_dict()[embed])


def test_train_embeddings_without_relora_is_refused(tmp_path, corpora):
    with pytest.raises(ConfigError, match=r"relora\.train_embeddings is not used by the pretrain trainer"):
        run_recipe("pretrain_tiny", [f"data.corpus={corpora[0]}", f"run.out_dir={tmp_path}",
                                     "relora.train_embeddings=true"])


def test_warm_start_switch_keeps_the_embeddings_moments_with_train_embeddings():
    from ankus.models.relora import full_parameters, lora_parameters, relora_step

    model, params, cfg = _peft_model([*RELORA, "relora.train_embeddings=true", "relora.warm_start_steps=1"])
    opt = torch.optim.AdamW(params)
    for p in params:
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    full = {id(p) for p in full_parameters(model)}
    assert relora_step(model, opt, cfg.relora, 1, cfg.trainer.seed) == {"relora/restart": 0}
    assert {id(p) for p in opt.state} == full  # the adapted linears' moments dropped, the embeddings' kept
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == full | {id(p) for p in lora_parameters(model)}
