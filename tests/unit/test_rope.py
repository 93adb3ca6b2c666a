"""YaRN's frequencies against the paper's formula worked by hand; static and dynamic scaling on models."""

import math
from pathlib import Path

import pytest
import torch

from ankus import load_model
from ankus.models.rope import rotary_modules, scale_rope, yarn_attention_factor, yarn_inv_freq


def test_yarn_frequencies_by_hand():
    # L = 100, s = 4. theta = 1: r = 100/(2 pi) = 15.9155 turns, gamma = (15.9155 - 1)/31 = 0.481146,
    # h = 0.518854 * 0.25 + 0.481146 = 0.610860. theta = 0.1: r = 1.59155, gamma = 0.0190823,
    # h = 0.980918 * 0.025 + 0.00190823 = 0.0264312. theta = 1e-3: r < 1, h = theta / 4.
    # theta = 3: r = 47.7 > 32, unchanged.
    got = yarn_inv_freq(torch.tensor([3.0, 1.0, 0.1, 1e-3], dtype=torch.float64), 4.0, 100)
    assert got.tolist() == pytest.approx([3.0, 0.610860, 0.0264312, 2.5e-4], rel=1e-5)
    assert yarn_inv_freq(torch.tensor([1.0]), 1.0, 100).item() == 1.0  # no scaling at s <= 1


def test_attention_temperature():
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4) + 1)  # 1.138629
    assert yarn_attention_factor(1.0) == 1.0


def _ids(n, seed=0):
    return torch.randint(3, 60, (1, n), generator=torch.Generator().manual_seed(seed))


def test_static_yarn_through_transformers_agrees_at_the_extremes():
    model, _ = load_model("tiny-llama")
    rot = rotary_modules(model)[0]
    theta = rot.inv_freq.clone().double()
    L = model.config.max_position_embeddings
    scale_rope(model, "yarn", 4.0, original_max=L)
    got = rot.inv_freq.double()
    want = yarn_inv_freq(theta, 4.0, L)
    turns = L * theta / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any()
    torch.testing.assert_close(got[fast], want[fast])
    torch.testing.assert_close(got[slow], want[slow], rtol=1e-6, atol=0)
    assert rot.attention_scaling == pytest.approx(yarn_attention_factor(4.0))
    assert model.config.max_position_embeddings == 4 * L


def test_dynamic_yarn_is_identity_within_the_context_and_scales_beyond():
    plain, _ = load_model("tiny-llama")
    L = 16
    dyn, _ = load_model("tiny-llama")
    scale_rope(dyn, "dynamic-yarn", 4.0, original_max=L)
    ids = _ids(L)
    torch.testing.assert_close(dyn(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    # at 2L tokens the hook uses s = 2: the frequencies equal the formula's, and the output changes
    theta = rotary_modules(plain)[0].inv_freq.clone()
    long_ids = _ids(2 * L, 1)
    out = dyn(input_ids=long_ids).logits
    rot = rotary_modules(dyn)[0]
    torch.testing.assert_close(rot.inv_freq, yarn_inv_freq(theta, 2.0, L))
    assert rot.attention_scaling == pytest.approx(yarn_attention_factor(2.0))
    assert not torch.allclose(out, plain(input_ids=long_ids).logits)


@pytest.mark.parametrize("method", ["linear", "dynamic-ntk", "yarn", "dynamic-yarn"])
def test_every_method_runs_on_neox_and_llama(method):
    for spec in ("tiny-llama", "tiny-gpt-neox"):
        model, _ = load_model(spec)
        L = model.config.get_text_config().max_position_embeddings
        scale_rope(model, method, 2.0)
        out = model(input_ids=_ids(8)).logits
        assert torch.isfinite(out).all()
        want = L if method == "dynamic-ntk" else 2 * L  # dynamic NTK: the context it scales past
        assert model.config.get_text_config().max_position_embeddings == want


def test_dynamic_ntk_is_identity_within_the_context_and_scales_beyond_it():
    # transformers' dynamic NTK rescales past config.max_position_embeddings; were that set to the
    # extended length (factor x original), it would change nothing at any length up to it
    plain, _ = load_model("tiny-llama")
    L = 16
    dyn, _ = load_model("tiny-llama")
    scale_rope(dyn, "dynamic-ntk", 4.0, original_max=L)
    ids = _ids(L)
    torch.testing.assert_close(dyn(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    long_ids = _ids(2 * L, 1)
    assert not torch.allclose(dyn(input_ids=long_ids).logits, plain(input_ids=long_ids).logits)


def test_bad_factor_and_method():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="must be > 1"):
        scale_rope(model, "yarn", 1.0)
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk'"):
        scale_rope(model, "ntk", 2.0)


# ---------------------------------------------------------------------------------------------
# the pretrain trainer's rope: section


def _pretrain_cfg(tmp_path, **rope):
    from ankus.config import build
    from ankus.data.corpus import build_corpus
    from ankus.trainers.pretrain import Config

    texts = tmp_path / "texts"
    texts.mkdir(exist_ok=True)
    for i in range(6):
        (texts / f"d{i}.txt").write_text(" ".join(f"w{(i * 5 + j) % 40}" for j in range(120)) + "\n")
    if not (tmp_path / "corpus").exists():
        build_corpus(str(texts), tmp_path / "corpus")
    recipe = {"model": {"spec": "tiny-llama"}, "data": {"corpus": str(tmp_path / "corpus"), "seq_length": 32,
                                                        "val_fraction": 0.2},
              "trainer": {"batch_size": 2, "total_steps": 1, "warmup_steps": 0, "lr": 1e-3, "device": "cpu"},
              "run": {"out_dir": str(tmp_path / "runs"), "name": "r", "progress": False}, "rope": rope}
    return build(Config, recipe)


def test_the_rope_section_reaches_the_model(tmp_path):
    from ankus.trainers.pretrain import _setup_model

    plain, _ = load_model("tiny-llama")
    theta = rotary_modules(plain)[0].inv_freq.clone()
    L = 256
    cfg = _pretrain_cfg(tmp_path, method="dynamic-yarn", factor=4.0, original_max=L)
    cfg.run.save_model = False
    model = _setup_model(cfg, torch.device("cpu"), False)[0]
    rot = rotary_modules(model)[0]
    model(input_ids=_ids(3 * L))  # the hook scales by s = 3 at 3L tokens
    torch.testing.assert_close(rot.inv_freq, yarn_inv_freq(theta, 3.0, L))
    assert rot.attention_scaling == pytest.approx(yarn_attention_factor(3.0))

    cfg = _pretrain_cfg(tmp_path, method="yarn", factor=4.0, original_max=L)
    model = _setup_model(cfg, torch.device("cpu"), False)[0]
    rot = rotary_modules(model)[0]
    turns = L * theta / (2 * math.pi)
    want = yarn_inv_freq(theta, 4.0, L)
    for part in (turns > 32, turns < 1):  # transformers' rounded ramp agrees away from the ramp
        assert part.any()
        torch.testing.assert_close(rot.inv_freq[part], want[part])
    assert not torch.allclose(rot.inv_freq, theta)
    assert model.config.max_position_embeddings == 4 * L


def test_a_trained_static_yarn_model_reloads_with_its_rope(tmp_path):
    import json

    from ankus.trainers.pretrain import train

    cfg = _pretrain_cfg(tmp_path, method="yarn", factor=4.0, original_max=256)
    out = train(cfg)
    saved = Path(out["run_dir"]) / "model"
    params = json.loads((saved / "config.json").read_text())["rope_parameters"]
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 256
    reloaded, _ = load_model(str(saved))
    fresh, _ = load_model("tiny-llama")
    scale_rope(fresh, "yarn", 4.0, 256)
    got, want = rotary_modules(reloaded)[0], rotary_modules(fresh)[0]
    torch.testing.assert_close(got.inv_freq, want.inv_freq, rtol=0, atol=0)
    assert got.attention_scaling == want.attention_scaling != 1.0
    assert reloaded.config.max_position_embeddings == 1024


@pytest.mark.parametrize("rope,field", [({"method": "ntk"}, "rope.method"),
                                        ({"method": "yarn", "factor": 1.0}, "rope.factor"),
                                        ({"method": "linear", "factor": 0.5}, "rope.factor"),
                                        ({"factor": 2.0}, "rope.factor"),
                                        ({"original_max": 64}, "rope.original_max"),
                                        ({"method": "dynamic-yarn", "factor": 2.0}, "rope.method=dynamic-yarn")])
def test_bad_rope_sections_are_config_errors_naming_the_field(tmp_path, rope, field):
    from ankus.config import ConfigError
    from ankus.trainers.pretrain import train

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        train(_pretrain_cfg(tmp_path, **rope))
    assert "pretrain" in str(e.value)
