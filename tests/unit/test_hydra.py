"""Hydra reference branch: exact against a full frozen copy, across architectures, and frozen
where it must be while the policy trains."""

import copy
import functools

import pytest
import torch

from ankus.models.loading import default_tokenizer, tiny_model
from ankus.models.hydra import HydraReference, decoder_layers, eval_mode, freeze_for_hydra

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return default_tokenizer()


def load_model(spec):
    """ankus.load_model's tiny models, with the tokenizer read once per test file."""
    model, tok = tiny_model(spec.removeprefix("tiny-"), tokenizer=_tokenizer())
    return model.eval(), tok


def _batch(seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2000, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # left padding of different lengths
    am[1, :1] = 0
    return ids, am


def _pos(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


def test_decoder_layers_found_without_per_arch_code():
    m, _ = load_model("tiny-llama")
    assert decoder_layers(m) is m.model.layers
    m, _ = load_model("tiny-gpt-neox")
    assert decoder_layers(m) is m.gpt_neox.layers
    m, _ = load_model("tiny-gpt2")
    assert decoder_layers(m) is m.transformer.h
    assert len(decoder_layers(m)) == 4


def _trainable(m):
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_freeze_for_hydra_trainable_sets():
    m, _ = load_model("tiny-llama")  # tied head
    freeze_for_hydra(m, 2)
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight"]
    assert _trainable(m) == {f"model.layers.{i}.{p}" for i in (2, 3) for p in per_layer} | {"model.norm.weight"}
    assert not m.lm_head.weight.requires_grad and m.lm_head.weight is m.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        freeze_for_hydra(m, 2, train_head=True)

    m, _ = load_model("tiny-gpt-neox")  # untied head: frozen unless asked
    freeze_for_hydra(m, 1)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in _trainable(m)} == {"gpt_neox.layers", "gpt_neox.final_layer_norm"}
    assert all(n.startswith(("gpt_neox.layers.3.", "gpt_neox.final_layer_norm.")) for n in _trainable(m))
    freeze_for_hydra(m, 1, train_head=True)
    assert "lm_head.weight" in _trainable(m)

    m, _ = load_model("tiny-gpt2")  # position embedding (wpe) sits before the blocks: frozen
    freeze_for_hydra(m, 1)
    assert all(n.startswith(("transformer.h.3.", "transformer.ln_f.")) for n in _trainable(m))
    assert "transformer.ln_f.weight" in _trainable(m) and "transformer.wpe.weight" not in _trainable(m)

    freeze_for_hydra(m, -1)
    assert all(p.requires_grad for p in m.parameters())
    freeze_for_hydra(m, 0)
    assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="4 decoder layers"):
        freeze_for_hydra(m, 5)


@pytest.mark.parametrize("spec", ARCHS)
@pytest.mark.parametrize("n", [1, 2])
def test_hydra_equals_full_frozen_copy(spec, n):
    m, _ = load_model(spec)
    full = copy.deepcopy(m)
    freeze_for_hydra(m, n)
    hydra = HydraReference(m, n)
    assert hydra.split_index == 4 - n
    ids, am = _batch()
    for pos in (None, _pos(am)):
        out = m(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True)
        got = hydra.logits(out.hidden_states[hydra.split_index], am, pos)
        want = full(input_ids=ids, attention_mask=am, position_ids=pos).logits
        assert got.shape == want.shape == (3, 10, m.config.vocab_size)
        assert (got - want).abs().max().item() <= 1e-5
    # the branch really uses the hidden state it is given (not its own embedding of inputs_embeds)
    h = out.hidden_states[hydra.split_index]
    moved = hydra.logits(h + 0.5 * torch.randn_like(h), am, _pos(am))
    assert (moved - want).abs().max().item() > 1e-2
    # logits_to_keep gives the same last positions
    tail = hydra.logits(h, am, _pos(am), logits_to_keep=3)
    assert torch.allclose(tail, want[:, -3:], atol=1e-5)


def test_hidden_at_split_runs_only_the_trunk():
    m, _ = load_model("tiny-llama")
    freeze_for_hydra(m, 2)
    hydra = HydraReference(m, 2)
    ids, am = _batch()
    calls = []
    handle = decoder_layers(m)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        h = hydra.hidden_at_split(ids, am, _pos(am))
    finally:
        handle.remove()
    assert calls == []  # stopped before the first trainable block
    out = m(input_ids=ids, attention_mask=am, position_ids=_pos(am), output_hidden_states=True)
    assert torch.equal(h, out.hidden_states[2])


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("spec,train_head", [("tiny-llama", False), ("tiny-gpt-neox", True)])
def test_branch_and_trunk_stay_put_while_the_policy_trains(spec, train_head):
    m, tok = load_model(spec)
    pristine = copy.deepcopy(m)
    n = 2
    freeze_for_hydra(m, n, train_head=train_head)
    hydra = HydraReference(m, n)
    branch_before = {name: p.detach().clone() for name, p in hydra.owned_parameters()}
    policy_before = _snapshot(m)

    ids, am = _batch(seed=1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(3):  # a simple next-token loss
        logits = m(input_ids=ids, attention_mask=am).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()

    for name, p in hydra.owned_parameters():
        assert torch.equal(p, branch_before[name]), name
    top = {f"{i}" for i in range(4 - n, 4)}
    layers_prefix = "model.layers." if spec == "tiny-llama" else "gpt_neox.layers."
    changed = {name for name, p in m.named_parameters() if not torch.equal(p, policy_before[name])}
    for name in policy_before:
        in_top = name.startswith(layers_prefix) and name[len(layers_prefix):].split(".")[0] in top
        if in_top:
            assert name in changed, f"top block parameter did not train: {name}"
        elif name.startswith(layers_prefix) or "emb" in name:
            assert name not in changed, f"trunk parameter moved: {name}"
    head_changed = "lm_head.weight" in changed
    assert head_changed == train_head  # the tied head (= embedding) never trains

    pos = _pos(am)
    out = m(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=True)
    ref = hydra.logits(out.hidden_states[hydra.split_index], am, pos)
    want = pristine(input_ids=ids, attention_mask=am, position_ids=pos).logits
    assert (ref - want).abs().max().item() <= 1e-5
    assert (out.logits - want).abs().max().item() > 1e-2  # while the policy itself moved


def test_guard_rules():
    m, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="would drift"):
        HydraReference(m, 2)  # nothing frozen
    freeze_for_hydra(m, 2)
    with pytest.raises(ValueError, match="would drift"):
        HydraReference(m, 1)  # block 2 trains but sits below the split: the reference would drift
    freeze_for_hydra(m, 1)
    HydraReference(m, 2)  # block 2 frozen yet copied into the branch: exact, just a bigger branch
    hydra = HydraReference(m, 1)
    ids, am = _batch()
    out = m(input_ids=ids, attention_mask=am, output_hidden_states=True)
    m.model.embed_tokens.weight.requires_grad_(True)  # unfrozen later, as in trlX issue #517
    with pytest.raises(ValueError, match="embed_tokens"):
        hydra.logits(out.hidden_states[3], am)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="Hydra needs"):
            HydraReference(m, bad)


def test_branch_leaves_the_policy_modes_alone():
    m, _ = load_model("tiny-gpt2")  # has dropout
    freeze_for_hydra(m, 2)
    hydra = HydraReference(m, 2)
    m.train()
    ids, am = _batch()
    with torch.no_grad(), eval_mode(m):
        h = m(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[2]
    a = hydra.logits(h, am)
    b = hydra.logits(h, am)
    assert torch.equal(a, b)  # no dropout inside the branch even though the policy is in train mode
    assert all(mod.training for mod in m.modules())


def test_branch_parameter_bytes_tiny_llama():
    m, _ = load_model("tiny-llama")
    freeze_for_hydra(m, 2)
    hydra = HydraReference(m, 2)
    # hidden 64, MLP 128, 4 query heads and 2 kv heads of 16: q,o 64·64; k,v 64·32; 3 MLP 64·128; 2 norms
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert hydra.num_owned_bytes() == 4 * (2 * per_layer + 64)  # fp32, + final norm; tied head shared


@pytest.mark.slow
def test_branch_parameter_bytes_smollm2(default_model):
    m, _ = default_model
    flags = [(p, p.requires_grad) for p in m.parameters()]
    try:
        freeze_for_hydra(m, 2)
        hydra = HydraReference(m, 2)
        # SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 kv heads of 64, 30 layers, tied 49152 vocab
        per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
        assert hydra.num_owned_bytes() == 4 * (2 * per_layer + 576) == 28_323_072
        full = sum(p.numel() * p.element_size() for p in m.parameters())
        assert full == 4 * 134_515_008
        assert hydra.num_owned_bytes() / full < 0.06  # 5.3% of a full frozen copy
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
