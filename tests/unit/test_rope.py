"""YaRN's frequencies against the paper's formula worked by hand; static and dynamic scaling on models."""

import math

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
        assert model.config.get_text_config().max_position_embeddings == 2 * L


def test_bad_factor_and_method():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="must be > 1"):
        scale_rope(model, "yarn", 1.0)
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk'"):
        scale_rope(model, "ntk", 2.0)
