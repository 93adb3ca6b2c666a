"""Every shipped recipe names something that runs it: a trainer, or a command (the audits)."""

import pytest

from ankus.config import ConfigError, read_yaml
from ankus.recipes import COMMANDS, RECIPES_DIR, TRAINERS, shipped_recipes, trainer_module


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_algorithm_is_known(name):
    algorithm = read_yaml(RECIPES_DIR / f"{name}.yaml").get("algorithm")
    assert algorithm in TRAINERS or algorithm in COMMANDS, f"{name}: algorithm {algorithm!r} runs nowhere"


def test_an_audit_recipe_under_train_names_its_command():
    with pytest.raises(ConfigError, match="ankus audit elicit"):
        trainer_module("audit_elicit")
