"""Prompts run once for their k responses (ankus.models.prefix): the same hidden states, log-probs
and gradients as the forward over whole [prompt, response] rows, on three architectures."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import ankus
from ankus import load_model
from ankus.models.prefix import head_is_plain, shared_prompt_hidden, shared_prompt_states
from ankus.models.reference import make_reference
from ankus.rl.rollouts import policy_forward, reference_shared_prompt_logps


def _batch(k: int = 3, n: int = 5, seed: int = 0):
    """3 distinct prompts (one left-padded) x k responses, rows shuffled; some responses end early."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, 4000, (3, 7), generator=g)
    pmask = torch.ones_like(prompts)
    prompts[0, :3], pmask[0, :3] = 0, 0
    order = torch.randperm(3 * k, generator=g)
    p, pm = prompts.repeat_interleave(k, 0)[order], pmask.repeat_interleave(k, 0)[order]
    resp = torch.randint(100, 4000, (3 * k, n), generator=g)
    rmask = torch.ones_like(resp)
    rmask[1, 2:], rmask[4, 1:] = 0, 0  # right padding after an early end
    return p, pm, resp, rmask


def test_rows_with_the_same_ids_but_other_padding_are_other_prompts():
    """[0, 0, a] left-padded and [0, 0, a] with real zeros are different prompts: not shared."""
    model, _ = load_model("tiny-llama", seed=3)
    p = torch.tensor([[0, 0, 500], [0, 0, 500]])
    pm = torch.tensor([[0, 0, 1], [1, 1, 1]])
    resp, rmask = torch.tensor([[600, 601], [600, 601]]), torch.ones(2, 2, dtype=torch.long)
    ids, am = torch.cat([p, resp], 1), torch.cat([pm, rmask], 1)
    full = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                 output_hidden_states=True).hidden_states[-1][:, -3:-1]
    shared = shared_prompt_hidden(model, p, pm, resp, rmask)
    assert torch.allclose(shared, full, atol=1e-5) and not torch.allclose(shared[0], shared[1], atol=1e-3)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_shared_prompt_hidden_equals_the_whole_row_forward_with_gradients(spec):
    model, _ = load_model(spec, seed=3)
    model.eval()
    p, pm, resp, rmask = _batch()
    ids, am = torch.cat([p, resp], 1), torch.cat([pm, rmask], 1)
    N = resp.shape[1]
    live = rmask.bool()

    def loss_and_grads(hidden):
        logps = torch.log_softmax(model.get_output_embeddings()(hidden), -1).gather(-1, resp[..., None]).squeeze(-1)
        loss = (logps * rmask).sum()
        grads = torch.autograd.grad(loss, [q for q in model.parameters() if q.requires_grad])
        return logps, grads

    full = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                 output_hidden_states=True).hidden_states[-1][:, -N - 1:-1]  # the states predicting each token
    shared = shared_prompt_hidden(model, p, pm, resp, rmask)
    assert shared.shape == full.shape
    assert torch.allclose(shared[live], full[live], atol=1e-5)
    lp_full, g_full = loss_and_grads(full)
    lp_shared, g_shared = loss_and_grads(shared)
    assert torch.allclose(lp_shared[live], lp_full[live], atol=1e-5)
    for a, b in zip(g_full, g_shared):  # gradients through the expanded cache sum over the k responses
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # and the PPO policy forward's logits agree where responses are real
    logits, _, _ = policy_forward(model, None, ids, am, N)
    assert torch.allclose(model.get_output_embeddings()(shared)[live], logits[live], atol=1e-4)


def test_a_single_response_token():
    model, _ = load_model("tiny-llama", seed=3)
    p, pm, resp, rmask = _batch(n=1)
    ids, am = torch.cat([p, resp], 1), torch.cat([pm, rmask], 1)
    full = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                 output_hidden_states=True).hidden_states[-1][:, -2:-1]
    assert torch.allclose(shared_prompt_hidden(model, p, pm, resp, rmask), full, atol=1e-5)


@pytest.mark.parametrize("mode", ["copy", "lora"])
def test_reference_shared_prompt_logps_equal_its_logps(mode):
    model, _ = load_model("tiny-llama", seed=4)
    ref = make_reference(model, mode=mode, num_layers_unfrozen=-1 if mode == "copy" else 2)
    if mode == "lora":  # move the adapters off zero: the reference must still be the base model
        with torch.no_grad():
            for name, q in ref.policy.named_parameters():
                if "lora_B" in name:
                    q.add_(0.5)
    p, pm, resp, rmask = _batch()
    ids, am = torch.cat([p, resp], 1), torch.cat([pm, rmask], 1)
    expected = ref.logps(ids, am, None, resp.shape[1])
    got = reference_shared_prompt_logps(ref, p, pm, resp, rmask)
    live = rmask.bool()
    assert torch.allclose(got[live], expected[live], atol=1e-5)


def test_head_is_plain_detects_a_soft_capped_head():
    model, _ = load_model("tiny-llama", seed=5)
    assert head_is_plain(model)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    gemma = Gemma2ForCausalLM(config)  # tanh soft-capping after the head
    assert not head_is_plain(gemma)


def test_grpo_with_and_without_shared_prompts_train_alike(tmp_path):
    from test_ppo_trainer import _recipe, length_reward

    ends, rows = [], []
    for share in (True, False):
        method = {"estimator": "grpo", "samples_per_prompt": 4, "reference": "copy", "num_layers_unfrozen": -1,
                  "init_kl_coef": 0.1, "share_prompts": share}
        ankus.train(_recipe(tmp_path / str(share), method=method), reward_fn=length_reward)
        ends.append(AutoModelForCausalLM.from_pretrained(tmp_path / str(share) / "r" / "model").state_dict())
        rows.append([__import__("json").loads(x) for x in (tmp_path / str(share) / "r" / "metrics.jsonl").open()])
    diff = max(float((ends[0][n] - ends[1][n]).abs().max()) for n in ends[0])
    assert diff < 1e-4, diff
    for a, b in zip(*rows):
        for key in ("reward/mean", "kl/mean", "loss/pg", "loss/kl", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_shared_prompt_states_rebuild_the_whole_rows_state_at_the_split(spec):
    """Hydra's input: the rows' hidden state entering the split layer, each prompt run once; the
    branch's reference log-probs from it equal those from the whole-row forward."""
    model, _ = load_model(spec, seed=3)
    model.eval()
    ref = make_reference(model, mode="hydra", num_layers_unfrozen=1)
    p, pm, resp, rmask = _batch()
    ids, am = torch.cat([p, resp], 1), torch.cat([pm, rmask], 1)
    N, live = resp.shape[1], torch.cat([pm, rmask], 1).bool()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
        final, at_split = shared_prompt_states(model, p, pm, resp, rmask, ref.hidden_index)
        assert at_split.shape == out.hidden_states[ref.hidden_index].shape
        assert torch.allclose(at_split[live], out.hidden_states[ref.hidden_index][live], atol=1e-5)
        assert torch.allclose(final[rmask.bool()], out.hidden_states[-1][:, -N - 1:-1][rmask.bool()], atol=1e-5)
        expected = ref.logps(ids, am, out.hidden_states[ref.hidden_index], N)
        got = ref.logps(ids, am, at_split, N)
    assert torch.allclose(got[rmask.bool()], expected[rmask.bool()], atol=1e-5)


def test_hydra_ppo_with_and_without_shared_prompts_trains_alike(tmp_path, monkeypatch):
    from test_ppo_trainer import _recipe, length_reward

    from ankus.rl import rollouts

    calls = []
    monkeypatch.setattr(rollouts, "shared_prompt_states", lambda *a: calls.append(1) or shared_prompt_states(*a))
    ends, rows = [], []
    for share in (True, False):
        method = {"estimator": "gae", "samples_per_prompt": 4, "reference": "hydra", "num_layers_unfrozen": 1,
                  "init_kl_coef": 0.1, "share_prompts": share}
        ankus.train(_recipe(tmp_path / str(share), method=method), reward_fn=length_reward)
        ends.append(AutoModelForCausalLM.from_pretrained(tmp_path / str(share) / "r" / "model").state_dict())
        rows.append([__import__("json").loads(x) for x in (tmp_path / str(share) / "r" / "metrics.jsonl").open()])
        assert bool(calls) == share  # the shared scoring forward ran in the first run only
        calls.clear()
    diff = max(float((ends[0][n] - ends[1][n]).abs().max()) for n in ends[0])
    assert diff < 1e-4, diff
    for a, b in zip(*rows):
        for key in ("reward/mean", "kl/mean", "loss/pg", "loss/vf", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
