"""The generation engine against transformers' generate, naive recomputation and hand-computed numbers."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ankus import load_model
from ankus.generation import cpu_path_info, cuda_graphs, engine, kv_cache, onednn, packing, sampling
from ankus.generation.engine import (
    GenerationConfig,
    encode_prompts,
    filter_scores,
    generate,
    left_pad,
    packed_linears,
    sample_tokens,
)

PROMPTS = [
    [504, 2365, 8130, 28, 29, 441],  # different lengths: left padding is exercised
    [253, 1109],
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511],
    [4093],
]


@pytest.fixture(scope="module")
def tiny():
    return {spec: load_model(spec) for spec in ("tiny-llama", "tiny-gpt-neox", "tiny-gpt2")}


def hf_greedy(model, tok, prompts, new_tokens, **kwargs):
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, **kwargs)
    return out[:, ids.shape[1]:]


def assert_same_as_hf(out, ref, pad_id):
    """Token-for-token over HF's length; beyond it (HF stops when all rows end) ours is padding."""
    n = ref.shape[1]
    assert out.response_ids[:, :n].tolist() == ref.tolist()
    assert (out.response_ids[:, n:] == pad_id).all()


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
@pytest.mark.parametrize("packed", [True, False])
def test_greedy_matches_transformers(tiny, spec, packed):
    model, tok = tiny[spec]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, packed_linears=packed)
    out = generate(model, tok, PROMPTS, cfg)
    assert_same_as_hf(out, hf_greedy(model, tok, PROMPTS, 12), tok.pad_token_id)
    # the prompt side: left-padded, mask marks real tokens
    assert out.prompt_ids.shape == (4, 11)
    for i, p in enumerate(PROMPTS):
        assert out.prompt_ids[i, 11 - len(p):].tolist() == p
        assert out.prompt_mask[i].tolist() == [0] * (11 - len(p)) + [1] * len(p)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_static_cache_step_matches_transformers(tiny, spec, monkeypatch):
    """The GPU path (static cache, fixed-shape buffers, own 4-D mask) run eagerly on CPU."""
    model, tok = tiny[spec]
    monkeypatch.setattr(engine, "_decode_mode", lambda model, config: "static")
    out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, do_sample=False))
    assert_same_as_hf(out, hf_greedy(model, tok, PROMPTS, 10), tok.pad_token_id)


def test_repeated_prompts_share_one_prefill(tiny, monkeypatch):
    """k samples of a prompt: the prompt is prefilled once and its cache rows repeated. Greedy output
    still equals transformers' row by row; sampled rows differ, and the log-probs the engine
    reports are those of a teacher-forced forward over prompt + response."""
    model, tok = tiny["tiny-llama"]
    prefilled = []
    real = kv_cache.prefill

    def counting(m, ids, *args, **kwargs):
        prefilled.append(ids.shape[0])
        return real(m, ids, *args, **kwargs)

    monkeypatch.setattr(kv_cache, "prefill", counting)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=8, do_sample=False))
    assert prefilled == [3]  # three distinct prompts for six rows
    assert_same_as_hf(out, hf_greedy(model, tok, prompts, 8), tok.pad_token_id)
    out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=8, do_sample=True),
                   generator=torch.Generator().manual_seed(0))
    assert out.response_ids[0].tolist() != out.response_ids[2].tolist()  # same prompt, own draws
    full = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    P = out.prompt_ids.shape[1]
    logps = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    live = out.response_mask.bool()
    assert torch.allclose(logps[live], out.logprobs[live], atol=1e-5)


def test_static_slots_are_kept_and_reused_between_calls(tiny, monkeypatch):
    """The kept static cache (what a CUDA graph reads): one slot per (batch size, cache length
    rounded up to 64); a later call of the same shape runs in the same slot after a reset, other
    prompts in it still decode exactly, and a fifth shape evicts the least recently used."""
    model, tok = tiny["tiny-llama"]
    monkeypatch.setattr(engine, "_decode_mode", lambda model, config: "static")
    monkeypatch.setattr(cuda_graphs, "_SLOTS", {})
    cfg = GenerationConfig(max_new_tokens=10, do_sample=False)
    generate(model, tok, PROMPTS, cfg)
    (key, slot), = cuda_graphs._SLOTS.items()
    assert slot.length == 64 and key[2] == len(PROMPTS)
    others = [p[::-1] for p in PROMPTS]  # different tokens, same lengths: the same slot, reset
    out = generate(model, tok, others, cfg)
    assert list(cuda_graphs._SLOTS.items()) == [(key, slot)] == cuda_graphs.kept_slots()
    assert_same_as_hf(out, hf_greedy(model, tok, others, 10), tok.pad_token_id)
    for n in (1, 2, 3, 5):  # four more batch sizes: the first slot is the least recently used
        generate(model, tok, PROMPTS[:1] * n, cfg)
    assert key not in cuda_graphs._SLOTS and len(cuda_graphs._SLOTS) == cuda_graphs._MAX_SLOTS
    assert engine.release_graphs() == cuda_graphs._MAX_SLOTS and not cuda_graphs._SLOTS


def test_sliding_window_model_keeps_its_cache_layers(tiny):
    """Mistral with a 4-token window: its sliding layers stay transformers' own (only full-attention
    layers are preallocated), greedy output still matches, and the CUDA-graph path is refused."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tok = tiny["tiny-llama"]
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tok), sliding_window=4, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = MistralForCausalLM(config).eval()
    cache = kv_cache.new_cache(model, static=False, max_len=32)
    assert all(type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in cache.layers)
    llama_cache = kv_cache.new_cache(tiny["tiny-llama"][0], static=False, max_len=32)
    assert [type(layer).__name__ for layer in llama_cache.layers] == ["PreallocatedLayer"] * 4
    out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, do_sample=False))
    assert_same_as_hf(out, hf_greedy(model, tok, PROMPTS, 8), tok.pad_token_id)
    assert not cuda_graphs.graph_safe(model) and cuda_graphs.graph_safe(tiny["tiny-llama"][0])
    assert engine._decode_mode(tiny["tiny-llama"][0], GenerationConfig()) == "eager"  # CPU


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2(default_model):
    model, tok = default_model
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "2+2="]
    out = generate(model, tok, prompts, GenerationConfig(max_new_tokens=16, do_sample=False))
    ids = encode_prompts(tok, prompts, chat_template=None)
    assert ids[0] == tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    assert_same_as_hf(out, hf_greedy(model, tok, ids, 16), tok.pad_token_id)
    assert "Paris" in out.texts[0]


def test_sampling_reproducible_and_logprobs_match_full_forward(tiny):
    model, tok = tiny["tiny-llama"]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9)
    a = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    b = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    c = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # each row recomputed alone (no padding) with a full forward over prompt + response
    for i, p in enumerate(PROMPTS):
        n = int(a.response_mask[i].sum())
        resp = a.response_ids[i, :n].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + resp])).logits[0].float()  # (T, V)
        logps = torch.log_softmax(logits, -1)
        expected = [logps[len(p) - 1 + j, resp[j]].item() for j in range(n)]  # raw distribution: T=1, no filter
        assert a.logprobs[i, :n].tolist() == pytest.approx(expected, abs=1e-4)
        assert (a.logprobs[i, n:] == 0).all()


def test_filter_scores_hand_computed():
    s = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.0]])
    inf = -math.inf
    assert filter_scores(s, top_k=2).tolist() == [[inf, 3.0, 2.0, inf, 2.0]]  # ties at the k-th value kept
    assert filter_scores(s, top_k=1).tolist() == [[inf, 3.0, inf, inf, inf]]
    # probs of [ln .5, ln .3, ln .15, ln .05]: top_p=0.7 keeps .5 and .3 (mass before .3 is .5 < .7)
    s = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))
    assert torch.isinf(filter_scores(s, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.isinf(filter_scores(s, top_p=0.8)).tolist() == [[True, False, True, False]]  # .5+.3 reaches .8
    assert torch.isinf(filter_scores(s, top_p=0.81)).tolist() == [[False, False, True, False]]
    assert torch.isinf(filter_scores(s, top_p=0.3)).tolist() == [[True, False, True, True]]  # best always kept


def test_sampling_distribution_matches_hand_computed():
    """Empirical frequencies of 40k draws vs softmax(filter(logits / T)) worked out by hand."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    T, k, p = 0.8, 4, 0.95
    # by hand: rank by logit, keep the top 4, softmax at T, then keep while the mass before < 0.9
    ranked = sorted(range(6), key=lambda i: -logits[i].item())[:k]  # [5, 0, 1, 2]
    w = [math.exp(logits[i].item() / T) for i in ranked]
    probs = [x / sum(w) for x in w]
    kept, mass = [], 0.0
    for i, q in zip(ranked, probs):
        if mass < p:
            kept.append(i)
        mass += q
    z = sum(math.exp(logits[i].item() / T) for i in kept)
    expected = [math.exp(logits[i].item() / T) / z if i in kept else 0.0 for i in range(6)]
    assert kept == [5, 0, 1]  # probs .708 .203 .058 .031: the 4th starts past 0.95

    n = 40_000
    cfg = GenerationConfig(temperature=T, top_k=k, top_p=p)
    draws = sample_tokens(logits.expand(n, 6).clone(), cfg, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).tolist()
    assert counts[2] == counts[3] == counts[4] == 0
    chi2 = sum((counts[i] - n * expected[i]) ** 2 / (n * expected[i]) for i in kept)
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_inverse_cdf_never_draws_zero_probability():
    g = torch.Generator().manual_seed(0)
    assert sampling.sample_inverse_cdf(torch.tensor([[0.0, 1.0, 0.0]] * 50), g).tolist() == [1] * 50
    draws = sampling.sample_inverse_cdf(torch.tensor([[0.25, 0.0, 0.75, 0.0]]).expand(4000, 4), g)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[1] == counts[3] == 0 and abs(counts[0] - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)


def test_first_token_distribution_of_a_model(tiny):
    """Through the whole engine: first-token frequencies vs the model's own filtered softmax."""
    model, tok = tiny["tiny-gpt2"]
    prompt = [504, 2365, 8130]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    T, k = 0.05, 3  # a cold temperature so that three tokens carry visible mass
    top = torch.topk(logits, k)
    expected = torch.softmax(top.values / T, -1).tolist()
    n = 1200
    out = generate(model, tok, [prompt] * n, GenerationConfig(max_new_tokens=1, temperature=T, top_k=k),
                   generator=torch.Generator().manual_seed(1), batch_size=300)
    first = out.response_ids[:, 0]
    assert set(first.tolist()) <= set(top.indices.tolist())
    counts = [(first == t).sum().item() for t in top.indices.tolist()]
    chi2 = sum((c - n * e) ** 2 / (n * e) for c, e in zip(counts, expected) if n * e > 1)
    assert chi2 < 13.8


def test_eos_and_stop_strings_end_rows(tiny):
    model, tok = tiny["tiny-gpt-neox"]
    base = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, do_sample=False))
    assert base.response_mask.all()
    # declare row 0's 4th token an EOS (through generation_config, as chat models do)
    eos_tok = base.response_ids[0, 3].item()
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, eos_tok]
    try:
        out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, do_sample=False))
        ref = hf_greedy(model, tok, PROMPTS, 12)
    finally:
        model.generation_config.eos_token_id = old
    assert_same_as_hf(out, ref, tok.pad_token_id)  # finished rows are dropped here (1 of 4): others unchanged
    for i in range(4):
        row = base.response_ids[i].tolist()
        end = row.index(eos_tok) + 1 if eos_tok in row else 12  # up to and including EOS
        assert out.response_mask[i].tolist() == [1] * end + [0] * (12 - end)
        assert out.response_ids[i, :end].tolist() == row[:end]
        assert (out.response_ids[i, end:] == tok.pad_token_id).all() and (out.logprobs[i, end:] == 0).all()
    assert out.response_mask[0].sum() <= 4 and out.response_mask.sum(1).max() > 4  # some rows end early, not all

    # a stop string: the text of row 2 from its 5th token on, found by decoding prefixes naively
    model2, tok2 = tiny["tiny-gpt2"]
    base = generate(model2, tok2, PROMPTS, GenerationConfig(max_new_tokens=12, do_sample=False))
    row = base.response_ids[2].tolist()
    stop = tok2.decode(row[4:6])
    assert stop.strip(), "pick a visible stop string"
    ends = []
    for i in range(4):
        toks = base.response_ids[i].tolist()
        ends.append(next((j + 1 for j in range(12) if stop in tok2.decode(toks[:j + 1])), 12))
    out = generate(model2, tok2, PROMPTS, GenerationConfig(max_new_tokens=12, do_sample=False, stop_strings=[stop]))
    for i in range(4):
        assert out.response_mask[i].tolist() == [1] * ends[i] + [0] * (12 - ends[i])
        full = tok2.decode(base.response_ids[i].tolist())
        assert out.texts[i] == (full[:full.find(stop)] if stop in full else full)
    assert ends[2] <= 6 and stop not in out.texts[2]


def test_chunks_equal_one_batch(tiny):
    model, tok = tiny["tiny-llama"]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False)
    whole = generate(model, tok, PROMPTS + PROMPTS[:1], cfg)
    chunked = generate(model, tok, PROMPTS + PROMPTS[:1], cfg, batch_size=2)
    assert chunked.response_ids.tolist() == whole.response_ids.tolist()
    assert chunked.prompt_mask.tolist() == whole.prompt_mask.tolist()
    assert len(chunked.texts) == 5 and chunked.texts == whole.texts
    singles = generate(model, tok, PROMPTS[:2], cfg, batch_size=1)  # batch-1 decoding: one-row linears
    assert singles.response_ids.tolist() == whole.response_ids[:2].tolist()


def test_encode_prompts(tiny):
    _, tok = tiny["tiny-llama"]
    chat = encode_prompts(tok, ["hi"], chat_template=None)[0]
    assert chat == tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=True)["input_ids"]
    assert encode_prompts(tok, ["hi there"], chat_template=False)[0] == tok("hi there")["input_ids"]
    assert encode_prompts(tok, [[5, 6, 7]], chat_template=True)[0] == [5, 6, 7]  # ids pass through


def test_packed_linears_same_logits_and_restored(tiny):
    model, tok = tiny["tiny-gpt2"]  # GPT-2's Conv1D and an nn.Linear head
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = model(x).logits
        with packed_linears(model) as n:
            assert n == 4 * 4 + 1  # per block: c_attn, c_proj, c_fc, mlp c_proj; plus lm_head
            packed = model(x).logits
            with packed_linears(model, torch.bfloat16):  # nested: already swapped, nothing changes
                again = model(x).logits
        assert not any("forward" in m.__dict__ for m in model.modules())
        torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(again, packed)
        # an in-place weight update (an optimizer step) must be seen: packed weights are re-made
        w = model.transformer.h[0].mlp.c_fc.weight
        saved = w.clone()
        try:
            w.mul_(1.5)
            ref2 = model(x).logits
            with packed_linears(model):
                packed2 = model(x).logits
        finally:
            w.copy_(saved)
        assert not torch.allclose(ref2, ref)
        torch.testing.assert_close(packed2, ref2, atol=1e-5, rtol=1e-5)
        with packed_linears(model, torch.bfloat16):
            bf = model(x).logits
        assert bf.dtype == torch.float32 and (bf - ref).abs().max() < 0.05


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        GenerationConfig(top_k=-1)
    GenerationConfig(temperature=0.0, do_sample=False)  # greedy ignores temperature


def _freeze_all_but_last_block(model):
    from ankus.models.hydra import decoder_layers

    model.requires_grad_(False)
    decoder_layers(model)[-1].requires_grad_(True)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])  # nn.Linear; GPT-2's Conv1D (stored transposed)
def test_frozen_weights_move_into_their_packed_form_and_come_back_bit_for_bit(spec):
    model, tok = load_model(spec, seed=3)
    _freeze_all_but_last_block(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    conv1d = packing.conv1d_type()
    linear_weights = {id(m.weight) for m in model.modules() if type(m) in (torch.nn.Linear, conv1d)}
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref = model(x).logits
        with packed_linears(model):  # packed copies beside the weights
            copied = model(x).logits
        with packed_linears(model, move_frozen=True):
            pass  # a first move and rebuild: the second below must move the rebuilt weights again
        with packed_linears(model, move_frozen=True):
            moved = model(x).logits
            for name, p in params.items():
                is_moved = p.untyped_storage().nbytes() == p.element_size()  # one element: NaN
                frozen_linear = not p.requires_grad and id(p) in linear_weights and not (tied and p is head)
                assert is_moved == frozen_linear, name  # trainable, tied and non-linear weights stay
                assert p.shape == before[name].shape and p.dtype == before[name].dtype
                if is_moved:
                    assert torch.isnan(p).all()
        after = model(x).logits
    assert torch.equal(moved, copied)  # the same packed products
    torch.testing.assert_close(moved, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, ref)
    for name, p in model.named_parameters():
        assert p is params[name] and torch.equal(p, before[name]), name  # the same Parameter, bit for bit
        assert p.is_contiguous() and p.requires_grad == (name in {n for n, q in params.items() if q.requires_grad})
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_generate_moves_frozen_weights_by_default_with_the_same_output(tiny):
    model, tok = load_model("tiny-llama", seed=6)
    _freeze_all_but_last_block(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = dict(max_new_tokens=6, do_sample=True, temperature=1.0)
    out = {}
    for move in (False, True):
        out[move] = generate(model, tok, PROMPTS, GenerationConfig(move_frozen=move, **cfg),
                             generator=torch.Generator().manual_seed(1))
        engine.release_packed(model)
    assert torch.equal(out[True].response_ids, out[False].response_ids)
    assert torch.equal(out[True].logprobs, out[False].logprobs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_moving_a_memory_mapped_weight_releases_its_pages(tmp_path):
    """Weights that from_pretrained maps from a safetensors file: while moved, the mapping's pages
    for them stop counting as the process's memory (Linux); afterwards the weights are intact."""
    import re
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig

    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs Linux /proc/self/smaps to see a mapping's resident pages")
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model.requires_grad_(False)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}  # reads every page once

    def resident_kib() -> int:  # of the safetensors mapping(s)
        total, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.endswith("model.safetensors")
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    mapped = resident_kib()
    linear_kib = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers" in n and p.dim() == 2) // 1024
    if mapped < linear_kib:
        pytest.skip("this transformers copies safetensors weights instead of mapping them")
    with packed_linears(model, move_frozen=True):
        released = mapped - resident_kib()
    # the 14 block matrices (~3.4 MB) go; the tied embedding/head and the norms stay mapped
    assert released >= linear_kib - 14 * 8  # whole pages only: up to 2 edge pages a matrix stay
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model(x)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_a_lora_models_frozen_base_moves_and_samples_alike():
    """Under LoRA every base weight is frozen and moves; the adapters (trainable) do not."""
    from ankus.config import LoRAConfig
    from ankus.models.lora import apply_lora

    model, tok = load_model("tiny-llama", seed=7)
    model = apply_lora(model, LoRAConfig(True, r=4))
    with torch.no_grad():  # adapters that change the output (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad(), packed_linears(model, move_frozen=True):
        moved = {n for n, p in model.named_parameters() if p.untyped_storage().nbytes() == p.element_size()}
    bases = {n for n, p in model.named_parameters() if "base_layer.weight" in n}
    assert moved == bases and bases
    cfg = dict(max_new_tokens=6, do_sample=True, temperature=1.0)
    out = {move: generate(model, tok, PROMPTS, GenerationConfig(move_frozen=move, **cfg),
                          generator=torch.Generator().manual_seed(2)) for move in (False, True)}
    assert torch.equal(out[True].response_ids, out[False].response_ids)
    assert torch.equal(out[True].logprobs, out[False].logprobs)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.fixture
def fresh_probe():
    onednn.reset_probe()
    yield
    onednn.reset_probe()  # later tests probe the real ops again


def test_cpu_path_info_reports_the_path_the_engine_takes(fresh_probe):
    info = cpu_path_info()
    assert info["threads"] == torch.get_num_threads() and info["interop_threads"] == torch.get_num_interop_threads()
    assert info["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    model, _ = load_model("tiny-llama", seed=0)
    plain = cpu_path_info(model, GenerationConfig(packed_linears=False))
    assert (plain["path"], plain["reason"]) == (onednn.PLAIN, "packed_linears=False")
    if not onednn.probe()[0]:
        pytest.skip(f"no packed oneDNN linears here: {onednn.probe()[1]}")
    assert (info["path"], info["reason"]) == (onednn.PACKED, "oneDNN probe passed")
    assert cpu_path_info(model, GenerationConfig(bf16=True))["path"] == onednn.PACKED_BF16
    assert isinstance(info["onednn_impl"], str) and info["onednn_impl"]  # e.g. brg_matmul:avx512_core


def test_a_failed_probe_falls_back_to_plain_linears_and_says_so(fresh_probe, monkeypatch, caplog):
    """The packed op raising on this CPU: one warning on the ``ankus.generation`` logger naming the
    cause, cpu_path_info reports the plain path, and sampling gives exactly the plain path's output
    with no packed weight made."""
    model, tok = load_model("tiny-llama", seed=4)
    cfg = dict(max_new_tokens=6, do_sample=True)
    plain = generate(model, tok, PROMPTS, GenerationConfig(packed_linears=False, **cfg),
                     generator=torch.Generator().manual_seed(2))

    def broken(*args):
        raise RuntimeError("no kernel for this ISA")

    monkeypatch.setattr(onednn, "packed_matmul", broken)
    before = set(packing._PACKED)
    with caplog.at_level(logging.WARNING, logger="ankus.generation"):
        for _ in range(2):
            out = generate(model, tok, PROMPTS, GenerationConfig(**cfg), generator=torch.Generator().manual_seed(2))
            assert torch.equal(out.response_ids, plain.response_ids) and torch.equal(out.logprobs, plain.logprobs)
    warnings = [r for r in caplog.records if r.name == "ankus.generation" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # probed once per process
    assert "no kernel for this ISA" in warnings[0].getMessage() and "falls back" in warnings[0].getMessage()
    assert set(packing._PACKED) == before
    info = cpu_path_info(model)
    assert info["path"] == onednn.PLAIN and "no kernel for this ISA" in info["reason"]
    with pytest.raises(ValueError, match="no kernel for this ISA"):
        generate(model, tok, PROMPTS, GenerationConfig(bf16=True, **cfg))


def test_probe_without_onednn_names_the_cause(fresh_probe, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    ok, reason = onednn.probe()
    assert not ok and "without oneDNN" in reason
    model, _ = load_model("tiny-llama", seed=0)
    assert not packing.packed_linears_available(model)


def test_release_all_packed_empties_the_cache_and_sampling_packs_again_alike():
    model, tok = load_model("tiny-llama", seed=7)
    if not packing.packed_linears_available(model):
        pytest.skip("no packed oneDNN linears here")
    cfg = GenerationConfig(max_new_tokens=4, do_sample=True)
    first = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    ids = {id(p) for p in model.parameters()}
    held = sum(packing._PACKED[k][2] is not None for k in ids & packing._PACKED.keys())
    assert held > 0
    assert packing.release_all_packed() >= held and not packing._PACKED
    again = generate(model, tok, PROMPTS, cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.response_ids, first.response_ids) and torch.equal(again.logprobs, first.logprobs)
    assert sum(packing._PACKED[k][2] is not None for k in ids & packing._PACKED.keys()) == held
