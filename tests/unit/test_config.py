import dataclasses

import pytest

from ankus.config import ConfigError, ModelConfig, TrainerConfig, build, from_dict, parse_override


@dataclasses.dataclass
class Section:
    lr: float = 1e-3
    """learning rate"""
    steps: int = 10
    """steps"""
    name: str = "x"
    """name"""
    stops: list[str] = dataclasses.field(default_factory=list)
    """stop strings"""
    mode: str | None = None
    """optional"""


@dataclasses.dataclass
class Recipe:
    trainer: Section = dataclasses.field(default_factory=Section)
    """training"""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """model"""


def test_build_from_yaml_like_dict_and_overrides():
    cfg = build(Recipe, {"algorithm": "ppo", "trainer": {"lr": "3e-5", "steps": 4}},
                ["trainer.steps=7", "model.spec=tiny-llama", 'trainer.stops=["\\n", "END"]'])
    assert cfg.trainer.lr == pytest.approx(3e-5)
    assert cfg.trainer.steps == 7
    assert cfg.model.spec == "tiny-llama"
    assert cfg.trainer.stops == ["\n", "END"]


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.lrr'.*Did you mean 'lr'"):
        build(Recipe, {"trainer": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*Did you mean 'model'"):
        build(Recipe, {}, ["modle.spec=x"])


def test_wrong_types_raise():
    with pytest.raises(ConfigError, match="trainer.steps: expected an int"):
        build(Recipe, {"trainer": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="trainer.steps: expected an int"):
        build(Recipe, {"trainer": {"steps": 2.5}})
    with pytest.raises(ConfigError, match="trainer.lr: expected a float"):
        build(Recipe, {"trainer": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(Recipe, {"trainer": 3})
    with pytest.raises(ConfigError, match="expected a list"):
        build(Recipe, {"trainer": {"stops": "END"}})


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = from_dict(Section, {"lr": 1, "mode": None})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and cfg.mode is None


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("trainer.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        build(Recipe, {"trainer": {"lr": 1.0}}, ["trainer.lr.x=2"])


def test_every_schema_field_has_a_docstring():
    # The dataclass is the schema: each field documents itself (read by `ankus train --help` users).
    import inspect

    for cls in (ModelConfig, TrainerConfig):
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = src.split(f"    {f.name}:", 1)[1].split("\n", 2)[1].strip()
            assert after.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_partial_section_keeps_the_configs_own_defaults():
    """A recipe that sets only trainer.batch_size must keep DPO's lr=5e-7 and weight_decay=0,
    not TrainerConfig's generic 3e-5 / 1e-6."""
    from ankus.trainers.dpo import Config as DPOConfig

    cfg = build(DPOConfig, {"trainer": {"batch_size": 4}})
    assert cfg.trainer.batch_size == 4 and cfg.trainer.lr == 5e-7 and cfg.trainer.weight_decay == 0.0
    with pytest.raises(ConfigError, match="unknown key 'trainer.bach_size'"):
        build(DPOConfig, {"trainer": {"bach_size": 4}})
