"""PPO without vocabulary-wide tensors for the whole batch: the chunked head log-probs, the
output-head bypass, row-chunked scoring and the release of packed generation weights give the
same numbers as the straightforward computations."""

import math

import pytest
import torch
from torch import nn

from ankus import load_model
from ankus.generation import engine, packing
from ankus.losses.ppo import head_logprobs, logprobs_from_logits, rows_per_chunk, token_entropy
from ankus.models.heads import ValueHead, output_head_bypassed
from ankus.models.reference import make_reference
from ankus.models.hydra import TrunkCache
from ankus.rl import rollouts


def test_rows_per_chunk_by_hand():
    assert rows_per_chunk(positions=4, vocab=10, budget=100) == 2  # 40 elements a row
    assert rows_per_chunk(positions=4, vocab=10, budget=39) == 1  # never below one row
    assert rows_per_chunk(positions=1, vocab=1, budget=7) == 7


def test_head_logprobs_by_hand():
    # H = 1, V = 2, head weight [[1], [-1]]: logits (h, -h); log p(token 0) = h - log(e^h + e^-h).
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    hidden = torch.tensor([[[0.0], [1.0]], [[2.0], [-1.0]]])  # (B=2, N=2, H=1)
    labels = torch.tensor([[0, 1], [0, 0]])
    logps, entropy = head_logprobs(hidden, head, labels, budget=2 * 2)  # one row a chunk
    lse = lambda h: math.log(math.exp(h) + math.exp(-h))  # noqa: E731
    expected = [0.0 - lse(0.0), -1.0 - lse(1.0), 2.0 - lse(2.0), -1.0 - lse(-1.0)]
    assert logps.flatten().tolist() == pytest.approx(expected, abs=1e-6)

    def h2(h):  # entropy of softmax(h, -h)
        p = math.exp(h) / (math.exp(h) + math.exp(-h))
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert entropy.flatten().tolist() == pytest.approx([h2(0.0), h2(1.0), h2(2.0), h2(-1.0)], abs=1e-6)


@pytest.mark.parametrize("budget", [1, 2 * 5 * 50, 3 * 5 * 50, 10 ** 9])  # 1, 2, 3 (with a remainder), all rows
def test_head_logprobs_equals_the_whole_batch_and_its_gradients(budget):
    g = torch.Generator().manual_seed(0)
    B, N, H, V = 7, 5, 16, 50
    head = nn.Linear(H, V)  # trains here: its gradient must come through the recomputation too
    hidden = torch.randn(B, N, H, generator=g)
    labels = torch.randint(0, V, (B, N), generator=g)
    weights = torch.randn(B, N, generator=g)  # a loss that weighs every position differently

    a = hidden.clone().requires_grad_()
    logps, entropy = head_logprobs(a, head, labels, budget=budget)
    assert not entropy.requires_grad
    (logps * weights).sum().backward()
    grads = a.grad, head.weight.grad.clone(), head.bias.grad.clone()
    head.zero_grad()

    b = hidden.clone().requires_grad_()
    logits = head(b)  # (B, N, V): the straightforward way
    whole = logprobs_from_logits(logits, labels)
    (whole * weights).sum().backward()
    torch.testing.assert_close(logps, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, token_entropy(logits.detach()), atol=1e-6, rtol=0)
    for got, want in zip(grads, (b.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # no grad: no checkpointing, same numbers
        torch.testing.assert_close(head_logprobs(hidden, head, labels, budget=budget)[0], whole.detach())


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_bypassed_head_gives_the_final_hidden_states_and_is_restored(spec):
    model, _ = load_model(spec, seed=1)
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids, output_hidden_states=True, logits_to_keep=3)
    head = model.get_output_embeddings()
    with output_head_bypassed(model) as untouched:
        out = model(input_ids=ids, logits_to_keep=3)
    assert untouched(out.logits) and untouched(out.logits[:, :-1])
    assert torch.equal(out.logits, full.hidden_states[-1][:, -3:])  # (B, 3, H): the head's input
    assert torch.equal(head(out.logits), full.logits)
    assert "forward" not in head.__dict__  # the head is itself again
    assert not untouched(full.logits)


class _ScaledLogits(nn.Module):
    """A model that transforms its logits after the head (as soft-capping models do)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 9)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x)) * 2.0


def test_bypass_notices_logits_transformed_after_the_head():
    model = _ScaledLogits()
    with output_head_bypassed(model) as untouched:
        out = model(torch.randn(2, 4))
    assert out.shape == (2, 4) and not untouched(out)


def _rollout_batch(seed=0, B=6, P=5, N=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (B, P + N), generator=g)
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left padding
    am[3, :1] = 0
    am[1, P + 2:] = 0  # a short response
    return ids, am, ids[:, P:], N


@pytest.mark.parametrize("setup", ["hydra", "hydra-trunk", "lora", "copy-all", "gpt2-hydra", "neox-hydra"])
def test_response_logprobs_equal_the_full_logits_and_their_gradients(setup):
    spec = {"gpt2-hydra": "tiny-gpt2", "neox-hydra": "tiny-gpt-neox"}.get(setup, "tiny-llama")
    model, _ = load_model(spec, seed=2)
    mode = setup.split("-")[-1] if setup != "hydra-trunk" else "hydra"
    mode = {"all": "copy"}.get(mode, mode)
    ref = make_reference(model, mode, -1 if setup == "copy-all" else 2)
    policy = ref.policy
    value_head = ValueHead(model.config.hidden_size)
    ids, am, resp, N = _rollout_batch()
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    if setup == "hydra-trunk":
        with torch.no_grad():
            hidden = rollouts.policy_forward(policy, value_head, ids, am, N, ref.hidden_index)[2]
        trunk = TrunkCache(policy, ref.hidden_index)
        forward = lambda: trunk.forward(value_head, hidden, am, N)  # noqa: E731
    else:
        forward = lambda: rollouts.policy_forward(policy, value_head, ids, am, N)[:2]  # noqa: E731

    def grads(logps, values):
        loss = (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum() + values.pow(2).sum()
        return torch.autograd.grad(loss, params)

    calls = []
    real = rollouts.head_logprobs
    rollouts.head_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        logps, entropy, values = rollouts.response_logprobs(policy, forward, resp)
    finally:
        rollouts.head_logprobs = real
    assert calls, "the bypass was not taken"
    logits, values_full = forward()  # (B, N, V): the straightforward way
    whole = logprobs_from_logits(logits, resp)
    torch.testing.assert_close(logps, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, token_entropy(logits.detach()), atol=1e-6, rtol=0)
    torch.testing.assert_close(values, values_full, atol=0, rtol=0)
    for a, b in zip(grads(logps, values), grads(whole, values_full)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_response_logprobs_fall_back_when_the_model_transforms_its_logits():
    model = _ScaledLogits()
    x, labels = torch.randn(2, 3, 4), torch.tensor([[1, 2, 3], [4, 5, 6]])
    logps, entropy, values = rollouts.response_logprobs(model, lambda: (model(x), None), labels)
    logits = model(x)
    torch.testing.assert_close(logps, logprobs_from_logits(logits, labels))
    torch.testing.assert_close(entropy, token_entropy(logits.detach()))
    assert values is None and logps.requires_grad


@pytest.mark.parametrize("mode", ["hydra", "copy"])
def test_scoring_in_small_row_chunks_gives_the_same_numbers(mode, monkeypatch):
    model, _ = load_model("tiny-llama", seed=4)
    ref = make_reference(model, mode, 2)
    value_head = ValueHead(model.config.hidden_size)
    ids, am, resp, N = _rollout_batch(seed=1, B=7)
    keep = mode == "hydra"
    with torch.no_grad():
        whole = rollouts.score_rollouts(ref.policy, value_head, ref, ids, am, resp, N, chunk=7, keep_hidden=keep)
        monkeypatch.setattr(rollouts, "rows_per_chunk", lambda positions, v: 2)  # chunks of 2, 2, 2, 1 rows
        chunked = rollouts.score_rollouts(ref.policy, value_head, ref, ids, am, resp, N, chunk=7, keep_hidden=keep)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_release_packed_drops_the_cache_and_packs_again_alike():
    model, tok = load_model("tiny-llama", seed=5)
    if not packing.packed_linears_available(model):
        pytest.skip("no oneDNN")
    cfg = engine.GenerationConfig(max_new_tokens=5, packed_linears=True)
    first = engine.generate(model, tok, ["hello", "a b c"], cfg, generator=torch.Generator().manual_seed(0))
    ids = {id(p) for p in model.parameters()}
    held = [k for k in ids if packing._PACKED.get(k, (None, None, None))[2] is not None]
    assert held
    assert engine.release_packed(model) == len(held)
    assert all(packing._PACKED[k][2] is None for k in held)
    assert engine.release_packed(model) == 0  # nothing left to drop
    again = engine.generate(model, tok, ["hello", "a b c"], cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.response_ids, first.response_ids) and torch.equal(again.logprobs, first.logprobs)
    assert all(packing._PACKED[k][2] is not None for k in held)  # packed again, in the same entries
