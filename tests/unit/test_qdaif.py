"""QDAIF: the MAP-Elites archive (non-uniform bins, QD score, coverage, save/load), the judge's
log-prob math, LMX prompts, the tiny-model pipeline through ``ankus qd run``, resume, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ankus.config import ConfigError, build
from ankus.pipelines.qd_archive import ArchiveError, Grid, GridMismatchError, QDArchive, bin_index, load_archive
from ankus.pipelines.qd_lm import JudgeError, judge, label_distribution, lmx_prompt, near_parents

GRID1 = Grid.make(["sentiment"], [[0.1, 0.5, 0.9]])  # bins [0, .1) [.1, .5) [.5, .9) [.9, 1]
GRID2 = Grid.make(["genre", "ending"], [[0.5], [0.2, 0.8]])  # 2 x 3 cells


# ---------------------------------------------------------------------------------------------
# archive


def test_non_uniform_bin_mapping():
    x = np.array([0.0, 0.05, 0.1, 0.3, 0.5, 0.89, 0.9, 0.99, 1.0])
    assert bin_index(GRID1, x[:, None])[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert bin_index(GRID2, np.array([[0.4, 0.1], [0.5, 0.5], [0.9, 0.95]])).tolist() == [[0, 0], [1, 1], [1, 2]]
    assert GRID1.shape == (4,) and GRID2.shape == (2, 3) and GRID2.cells == 6


def _hand_archive() -> QDArchive:
    a = QDArchive(GRID1)
    a.add(["a", "b"], [0.5, 0.2], np.array([[0.05], [0.3]]), iteration=1)
    a.add(["c", "d", "e"], [0.6, 0.9, 0.1], np.array([[0.35], [0.95], [0.97]]), iteration=2)
    return a


def test_archive_keeps_the_best_per_bin_qd_score_and_coverage_by_hand():
    a = _hand_archive()
    # bin 0: a (.5); bin 1: b (.2) replaced by c (.6); bin 2 empty; bin 3: d (.9) beats e (.1)
    assert [(e["bin"], e["text"], e["quality"]) for e in a.elites()] == [([0], "a", .5), ([1], "c", .6), ([3], "d", .9)]
    assert a.qd_score() == pytest.approx(0.5 + 0.6 + 0.9)
    assert a.coverage() == pytest.approx(3 / 4)
    assert np.allclose(a.grid_values(), [0.5, 0.6, np.nan, 0.9], equal_nan=True)
    b = QDArchive(GRID2)
    b.add(["x", "y", "z"], [0.3, 0.4, 0.8], np.array([[0.1, 0.1], [0.9, 0.5], [0.95, 0.6]]))
    assert b.qd_score() == pytest.approx(0.3 + 0.8) and b.coverage() == pytest.approx(2 / 6)
    assert [e["bin"] for e in b.elites()] == [[0, 0], [1, 1]]


def test_archive_save_load_roundtrip_and_named_errors(tmp_path):
    a = _hand_archive()
    a.save(tmp_path)
    meta = json.loads((tmp_path / "archive_meta.json").read_text())
    assert meta["shape"] == [4] and meta["ticks"] == [[0.1, 0.5, 0.9]] and meta["measures"] == ["sentiment"]
    b = load_archive(tmp_path, GRID1)
    assert b.elites() == a.elites() and b.qd_score() == a.qd_score()
    with pytest.raises(GridMismatchError, match="ticks"):
        load_archive(tmp_path, Grid.make(["sentiment"], [[0.2, 0.5, 0.9]]))
    with pytest.raises(GridMismatchError, match="measures"):
        load_archive(tmp_path, GRID2)
    lines = (tmp_path / "archive.jsonl").read_text().splitlines()
    (tmp_path / "archive.jsonl").write_text(lines[0].replace('"bin": [0]', '"bin": [2]') + "\n")
    with pytest.raises(ArchiveError, match="line 1"):
        load_archive(tmp_path, GRID1)
    (tmp_path / "archive.jsonl").write_text("{not json\n")
    with pytest.raises(ArchiveError, match="malformed"):
        load_archive(tmp_path, GRID1)
    with pytest.raises(ArchiveError, match="metadata"):
        load_archive(tmp_path / "nowhere", GRID1)


# ---------------------------------------------------------------------------------------------
# judge math and prompts


def test_label_distribution_by_hand():
    top = {" yes": math.log(0.5), "Yes": math.log(0.1), " no": math.log(0.2), "maybe": math.log(0.2)}
    # yes = .5 + .1 = .6, no = .2 -> P(yes) = .6 / .8 = .75
    assert label_distribution(top, ["yes", "no"]) == pytest.approx([0.75, 0.25])
    assert label_distribution({" no": -1.0}, ["yes", "no"]) == pytest.approx([0.0, 1.0])
    with pytest.raises(JudgeError, match="none of the labels"):
        label_distribution({" maybe": -0.1, "The": -2.0}, ["yes", "no"])


class FakeJudge:
    """Top-k answers by question: quality prompts say 'Q', sentiment prompts say 'S'."""

    def top_logprobs(self, prompts, k, chat_template, batched, prefixes):
        assert prefixes == ["Answer:", "Sentiment:"] * (len(prompts) // 2)
        return [{" yes": math.log(0.3), " no": math.log(0.1)} if p.startswith("Q") else
                {" positive": math.log(0.2), " negative": math.log(0.6), "x": -0.1} for p in prompts]


def test_judge_scores_each_text_for_each_question():
    qs = [{"prompt": "Q {text}", "labels": ["yes", "no"], "prefix": "Answer:"},
          {"prompt": "S {text}", "labels": ["positive", "negative"], "prefix": "Sentiment:"}]
    scores = judge(FakeJudge(), ["a", "b", "c"], qs, k=5, chat_template=True)
    assert scores.shape == (3, 2) and np.allclose(scores, [[0.75, 0.25]] * 3)


def test_lmx_prompt_and_near_parents():
    assert lmx_prompt(["a ", "b"], "H:\n", "\n###\n") == "H:\na\n###\nH:\nb\n###\nH:\n"
    elites = [{"bin": [i], "text": f"t{i}"} for i in (0, 1, 2, 9, 10)]
    rng, seen = np.random.default_rng(0), set()
    for _ in range(40):
        parents = near_parents(elites, 3, 1, rng)
        seen.add(parents[0])
        if parents[0] == "t1":  # both neighbours lie within radius 1
            assert set(parents[1:]) == {"t0", "t2"}
        if parents[0] == "t9":  # one neighbour within the radius, then the nearest beyond it
            assert parents[1:] == ["t10", "t2"]
    assert seen == {"t0", "t1", "t2", "t9", "t10"}


def test_heatmaps_1d_and_2d(tmp_path):
    from ankus.pipelines.qd_plots import plot_heatmap

    b = QDArchive(GRID2)
    b.add(["x", "y"], [0.3, 0.8], np.array([[0.1, 0.1], [0.95, 0.6]]))
    assert np.allclose(b.grid_values(), [[0.3, np.nan, np.nan], [np.nan, 0.8, np.nan]], equal_nan=True)
    for name, archive in (("one.png", _hand_archive()), ("two.png", b)):
        assert plot_heatmap(archive, tmp_path / name).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# the tiny-model pipeline


@pytest.fixture(scope="module")
def tiny_lm():
    from ankus.chat import LocalChat
    from ankus.models.loading import load_model
    from ankus.pipelines.qd_lm import LocalLM

    model, tok = load_model("tiny-llama")
    return LocalLM(LocalChat(model=model, tokenizer=tok))


def test_local_judge_forward_matches_unpadded_rows(tiny_lm):
    prompts, prefixes = ["Is this good? x", "A much longer prompt, is this one good too?"], ["Answer:", ""]
    batched = tiny_lm.top_logprobs(prompts, 5, True, True, prefixes)
    single = tiny_lm.top_logprobs(prompts, 5, True, False, prefixes)
    for b, s, p, x in zip(batched, single, prompts, prefixes):
        ids = torch.tensor([tiny_lm.encode(p, True, x)])
        with torch.no_grad():
            ref = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, -1], -1).topk(5)
        assert list(b) == list(s) == [tiny_lm.tokenizer.decode([int(t)]) for t in ref.indices]
        assert np.allclose(list(b.values()), ref.values.numpy(), atol=1e-4)


def _tiny_cfg(tmp: Path, recipe: str | None = None, **search):
    from ankus.config import read_yaml
    from ankus.pipelines.qdaif import Config
    from ankus.recipes import resolve_recipe

    data = read_yaml(resolve_recipe(recipe)) if recipe else {}
    return build(Config, data, {"lm.spec": "tiny-llama", "judge.top_logprobs": 100000, "mutation.max_new_tokens": 4,
                                "mutation.seeds": ["I like beans.", "Kale is bad.", "Peas!"],
                                "search.iterations": 2, "search.batch_size": 2,
                                **{f"search.{k}": v for k, v in search.items()},
                                "run.out_dir": str(tmp / "runs"), "run.name": "qd", "run.progress": False})


def test_resume_equals_uninterrupted(tmp_path, tiny_lm):
    from ankus.pipelines.qdaif import run_method

    cfg = _tiny_cfg(tmp_path, "qdaif_stories", iterations=3, init_iterations=1)  # 2-D grid, lmx_near
    assert cfg.search.mutation == "lmx_near" and len(cfg.judge.measures) == 2
    whole, h_whole = run_method("qdaif", cfg, tiny_lm, tiny_lm, tmp_path / "a", log=lambda s: None)
    run_method("qdaif", cfg, tiny_lm, tiny_lm, tmp_path / "b", log=lambda s: None, stop_after=1)  # "crash"
    resumed, h_res = run_method("qdaif", cfg, tiny_lm, tiny_lm, tmp_path / "b", resume=True, log=lambda s: None)
    assert resumed.elites() == whole.elites()
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(h_res) == drop(h_whole) and len(h_res) == 3


def test_cli_qd_run_smoke(tmp_path):
    from ankus.cli import main

    recipe = tmp_path / "qd.yaml"
    recipe.write_text(Path(__file__).resolve().parents[2].joinpath("src/ankus/recipes/qdaif_opinions.yaml").read_text())
    overrides = ["lm.spec=tiny-llama", "judge.top_logprobs=100000", "mutation.max_new_tokens=4",
                 "search.iterations=2", "search.batch_size=2", f"run.out_dir={tmp_path}", "run.name=qd"]
    assert main(["qd", "run", str(recipe), *overrides]) == 0
    run = tmp_path / "qd"
    with open(run / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["lm_calls"]) for r in rows] == [(m, c) for m in ("qdaif", "random", "fixed_few_shot",
                                                                             "quality_only") for c in ("2", "4")]
    assert (run / "curves.png").stat().st_size > 0 and (run / "qdaif" / "heatmap.png").stat().st_size > 0
    assert len((run / "qdaif" / "archive.jsonl").read_text().splitlines()) == int(rows[1]["elites"])
    # the judge's top-1 token is no label: a named, one-line error
    assert main(["qd", "run", str(recipe), *overrides[:-1], "run.name=qd2", "judge.top_logprobs=1",
                 "search.methods=[random]"]) == 2
    assert main(["qd", "run", str(recipe), *overrides[:-1], "run.name=qd3", "run.save_model=true"]) == 2


def test_config_errors(tmp_path):
    from ankus.pipelines.qdaif import check_config

    for bad in ({"search": {"methods": ["qdaif", "nope"]}}, {"lm": {"served_model": "x"}},
                {"judge": {"measures": []}}, {"search": {"mutation": "lmx"}, "mutation": {"near_radius": 5}},
                {"judge": {"spec": "http://127.0.0.1:1/v1"}}):  # an HTTP judge with chat_template: true
        cfg = _tiny_cfg(tmp_path)
        merged = build(type(cfg), {**{"lm": {"spec": "tiny-llama"}}, **bad})
        with pytest.raises(ConfigError):
            check_config(merged)
    with pytest.raises(JudgeError):  # a ConfigError, printed as one line by the CLI
        raise JudgeError("x")
    assert issubclass(JudgeError, ConfigError) and issubclass(GridMismatchError, ArchiveError)


@pytest.mark.parametrize("name", ["qdaif_opinions", "qdaif_stories"])
def test_shipped_recipes_build_and_check(name):
    from ankus.config import read_yaml
    from ankus.pipelines.qdaif import Config, check_config, grid_of
    from ankus.recipes import TRAINERS, resolve_recipe

    data = read_yaml(resolve_recipe(name))
    assert TRAINERS[data["algorithm"]] == "ankus.pipelines.qdaif"
    cfg = build(Config, data)
    check_config(cfg)
    assert grid_of(cfg).shape == ((20,) if name == "qdaif_opinions" else (10, 10))
