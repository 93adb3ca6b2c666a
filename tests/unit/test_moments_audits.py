"""`ankus audit moments lm|image`: smoke runs through the CLI on tiny models, and the named errors."""

import csv
import random
from pathlib import Path

import pytest

from ankus.cli import main, run_recipe
from ankus.data.corpus import build_corpus

WORDS = "the cat sat on a mat and dog ran far away from home to see what is there".split()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moments")
    texts = root / "texts"
    texts.mkdir()
    r = random.Random(0)
    for i in range(12):
        (texts / f"doc{i:02d}.txt").write_text(" ".join(r.choice(WORDS) for _ in range(80 + 10 * i)) + "\n")
    build_corpus(str(texts), root / "corpus")
    out = run_recipe("pretrain_tiny", [f"data.corpus={root / 'corpus'}", f"run.out_dir={root}", "run.progress=false",
                                       "run.save_model=false", "trainer.total_steps=2", "method.eval_every=0",
                                       "method.snapshot_steps=[0,2]"])
    return Path(out["run_dir"]), root / "corpus"


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_moments_lm_smoke(tiny_run, tmp_path):
    run, corpus = tiny_run
    out = tmp_path / "lm"
    assert main(["audit", "moments", "lm", str(run), "--corpus", str(corpus), "--out", str(out), "--n-seqs", "3",
                 "--length", "16"]) == 0
    rows = _table(out / "table.csv")
    assert [int(r["step"]) for r in rows] == [0, 2]
    for r in rows:
        assert float(r["kl_unigram"]) >= 0 and float(r["kl_bigram"]) >= 0
        assert float(r["loss_unigram"]) > 0 and float(r["ref_bigram"]) < float(r["ref_unigram"])
    # training moves the model towards the corpus's unigram
    assert float(rows[-1]["kl_unigram"]) < float(rows[0]["kl_unigram"])
    assert (out / "moments_lm.png").stat().st_size > 0 and (out / "rows.jsonl").exists()


def test_moments_lm_named_errors(tiny_run, tmp_path, capsys):
    run, corpus = tiny_run
    from ankus.audits.moments_lm import CorpusTooShortError, MomentsLMConfig, NoSnapshotsError, run_moments_lm

    with pytest.raises(NoSnapshotsError, match="method.snapshot_steps"):
        run_moments_lm(MomentsLMConfig(run_dir=str(tmp_path), corpus=str(corpus), out=str(tmp_path / "o")))
    with pytest.raises(CorpusTooShortError, match="lower --length"):
        run_moments_lm(MomentsLMConfig(run_dir=str(run), corpus=str(corpus), out=str(tmp_path / "o"), length=100000))
    assert main(["audit", "moments", "lm", str(tmp_path), "--corpus", str(corpus), "--out", str(tmp_path / "o")]) == 2
    assert "no snapshots in" in capsys.readouterr().err
    assert main(["audit", "moments", "lm", str(run), "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--k", "0"]) == 2
    assert "--k > 0" in capsys.readouterr().err


def test_moments_image_smoke_and_bad_settings(tmp_path, capsys):
    import numpy as np

    from ankus.audits.moments_image import MomentsImageConfig, checkpoint_steps, load_digits_split, synthetic_sets

    out = tmp_path / "image"
    assert main(["audit", "moments", "image", "--out", str(out), "--steps", "30", "--checkpoints", "3",
                 "--samples", "5", "--arch", "cnn"]) == 0
    rows = _table(out / "table.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 30]
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in r if k != "step")
    assert (out / "moments_image.png").stat().st_size > 0
    assert checkpoint_steps(1000, 4) == [0, 1, 32, 1000]
    # OT-edited images of class 3 (the map fitted on the same images it moves) carry class 8's mean, and its
    # covariance up to the ridge the map also moves: A (S3 + rI) A = S8 + rI, so cov(moved) = S8 + rI - r A^2
    from ankus.audits.moments_math import gaussian_fit, gaussian_ot_map

    x_tr, x_te, y_tr, y_te = load_digits_split(0.25, 0)
    cfg = MomentsImageConfig(samples=3)
    sets = synthetic_sets(x_tr, y_tr, x_tr, y_tr, cfg)
    moved = sets["ot"][0][(sets["ot"][2] == 3) & (sets["ot"][1] == 8)]
    m8, s8 = gaussian_fit(x_tr[y_tr == 8], cfg.ridge)
    a, _ = gaussian_ot_map(*gaussian_fit(x_tr[y_tr == 3], cfg.ridge), m8, s8)
    mean, cov = gaussian_fit(moved)
    np.testing.assert_allclose(mean, m8, atol=1e-8)
    np.testing.assert_allclose(cov + cfg.ridge * a @ a, s8, atol=1e-8)
    assert main(["audit", "moments", "image", "--out", str(out), "--steps", "0"]) == 2
    assert "--steps >= 1" in capsys.readouterr().err
