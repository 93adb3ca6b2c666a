"""Smoke and convergence runs of the shipped PPO recipes."""


from transformers import AutoModelForCausalLM

from ankus.cli import main
from ankus.runs import read_metrics


def test_ppo_randomwalks_reaches_optimality_0_9(tmp_path, capsys):
    # The full shipped recipe: warm start, then 30 PPO iterations (~1-2 min on 2 cores).
    assert main(["train", "ppo_randomwalks", f"run.out_dir={tmp_path}", "run.progress=false"]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "ppo_randomwalks"
    rows = read_metrics(run)
    assert len(rows) == 30
    assert rows[0]["reward/mean"] < 0.6  # what the warm-started model does (the walks' own mean is 0.32)
    final_train = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert final_train >= 0.85, final_train
    line = next(s for s in printed.splitlines() if s.startswith("mean held-out score"))
    before, after = (float(x) for x in line.split(":")[1].split("(")[0].split("->"))
    assert before < 0.6 and after >= 0.9, line
    AutoModelForCausalLM.from_pretrained(run / "model")
    assert (run / "metrics.png").stat().st_size > 1000


def test_ppo_sentiment_recipe_smoke_on_a_tiny_model(tmp_path):
    # The demo recipe as shipped, shrunk to a tiny model and one short iteration.
    args = ["train", "ppo_sentiment", f"run.out_dir={tmp_path}", "run.progress=false", "model.spec=tiny-llama",
            "trainer.total_steps=1", "method.num_rollouts=8", "method.chunk_size=8", "generation.max_new_tokens=4",
            "data.num_eval=2", "method.num_layers_unfrozen=2"]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "ppo_sentiment")
    assert rows[0]["step"] == 1 and -1 <= rows[0]["reward/mean"] <= 1
    cfg = (tmp_path / "ppo_sentiment" / "config.yaml").read_text()
    assert "spec: tiny-llama" in cfg and "total_steps: 1" in cfg


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", "ppo_sentiment", "trainer.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "no_such_recipe"]) == 2
    assert "Shipped recipes:" in capsys.readouterr().err


def test_demo_runs_again_into_a_new_directory(tmp_path, monkeypatch):
    """`make demo` twice: the second run does not stop at the first one's directory."""
    from ankus import cli

    calls = []
    monkeypatch.setattr(cli, "run_recipe", lambda recipe, overrides=(): calls.append(list(overrides)))
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0  # no earlier run: the recipe's own directory
    assert calls[-1] == []
    (tmp_path / "runs" / "ppo_sentiment").mkdir(parents=True)
    (tmp_path / "runs" / "ppo_sentiment" / "metrics.jsonl").write_text("{}\n")
    assert main(["demo", "trainer.total_steps=1"]) == 0
    name = [o for o in calls[-1] if o.startswith("run.name=ppo_sentiment-")]
    assert len(name) == 1 and calls[-1][0] == "trainer.total_steps=1"
    assert main(["demo", "run.name=mine"]) == 0  # a name the user gave is kept
    assert calls[-1] == ["run.name=mine"]
