"""make_reference: hydra / lora / copy give the initial model's log-probs, before and after
the policy trains."""

import copy
import functools

import pytest
import torch

from ankus.models.loading import default_tokenizer, tiny_model
from ankus.losses.ppo import logprobs_from_logits
from ankus.config import LoRAConfig
from ankus.data.tokens import position_ids_from_mask
from ankus.models.lora import apply_lora
from ankus.models.reference import make_reference


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return default_tokenizer()


def _load(arch="llama"):
    model, _ = tiny_model(arch, tokenizer=_tokenizer())
    return model.eval()


def _batch(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0
    am[2, :1] = 0
    return ids, am


def _naive_logps(model, ids, am):
    """log p(ids[b, t+1] | ids[b, :t+1]) one position at a time, from a full forward."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            out[b, t] = torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]].float()
    return out


def _train(policy, ids, am, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    policy.train()
    for _ in range(steps):
        logits = policy(input_ids=ids, attention_mask=am).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    policy.eval()


def test_position_ids_skip_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("arch", ["llama", "gpt-neox", "gpt2"])
def test_hydra_logps_match_a_pristine_copy_before_and_after_training(arch):
    model = _load(arch)
    pristine = copy.deepcopy(model)
    ref = make_reference(model, "hydra", num_layers_unfrozen=2)
    assert ref.mode == "hydra" and ref.policy is model and ref.hidden_index == 2
    ids, am = _batch()
    _train(model, ids, am)
    want = _naive_logps(pristine, ids, am)  # (B, T-1)

    pos = position_ids_from_mask(am)
    out = model(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True)
    from_tensor = ref.logps(ids, am, out.hidden_states[ref.hidden_index])
    from_tuple = ref.logps(ids, am, out.hidden_states)
    own_trunk = ref.logps(ids, am)  # no policy forward to reuse: runs the frozen trunk itself
    for got in (from_tensor, from_tuple, own_trunk):
        assert got.shape == (3, 8) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-5
    tail = ref.logps(ids, am, out.hidden_states, n_resp=4)
    assert tail.shape == (3, 4) and (tail - want[:, -4:]).abs().max().item() <= 1e-5
    policy_logps = logprobs_from_logits(out.logits[:, :-1], ids[:, 1:])
    assert (policy_logps - want).abs().max().item() > 1e-2  # the policy did move


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: peft wraps Conv1D too
def test_lora_reference_is_the_base_model_before_and_after_training(arch):
    model = _load(arch)
    pristine = copy.deepcopy(model)
    ref = make_reference(model, "lora", lora=LoRAConfig(enabled=True, r=4, alpha=8))
    policy = ref.policy
    assert ref.mode == "lora" and ref.hidden_index is None and hasattr(policy, "disable_adapter")
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids, am = _batch(seed=3)
    want = _naive_logps(pristine, ids, am)
    assert (ref.logps(ids, am) - want).abs().max().item() <= 1e-5
    # B starts at zero: the adapted policy also starts equal to the base
    assert (_naive_logps(policy, ids, am) - want).abs().max().item() <= 1e-5

    _train(policy, ids, am, lr=5e-2)
    assert (ref.logps(ids, am) - want).abs().max().item() <= 1e-5
    assert (ref.logps(ids, am, n_resp=3) - want[:, -3:]).abs().max().item() <= 1e-5
    assert (_naive_logps(policy, ids, am) - want).abs().max().item() > 1e-2  # adapters are on again after


def test_apply_lora_targets_every_linear_but_the_head():
    model = apply_lora(_load("gpt-neox"), LoRAConfig(True))
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert wrapped == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}  # not the untied lm_head


def test_copy_reference_with_everything_trainable():
    model = _load("llama")
    pristine = copy.deepcopy(model)
    ref = make_reference(model, "copy", num_layers_unfrozen=-1)
    assert ref.mode == "copy" and ref.policy is model and ref.hidden_index is None
    assert all(p.requires_grad for p in model.parameters())
    ids, am = _batch(seed=5)
    _train(model, ids, am)
    want = _naive_logps(pristine, ids, am)
    assert (ref.logps(ids, am) - want).abs().max().item() <= 1e-5
    assert (_naive_logps(model, ids, am) - want).abs().max().item() > 1e-2
    assert model.model.embed_tokens.weight.requires_grad  # the whole model trained, embedding too


def test_copy_reference_with_top_layers_trainable():
    model = _load("gpt-neox")
    ref = make_reference(model, "copy", num_layers_unfrozen=1)
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"layers", "final_layer_norm"}
    ids, am = _batch()
    assert (ref.logps(ids, am) - _naive_logps(model, ids, am)).abs().max().item() <= 1e-5


def test_bad_modes():
    with pytest.raises(ValueError, match="use mode 'copy'"):
        make_reference(_load(), "hydra", num_layers_unfrozen=-1)
    with pytest.raises(ValueError, match="unknown reference mode"):
        make_reference(_load(), "twin", num_layers_unfrozen=2)
