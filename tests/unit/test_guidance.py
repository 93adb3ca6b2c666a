"""Classifier-free guidance: the mixing formula by hand, the engine's guided scores against two
separate full forwards, gamma = 1 against plain sampling, and greedy CFG against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from ankus import load_model
from ankus.generation import engine
from ankus.generation.engine import GenerationConfig, generate, left_pad
from ankus.generation.guidance import cfg_scores, unconditional_prompts

PROMPTS = [[504, 2365, 8130, 28, 29, 441], [253, 1109], [1, 9690, 198, 2683, 359]]
NEGATIVES = [[4093, 198, 17], [29, 30, 31], [28, 441, 198]]  # equal lengths: no padding in that branch


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def test_cfg_scores_hand_computed():
    # cond logits (0, ln 3): probs (.25, .75); uncond logits (5, 5): probs (.5, .5)
    cond = torch.tensor([[0.0, math.log(3.0)]])
    uncond = torch.tensor([[5.0, 5.0]])
    # gamma 2: 2 (ln .25 - ln .5) + ln .5 = ln .125 ; 2 (ln .75 - ln .5) + ln .5 = ln 1.125
    assert cfg_scores(cond, uncond, 2.0)[0].tolist() == pytest.approx([math.log(0.125), math.log(1.125)], abs=1e-6)
    assert cfg_scores(cond, uncond, 1.0)[0].tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-6)
    assert cfg_scores(cond, uncond, 0.0)[0].tolist() == pytest.approx([math.log(0.5)] * 2, abs=1e-6)


def test_unconditional_prompts():
    assert unconditional_prompts([[1, 2, 3], [4]], None) == [[3], [4]]
    assert unconditional_prompts([[1, 2, 3], [4]], [[7, 8], [9]]) == [[7, 8], [9]]
    with pytest.raises(ValueError, match="negative prompts"):
        unconditional_prompts([[1, 2, 3], [4]], [[7]])
    with pytest.raises(ValueError, match="no tokens"):
        unconditional_prompts([[1]], [[]])


def count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_gamma_one_is_plain_sampling_without_extra_forward(llama):
    model, tok = llama
    calls, handle = count_forwards(model)
    try:
        plain = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, ignore_eos=True),
                         generator=torch.Generator().manual_seed(0))
        n_plain = len(calls)
        guided = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, ignore_eos=True, guidance_scale=1.0),
                          negative_prompts=NEGATIVES, generator=torch.Generator().manual_seed(0))
        n_guided = len(calls) - n_plain
    finally:
        handle.remove()
    assert n_plain == n_guided == 8  # prefill + 7 decode steps, no unconditional branch
    assert torch.equal(plain.response_ids, guided.response_ids)
    assert torch.equal(plain.logprobs, guided.logprobs)


@pytest.mark.parametrize("negatives", [None, NEGATIVES])
def test_guided_scores_equal_two_full_forwards(llama, monkeypatch, negatives):
    model, tok = llama
    gamma = 1.7
    seen = []
    original = engine.sample_tokens

    def spy(scores, config, generator=None):
        seen.append(scores.clone())
        return original(scores, config, generator)

    monkeypatch.setattr(engine, "sample_tokens", spy)
    out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=2, guidance_scale=gamma, ignore_eos=True),
                   negative_prompts=negatives, generator=torch.Generator().manual_seed(0))
    uncond = [n for n in negatives] if negatives else [p[-1:] for p in PROMPTS]
    for step in range(2):
        for i, p in enumerate(PROMPTS):
            so_far = out.response_ids[i, :step].tolist()
            with torch.no_grad():
                cond_logits = model(torch.tensor([p + so_far])).logits[0, -1]
                uncond_logits = model(torch.tensor([uncond[i] + so_far])).logits[0, -1]
            logp, ulogp = torch.log_softmax(cond_logits, -1), torch.log_softmax(uncond_logits, -1)
            expected = gamma * (logp - ulogp) + ulogp
            torch.testing.assert_close(seen[step][i], expected, atol=1e-5, rtol=0)
        # logprobs stay those of the raw conditional model, not of the guided scores
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([p + out.response_ids[i].tolist()])).logits[0].float()
        raw = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + 1].gather(-1, out.response_ids[i][:, None])
        assert out.logprobs[i].tolist() == pytest.approx(raw.squeeze(-1).tolist(), abs=1e-4)


def hf_cfg_greedy(model, tok, gamma, negatives, new_tokens):
    ids, mask = left_pad(PROMPTS, tok.pad_token_id)
    kwargs = {} if negatives is None else {"negative_prompt_ids": torch.tensor(negatives)}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          guidance_scale=gamma, pad_token_id=tok.pad_token_id, **kwargs)[:, ids.shape[1]:]


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("negatives", [None, NEGATIVES])
def test_greedy_cfg_matches_transformers(llama, negatives, mode, monkeypatch):
    """transformers 5.24 still has CFG in generate (guidance_scale, negative_prompt_ids). 'static'
    is the GPU path's static cache and fixed-shape step, run eagerly on CPU."""
    model, tok = llama
    if mode == "static":
        monkeypatch.setattr(engine, "_decode_mode", lambda model, config: "static")
    gamma = 3.0
    out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False, guidance_scale=gamma),
                   negative_prompts=negatives)
    ref = hf_cfg_greedy(model, tok, gamma, negatives, 10)
    plain = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False))
    assert out.response_ids[:, :ref.shape[1]].tolist() == ref.tolist()
    assert not torch.equal(out.response_ids, plain.response_ids)  # guidance changed something


def test_greedy_cfg_with_rows_ending_early(llama):
    """A row hits EOS at step 3: it is dropped from both branches' caches; the others go on as
    in transformers (which keeps computing finished rows)."""
    model, tok = llama
    gamma = 3.0
    base = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False, guidance_scale=gamma))
    eos_tok = base.response_ids[1, 2].item()
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, eos_tok]
    try:
        out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False, guidance_scale=gamma))
        ref = hf_cfg_greedy(model, tok, gamma, None, 10)
    finally:
        model.generation_config.eos_token_id = old
    ends = [r.index(eos_tok) + 1 if eos_tok in r else 10 for r in base.response_ids.tolist()]
    assert ends[1] <= 3 and max(ends) == 10
    for i in range(3):
        assert out.response_mask[i].tolist() == [1] * ends[i] + [0] * (10 - ends[i])
        assert out.response_ids[i, :ends[i]].tolist() == ref[i, :ends[i]].tolist() == base.response_ids[i, :ends[i]].tolist()


def test_config_negative_prompt_is_encoded_like_prompts(llama, monkeypatch):
    model, tok = llama
    got = {}
    original = engine._generate_chunk

    def spy(model, tokenizer, prompt_ids, uncond_ids, *args):
        got["uncond"] = uncond_ids
        return original(model, tokenizer, prompt_ids, uncond_ids, *args)

    monkeypatch.setattr(engine, "_generate_chunk", spy)
    generate(model, tok, ["hello", "world"], GenerationConfig(max_new_tokens=1, guidance_scale=2.0,
                                                              negative_prompt="bad", chat_template=False))
    assert got["uncond"] == [tok("bad")["input_ids"]] * 2
