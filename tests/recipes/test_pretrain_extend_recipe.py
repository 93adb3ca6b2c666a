"""The context-extension recipes: pretrain_short's shape, and pretrain_extend run on a tiny model
trained at 32 tokens and extended to 128 (the chain of docs/long_context.md, in seconds)."""

import json
from pathlib import Path

from ankus.config import build, read_yaml
from ankus.data.corpus import build_corpus
from ankus.models.loading import load_model
from ankus.models.rope import rotary_modules, scale_rope
from ankus.recipes import resolve_recipe, run_recipe
from ankus.trainers.pretrain import Config


def test_the_shipped_recipes_extend_four_times():
    short = build(Config, read_yaml(resolve_recipe("pretrain_short")))
    ext = build(Config, read_yaml(resolve_recipe("pretrain_extend")))
    assert ext.rope.method == "yarn" and ext.rope.original_max == short.data.seq_length
    assert ext.data.seq_length == ext.rope.factor * ext.rope.original_max == 4 * short.data.seq_length
    assert ext.model.spec == "runs/pretrain_short/model" and ext.data.corpus == short.data.corpus


def test_pretrain_extend_on_a_tiny_model(tmp_path: Path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"d{i}.txt").write_text(" ".join(f"w{(i * 3 + j) % 30}" for j in range(400)) + "\n")
    build_corpus(str(texts), tmp_path / "corpus")
    common = [f"data.corpus={tmp_path / 'corpus'}", f"run.out_dir={tmp_path}", "run.progress=false",
              "data.val_fraction=0.2", "trainer.batch_size=2"]
    run_recipe("pretrain_tiny", overrides=[*common, "data.seq_length=32", "trainer.total_steps=2", "run.name=short"])
    run_recipe("pretrain_extend", overrides=[*common, f"model.spec={tmp_path / 'short' / 'model'}", "data.seq_length=128",
                                             "rope.original_max=32", "trainer.total_steps=2", "trainer.warmup_steps=1",
                                             "run.name=ext"])
    saved = tmp_path / "ext" / "model"
    rope = json.loads((saved / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 32)
    model, _ = load_model(str(saved))
    short, _ = load_model(str(tmp_path / "short" / "model"))
    scale_rope(short, "yarn", 4.0, 32)
    assert rotary_modules(model)[0].inv_freq.equal(rotary_modules(short)[0].inv_freq)
    metrics = [json.loads(line) for line in (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/val" in m for m in metrics)


def test_the_experiment_arms_change_only_the_scaling():
    """experiments/long_context.py control: the YaRN fine-tune, its unscaled control and linear s=4 are
    pretrain_extend with the same steps, lr, data and seed; only rope and the run's name differ."""
    import dataclasses
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "experiments" / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context_experiment", path)
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    recipe = read_yaml(resolve_recipe("pretrain_extend"))
    arms = {name: build(Config, recipe, overrides) for name, overrides in lc.ARMS.items()}
    assert {name: (c.rope.method, c.rope.factor) for name, c in arms.items()} == {
        "yarn": ("yarn", 4.0), "control": ("none", 1.0), "linear": ("linear", 4.0)}
    same = [dataclasses.replace(c, rope=arms["yarn"].rope, run=arms["yarn"].run) for c in arms.values()]
    assert all(c == same[0] for c in same)
    assert len({c.run.name for c in arms.values()}) == 3
