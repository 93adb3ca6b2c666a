"""Recipe pretrain_moments: a valid pretrain config whose snapshots span the run, for `ankus audit moments lm`."""

from ankus.config import build, read_yaml
from ankus.recipes import resolve_recipe
from ankus.trainers.pretrain import Config, _check_config


def test_pretrain_moments_recipe_snapshots_span_the_run():
    cfg = build(Config, read_yaml(resolve_recipe("pretrain_moments")))
    steps = cfg.method.snapshot_steps
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == cfg.trainer.total_steps
    assert cfg.model.spec == "llama-5m" and cfg.data.corpus == "runs/corpora/stdlib"
    _check_config(cfg, sharded=False, chunk=cfg.method.loss_chunk)  # snapshot steps in range, no ConfigError
