"""ReLoRA's reset: merge equals unmerged, fresh adapters, optimizer pruning by hand, rank growth."""

import copy

import pytest
import torch

from ankus import load_model
from ankus.config import LoRAConfig
from ankus.models.lora import apply_lora
from ankus.models.relora import lora_layers, lora_parameters, merge_and_reinit, reset_optimizer_state, update_rank
from ankus.runs import save_hf_model


def _lora_model(arch="tiny-llama", r=2):
    model, tok = load_model(arch)
    model = apply_lora(model, LoRAConfig(True, r=r, alpha=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that a merge has something to fold in
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tok


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_merge_and_reinit_keeps_the_function(arch):
    model, _ = _lora_model(arch)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    layer = next(iter(dict(lora_layers(model)).values()))
    w0 = layer.get_base_layer().weight.clone()
    delta = layer.get_delta_weight("default").clone()
    n = merge_and_reinit(model, torch.Generator().manual_seed(2))
    after = model(input_ids=ids).logits
    assert n > 0
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + delta)
    assert (layer.lora_B["default"].weight == 0).all() and layer.lora_A["default"].weight.abs().sum() > 0


def test_reinit_is_seeded():
    m1, _ = _lora_model()
    m2 = copy.deepcopy(m1)
    merge_and_reinit(m1, torch.Generator().manual_seed(5))
    merge_and_reinit(m2, torch.Generator().manual_seed(5))
    for a, b in zip(lora_parameters(m1), lora_parameters(m2)):
        assert torch.equal(a, b)


def _adam_with_state(values):
    p = torch.nn.Parameter(torch.zeros(len(values)))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p, q])
    p.grad, q.grad = torch.ones(len(values)), torch.ones(2)
    opt.step()
    opt.state[p]["exp_avg"].copy_(torch.tensor(values))
    opt.state[p]["exp_avg_sq"].copy_(torch.tensor(values).abs())
    return opt, p, q


def test_magnitude_pruning_by_hand():
    opt, p, q = _adam_with_state([1.0, -4.0, 2.0, -3.0])
    q_state = {k: v.clone() for k, v in opt.state[q].items()}
    reset_optimizer_state(opt, [p], "magnitude", ratio=0.5)
    assert opt.state[p]["exp_avg"].tolist() == [0.0, -4.0, 0.0, -3.0]
    assert opt.state[p]["exp_avg_sq"].tolist() == [0.0, 4.0, 0.0, 3.0]
    assert opt.state[p]["step"].item() == 1  # kept
    for k, v in q_state.items():  # parameters outside the list keep their state
        assert torch.equal(opt.state[q][k], v)


def test_pruning_keeps_the_same_entries_of_both_moments():
    """A first moment kept where the second was pruned would make Adam's next step m / sqrt(v) huge."""
    opt, p, _ = _adam_with_state([1.0, -4.0, 2.0, -3.0])
    opt.state[p]["exp_avg_sq"].copy_(torch.tensor([9.0, 1.0, 8.0, 7.0]))  # largest where |m| is small
    reset_optimizer_state(opt, [p], "magnitude", ratio=0.5)
    assert opt.state[p]["exp_avg"].tolist() == [0.0, -4.0, 0.0, -3.0]
    assert opt.state[p]["exp_avg_sq"].tolist() == [0.0, 1.0, 0.0, 7.0]  # masked where exp_avg is
    opt, p, _ = _adam_with_state([1.0] * 1000)
    reset_optimizer_state(opt, [p], "random", ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(opt.state[p]["exp_avg"] != 0, opt.state[p]["exp_avg_sq"] != 0)


def test_full_and_random_pruning():
    opt, p, _ = _adam_with_state([1.0] * 1000)
    reset_optimizer_state(opt, [p], "random", ratio=0.9, generator=torch.Generator().manual_seed(0))
    kept = (opt.state[p]["exp_avg"] != 0).float().mean().item()
    assert 0.07 < kept < 0.13
    reset_optimizer_state(opt, [p], "full")
    assert (opt.state[p]["exp_avg"] == 0).all() and (opt.state[p]["exp_avg_sq"] == 0).all()
    with pytest.raises(ValueError, match="unknown optimizer reset 'half'"):
        reset_optimizer_state(opt, [p], "half")


def test_update_rank_by_hand():
    u = torch.tensor([[1.0], [0.0], [0.0]])
    v = torch.tensor([[0.0, 1.0, 0.0]])
    assert update_rank(u @ v) == 1
    assert update_rank(u @ v + torch.tensor([[0.0], [1.0], [0.0]]) @ torch.tensor([[1.0, 0.0, 0.0]])) == 2
    assert update_rank(torch.zeros(3, 3)) == 0


def test_resets_grow_the_rank_beyond_r():
    model, _ = _lora_model(r=2)
    layer = next(iter(dict(lora_layers(model)).values()))
    w0 = layer.get_base_layer().weight.clone()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        with torch.no_grad():
            for prm in lora_parameters(model):
                prm.add_(torch.randn(prm.shape, generator=g) * 0.1)
        merge_and_reinit(model, g)
    assert update_rank(layer.get_base_layer().weight - w0) > 2


def test_merged_model_saves_as_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _lora_model()
    merge_and_reinit(model, torch.Generator().manual_seed(0))
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    want = model(input_ids=ids).logits
    save_hf_model(model, tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
