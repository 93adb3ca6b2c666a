"""ILQL trainer: data alignment by hand, the trimmed forward, one step's Polyak rule, β-guided
sampling against hand-written samplers, a tiny end-to-end run and resume."""

import json
import math

import pytest
import torch

from ankus.config import ModelConfig, RunConfig, TrainerConfig
from ankus.data.io import DataError
from ankus.generation.engine import GenerationConfig, generate
from ankus.losses.ilql import ilql_loss
from ankus.models.heads import ILQLHeads, q_at
from ankus.models.loading import RANDOMWALKS_MODEL, randomwalks_gpt2, randomwalks_tokenizer
from ankus.trainers import ilql
from ankus.trainers.ilql import (Config, ILQLData, ILQLEval, ILQLMethod, ilql_collate, ilql_forward, ilql_generate,
                                 load_ilql, load_samples, standardize_returns, tokenize_samples, train, train_step)


@pytest.fixture(scope="module")
def rw():
    return randomwalks_gpt2(seed=0)


@pytest.fixture(scope="module")
def tiny_gpt2():
    from ankus import load_model

    return load_model("tiny-gpt2", seed=3)


# ---------------------------------------------------------------- data prep, by hand


def test_collate_places_return_on_last_action_and_masks_prompt():
    # row 0: prompt [5, 6], completion [7, 8, 2]; row 1: prompt [9], completion [3, 2]
    b = ilql_collate([[5, 6], [9]], [[7, 8, 2], [3, 2]], [1.5, -0.5], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 3, 2, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # step t = state after tokens 0..t, action = token t + 1
    assert b["actions"].tolist() == [[6, 7, 8, 2], [3, 2, 0, 0]]
    # row 0: the action 6 is a prompt token (no training); 7, 8, 2 are the completion
    assert b["mask"].tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]
    assert b["rewards"].tolist() == [[0, 0, 0, 1.5], [0, -0.5, 0, 0]]
    assert b["dones"].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]


def test_standardize_returns_by_hand():
    # mean 3, deviations (-2, -1, 0, 3), unbiased variance 14/3
    std = math.sqrt(14 / 3)
    assert standardize_returns([1, 2, 3, 6]) == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    assert standardize_returns([0.4, 0.4]) == [0.0, 0.0]  # constant: only centred
    assert standardize_returns([2.0]) == [0.0]


def test_randomwalks_tokenizer_and_tokenize_samples():
    tok = randomwalks_tokenizer()
    assert len(tok) == 29 and tok.eos_token_id == tok.pad_token_id == 0
    a, d, f = (tok.convert_tokens_to_ids(c) for c in "adf")
    assert (a, d, f) == (3, 6, 8)
    assert tok("d f a")["input_ids"] == tok("dfa")["input_ids"] == tok("d|f|a")["input_ids"][::2] == [d, f, a]
    assert tok.decode([d, f, a, 0], skip_special_tokens=True) == "d f a"

    p, c = tokenize_samples(tok, ["d", "b"], [" f a", " a"], seq_length=11)
    assert p == [[d], [4]] and c == [[f, a, 0], [a, 0]]
    # seq_length 3: the completion is cut to 2 tokens and loses its EOS
    p, c = tokenize_samples(tok, ["d"], [" f a"], seq_length=3)
    assert p == [[d]] and c == [[f, a]]
    p, c = tokenize_samples(tok, ["d"], [" f a"], template="x{prompt}", seq_length=11, append_eos=False)
    assert p == [[tok.convert_tokens_to_ids("x"), d]] and c == [[f, a]]


def test_tokenize_samples_with_a_bpe_tokenizer(tiny_gpt2):
    _, tok = tiny_gpt2  # SmolLM2's tokenizer: "dfa" would merge, the spaced walk does not
    p, c = tokenize_samples(tok, ["d"], [" f a"], chat_template=False)
    assert p == [[84]] and c == [[275, 253, tok.eos_token_id]]


def test_load_samples_randomwalks_and_jsonl(tmp_path):
    from ankus.rewards.randomwalks import generate_random_walks

    task = generate_random_walks(seed=1000)
    prompts, completions, rewards = load_samples(ILQLData(dataset="randomwalks"))
    assert len(prompts) == 1000
    for i in (0, 1, 500):
        walk = task.walks[i]
        assert prompts[i] == walk[0] and completions[i].replace(" ", "") == walk[1:]
        assert rewards[i] == task.optimality(walk)

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": " b", "reward": 0.5}\n{"prompt": "c", "completion": "", "reward": -1}\n')
    assert load_samples(ILQLData(dataset=str(path))) == (["a", "c"], [" b", ""], [0.5, -1.0])
    path.write_text('{"prompt": "a", "completion": " b", "reward": "high"}\n')
    with pytest.raises(DataError, match="row 1 needs a finite number 'reward'"):
        load_samples(ILQLData(dataset=str(path)))
    with pytest.raises(FileNotFoundError, match="make-sentiment-dataset"):
        load_samples(ILQLData(dataset=str(tmp_path / "sentiment_offline.jsonl")))


# ---------------------------------------------------------------- forward and step


def _walk_batch(tok, n=6, seed=0):
    prompts, completions, rewards = load_samples(ILQLData())
    idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    p, c = tokenize_samples(tok, [prompts[i] for i in idx], [completions[i] for i in idx], seq_length=11)
    # prompts of 3 and 6 tokens: the trimmed window starts inside the longer prompt
    b = tok.convert_tokens_to_ids("b")
    p = [[b] * (5 if i == 0 else 2) + row for i, row in enumerate(p)]
    return ilql_collate(p, c, standardize_returns([rewards[i] for i in idx]), tok.pad_token_id)


def test_trimmed_forward_gives_the_loss_of_the_full_sequence(rw):
    model, tok = rw
    torch.manual_seed(0)
    heads = ILQLHeads(144, len(tok), two_qs=True)
    batch = _walk_batch(tok)
    with torch.no_grad():
        out = ilql_forward(model, heads, batch)
        trimmed, stats = ilql_loss(*out)
        # naive: every position, no trimming
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        qs, tqs, vs = heads(full.hidden_states[-1])
        naive, naive_stats = ilql_loss(full.logits[:, :-1], [q[:, :-1] for q in qs], [q[:, :-1] for q in tqs], vs,
                                       batch["actions"], batch["rewards"], batch["dones"], batch["mask"])
    assert out[0].shape[1] < batch["actions"].shape[1]  # something was trimmed
    assert out[3].shape[1] == out[0].shape[1] + 1  # V includes the state after the last step
    torch.testing.assert_close(trimmed, naive, rtol=1e-5, atol=1e-6)
    # target Q̂ read at the taken tokens only, yet the same values as the full target heads
    for key in ("values/target_q", "loss/v", "values/advantage"):
        torch.testing.assert_close(stats[key], naive_stats[key], rtol=1e-5, atol=1e-6)


def test_train_step_updates_and_polyak_syncs_targets(rw):
    model, tok = rw
    model = __import__("copy").deepcopy(model)
    torch.manual_seed(1)
    alpha = 0.3
    heads = ILQLHeads(144, len(tok), two_qs=True, alpha=alpha)
    method = ILQLMethod(alpha=alpha, steps_for_target_q_sync=2)
    params = list(model.parameters()) + [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _walk_batch(tok, n=8, seed=1)
    lm0 = [p.detach().clone() for p in model.parameters()]
    v0 = [p.detach().clone() for p in heads.v_head.parameters()]
    t0 = [p.detach().clone() for p in heads.target_q_heads.parameters()]

    stats = train_step(model, heads, batch, opt, params, method, step=1)  # 1 % 2 != 0: no sync
    assert stats["skipped"] == 0 and math.isfinite(stats["loss"])
    assert all(torch.equal(a, b) for a, b in zip(t0, heads.target_q_heads.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(lm0, model.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(v0, heads.v_head.parameters()))

    stats = train_step(model, heads, batch, opt, params, method, step=2)  # sync
    online = [p.detach() for p in heads.q_heads.parameters()]
    for target, q, before in zip(heads.target_q_heads.parameters(), online, t0):
        expected = alpha * q + (1 - alpha) * before
        torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)
        assert not torch.equal(target, before)


def test_grad_accum_matches_one_batch(rw):
    model, tok = rw
    batch = _walk_batch(tok, n=8, seed=2)
    grads = []
    for accum in (1, 4):
        m = __import__("copy").deepcopy(model).eval()  # eval: no dropout, same forward both times
        torch.manual_seed(2)
        heads = ILQLHeads(144, len(tok))
        params = list(m.parameters()) + [p for p in heads.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        stats = train_step(m, heads, batch, opt, params, ILQLMethod(), step=1, max_grad_norm=0, grad_accum=accum)
        grads.append((stats["loss"], stats["grad_norm"]))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    assert grads[1][1] == pytest.approx(grads[0][1], rel=1e-4)


# ---------------------------------------------------------------- generation


def _naive_sample(model, tok, prompt_ids, steps, top_k, gen, extra=None):
    """No KV cache, no padding: a full forward of each row's whole sequence every step, the ILQL
    scores written out, and one draw per row per step with the engine's sampler."""
    from ankus.generation.engine import sample_tokens

    config = GenerationConfig(top_k=top_k)
    seqs = [list(p) for p in prompt_ids]
    for _ in range(steps):
        rows = []
        for s in seqs:
            logits = model(input_ids=torch.tensor([s])).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, -1) + (extra if extra is not None else 0.0))
        tokens = sample_tokens(torch.stack(rows), config, gen)
        for s, t in zip(seqs, tokens.tolist()):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompt_ids)]


def test_beta0_generation_is_plain_sampling(tiny_gpt2):
    model, tok = tiny_gpt2
    torch.manual_seed(0)
    heads = ILQLHeads(64, len(tok))
    cfg = GenerationConfig(max_new_tokens=6, top_k=5, chat_template=False, ignore_eos=True)
    prompts = ["The film", "A quiet story about"]  # 2 and 4 tokens: left padding and positions matter
    ours = ilql_generate(model, heads, tok, prompts, cfg, beta=0.0, generator=torch.Generator().manual_seed(7))
    engine = generate(model, tok, prompts, cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours.response_ids, engine.response_ids)
    assert ours.texts == engine.texts
    torch.testing.assert_close(ours.logprobs, engine.logprobs, rtol=1e-4, atol=1e-4)
    p_ids = [tok(p)["input_ids"] for p in prompts]
    with torch.no_grad():
        naive = _naive_sample(model, tok, p_ids, 6, 5, torch.Generator().manual_seed(7))
    assert ours.response_ids.tolist() == naive
    # guidance does change the draws
    with torch.no_grad():
        for q in heads.target_q_heads:
            q[-1].bias.normal_(0, 5.0)
    guided = ilql_generate(model, heads, tok, prompts, cfg, beta=1.0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(guided.response_ids, ours.response_ids)


def test_guidance_uses_min_of_target_heads_minus_v(tiny_gpt2):
    """Heads whose outputs ignore the state: Q̂_0 = Q̂_1 = +1 on token A, Q̂_0 = +1 and Q̂_1 = −1
    on token B, V = 0.7; the online heads prefer token C. Sampling must follow log π + β(min Q̂ − V)."""
    model, tok = tiny_gpt2
    V = len(tok)
    A, B, C = 300, 400, 500
    heads = ILQLHeads(64, V)
    with torch.no_grad():
        for i, (q, tq) in enumerate(zip(heads.q_heads, heads.target_q_heads)):
            for head in (q, tq):
                head[-1].weight.zero_()
                head[-1].bias.zero_()
            tq[-1].bias[A] = 1.0
            tq[-1].bias[B] = 1.0 if i == 0 else -1.0
            q[-1].bias[C] = 50.0
        heads.v_head[-1].weight.zero_()
        heads.v_head[-1].bias.fill_(0.7)
    cfg = GenerationConfig(max_new_tokens=4, top_k=5, chat_template=False, ignore_eos=True)
    prompts = ["The film", "A quiet story about"]
    out = ilql_generate(model, heads, tok, prompts, cfg, beta=100.0, generator=torch.Generator().manual_seed(3))
    assert (out.response_ids == A).all()  # β = 100: the +100 on A dominates; B gets min(1, -1) = -1
    min_q = torch.zeros(V)
    min_q[A], min_q[B] = 1.0, -1.0
    extra = 2.0 * (min_q - 0.7)  # β = 2
    out = ilql_generate(model, heads, tok, prompts, cfg, beta=2.0, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        naive = _naive_sample(model, tok, [tok(p)["input_ids"] for p in prompts], 4, 5,
                              torch.Generator().manual_seed(4), extra=extra)
    assert out.response_ids.tolist() == naive


def _forcing_heads(hidden, vocab, token):
    """Heads with Q̂ = 1 on ``token`` and 0 elsewhere in every state, V = 0."""
    heads = ILQLHeads(hidden, vocab)
    with torch.no_grad():
        for p in heads.parameters():
            p.zero_()
        for tq in heads.target_q_heads:
            tq[-1].bias[token] = 1.0
    return heads


def test_generation_ends_rows_at_eos_and_stop_strings(rw):
    model, tok = rw
    cfg = GenerationConfig(max_new_tokens=5, top_k=3, chat_template=False)
    eos = _forcing_heads(144, len(tok), tok.eos_token_id)
    out = ilql_generate(model, eos, tok, ["d", "b"], cfg, beta=100.0, generator=torch.Generator().manual_seed(0))
    assert out.response_ids.tolist() == [[0] * 5] * 2  # EOS, then pad (also id 0)
    assert out.response_mask.tolist() == [[1, 0, 0, 0, 0]] * 2 and out.texts == ["", ""]

    h = tok.convert_tokens_to_ids("h")
    forced = _forcing_heads(144, len(tok), h)
    cfg = GenerationConfig(max_new_tokens=5, top_k=3, chat_template=False, stop_strings=["h h"])
    out = ilql_generate(model, forced, tok, ["d"], cfg, beta=100.0, generator=torch.Generator().manual_seed(0))
    assert out.response_ids.tolist() == [[h, h, 0, 0, 0]] and out.response_mask.tolist() == [[1, 1, 0, 0, 0]]
    assert out.texts == [""]  # cut before the stop string


# ---------------------------------------------------------------- end to end


def _tiny_cfg(tmp_path, name, **trainer):
    return Config(
        model=ModelConfig(spec=RANDOMWALKS_MODEL, seed=5),
        trainer=TrainerConfig(lr=1e-3, batch_size=16, total_steps=trainer.pop("total_steps", 6), log_every=1,
                              **trainer),
        method=ILQLMethod(alpha=0.5, steps_for_target_q_sync=2),
        data=ILQLData(dataset="randomwalks", seq_length=11, num_eval=3),
        generation=GenerationConfig(max_new_tokens=10, top_k=10, chat_template=False),
        eval=ILQLEval(betas=[0.0, 1.0], samples_per_prompt=2),
        run=RunConfig(out_dir=str(tmp_path), name=name, progress=False),
    )


def test_tiny_run_trains_saves_and_loads(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    summary = train(_tiny_cfg(tmp_path, "a"))
    run = tmp_path / "a"
    assert summary["steps"] == 6 and set(summary["eval"]) == {"beta=0", "beta=1"}
    assert all(0.0 <= v <= 1.0 for v in summary["eval"].values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "eval/base_beta=0" in rows[0] and "eval/beta=1" in rows[-1]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert (run / "metrics.png").exists() and (run / "eval_samples.jsonl").exists()

    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    init, _ = randomwalks_gpt2(seed=5)
    diffs = [not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), init.state_dict().values())]
    assert any(diffs)
    model, tok, heads = load_ilql(run / "model")
    assert tok("d a")["input_ids"] == [6, 3]
    state = load_file(str(run / "model" / "ilql_heads.safetensors"))
    # 3 syncs at alpha 0.5 moved the targets off their initial copy of the online heads
    assert not torch.equal(state["target_q_heads.0.2.weight"], state["q_heads.0.2.weight"])
    # the saved LM + heads sample exactly what the trained ones did at the final evaluation
    cfg = _tiny_cfg(tmp_path, "a")
    means, _ = ilql.evaluate(model, heads, tok, ilql._eval_prompts(cfg.data), cfg, [0.0, 1.0], ilql._eval_scorer(cfg))
    assert means == pytest.approx(summary["eval"], abs=1e-9)


def test_resumed_run_equals_uninterrupted(tmp_path):
    from ankus.checkpoint import list_checkpoints
    from safetensors.torch import load_file

    train(_tiny_cfg(tmp_path, "full", total_steps=4, checkpoint_every=2))
    run = tmp_path / "full"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]
    first = load_file(str(run / "model" / "ilql_heads.safetensors"))
    first_metrics = (run / "metrics.jsonl").read_text()
    # pretend the run died after step 2: drop what came later, then resume
    import shutil

    shutil.rmtree(run / "model")
    train(_tiny_cfg(tmp_path, "full", total_steps=4, checkpoint_every=2), resume=True)
    second = load_file(str(run / "model" / "ilql_heads.safetensors"))
    for k in first:
        torch.testing.assert_close(second[k], first[k], rtol=0, atol=1e-6)
    losses = lambda text: [json.loads(r)["loss"] for r in text.splitlines() if '"loss"' in r]  # noqa: E731
    assert losses((run / "metrics.jsonl").read_text()) == pytest.approx(losses(first_metrics), rel=1e-5)


# ---------------------------------------------------------------- frozen LM: cached hidden states


def _walk_samples(tok, n=6, seed=0):
    prompts, completions, rewards = load_samples(ILQLData())
    idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    p, c = tokenize_samples(tok, [prompts[i] for i in idx], [completions[i] for i in idx], seq_length=11)
    b = tok.convert_tokens_to_ids("b")
    p = [[b] * (5 if i == 0 else 2) + row for i, row in enumerate(p)]  # prompts of different lengths
    return p, c, standardize_returns([rewards[i] for i in idx])


@pytest.mark.parametrize("q_head,cql_scale", [("mlp", 0.1), ("unembedding", 0.1), ("unembedding", 0.0)])
def test_cached_step_equals_the_full_forward_step_with_a_frozen_lm(rw, q_head, cql_scale):
    # the cache holds hidden states and LM cross-entropies per sample; a step on it must give the
    # loss, the stats and the head updates of the step that runs the (frozen) LM on the batch
    model, tok = rw
    model = __import__("copy").deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    p_ids, c_ids, returns = _walk_samples(tok, n=8, seed=3)
    cache = ilql.cache_trunk(model, p_ids, c_ids, tok.pad_token_id, batch_size=3)
    assert [c["hidden"].shape[0] for c in cache] == [len(c) + 1 for c in c_ids]
    full = ilql_collate(p_ids, c_ids, returns, tok.pad_token_id)
    cached = ilql.cached_collate(cache, c_ids, returns)
    out = []
    for batch in (full, cached):
        torch.manual_seed(4)
        heads = ilql._make_heads(ILQLMethod(q_head=q_head), 144, len(tok), model)
        if q_head == "unembedding":  # move the zero-initialised heads off zero so the test means something
            with torch.no_grad():
                for p in heads.q_heads.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        params = [p for p in heads.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        method = ILQLMethod(steps_for_target_q_sync=1, alpha=0.5, cql_scale=cql_scale)
        stats = train_step(model, heads, batch, opt, params, method, step=1, grad_accum=2)
        out.append((stats, [p.detach().clone() for p in heads.parameters()]))
    (s_full, p_full), (s_cached, p_cached) = out
    if cql_scale == 0:  # the cached step reads Q at the taken tokens only: no vocabulary-wide CQL value
        assert s_full.pop("loss/cql") > 0 and "loss/cql" not in s_cached
    assert s_full.keys() == s_cached.keys()
    for k in s_full:
        assert s_cached[k] == pytest.approx(s_full[k], rel=1e-4, abs=1e-5), k
    for a, b in zip(p_full, p_cached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unembedding_q_heads_start_at_zero_share_the_matrix_and_round_trip(rw, tmp_path):
    model, tok = rw
    torch.manual_seed(0)
    heads = ilql._make_heads(ILQLMethod(q_head="unembedding"), 144, len(tok), model)
    h = torch.randn(2, 3, 144)
    qs, tqs, vs = heads(h)
    assert all(torch.equal(q, torch.zeros(2, 3, len(tok))) for q in qs + tqs)
    W = model.get_output_embeddings().weight
    assert all(q.unembedding.data_ptr() == heads.q_heads[0].unembedding.data_ptr()
               for q in list(heads.q_heads) + list(heads.target_q_heads))  # one frozen copy for all heads
    assert torch.equal(heads.q_heads[0].unembedding, W) and heads.q_heads[0].unembedding.data_ptr() != W.data_ptr()
    trainable = sum(p.numel() for p in heads.q_heads[0].parameters())
    assert trainable == 144 * 288 + 288 + 288 * 144 + 144 + len(tok)  # g: h -> 2h -> d, and a bias per token
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    # Q at the taken token without the vocabulary-wide output, by hand
    a = torch.tensor([[1, 5, 7], [0, 2, 28]])
    q0 = heads.q_heads[0]
    by_hand = torch.einsum("btd,btd->bt", q0.mlp(h), W[a]) + q0.bias[a]
    torch.testing.assert_close(q_at(q0, h, a), by_hand)
    torch.testing.assert_close(q0(h).gather(-1, a[..., None])[..., 0], by_hand)
    ilql.save_ilql(model, heads, tok, tmp_path / "m")
    _, _, loaded = load_ilql(tmp_path / "m")
    assert isinstance(loaded.q_heads[0], type(q0))
    for x, y in zip(heads(h), loaded(h)):
        for u, v in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            torch.testing.assert_close(u, v)


# ---------------------------------------------------------------- honest configuration


REFUSED = [  # (override, the field the error must name)
    ("generation.guidance_scale=2.0", "generation.guidance_scale"),
    ("generation.negative_prompt=bad", "generation.negative_prompt"),
    ("generation.packed_linears=false", "generation.packed_linears"),
    ("generation.move_frozen=false", "generation.move_frozen"),
    ("generation.bf16=true", "generation.bf16"),
    ("generation.cuda_graph=false", "generation.cuda_graph"),
    ("generation.compile=true", "generation.compile"),
    ("trainer.fsdp=true", "trainer.fsdp"),
    ("lora.r=4", "lora.r"),  # adapter settings without lora.enabled
    ("lora.alpha=8", "lora.alpha"),
    ("lora.dropout=0.1", "lora.dropout"),
    ("lora.target=[c_attn]", "lora.target"),
]


@pytest.mark.parametrize("override,field", REFUSED)
def test_fields_ilql_does_not_use_are_refused(tmp_path, override, field):
    from ankus.config import ConfigError, build

    cfg = build(Config, {"run": {"out_dir": str(tmp_path)}}, [override])
    with pytest.raises(ConfigError, match=rf"{field} = .* is not used by ilql"):
        ilql.check_config(cfg)
    with pytest.raises(ConfigError, match=rf"{field} = .* is not used by ilql"):
        train(cfg)  # refused before anything is loaded or written
    assert not any(tmp_path.iterdir())
    ilql.check_config(build(Config, {}, []))  # the defaults pass


def test_conditionally_unused_fields_are_refused(tmp_path):
    from ankus.config import ConfigError, build

    # walks_seed only seeds the random-walks data, prompts or scorer
    with pytest.raises(ConfigError, match=r"data.walks_seed = 7 is not used by ilql"):
        ilql.check_config(build(Config, {}, ["data.dataset=x.jsonl", "data.walks_seed=7"]))
    ilql.check_config(build(Config, {}, ["data.dataset=x.jsonl", "data.walks_seed=7", "eval.reward=randomwalks"]))
    ilql.check_config(build(Config, {}, ["data.walks_seed=7"]))  # randomwalks data
    # with LoRA the adapters train: num_layers_unfrozen would be ignored
    with pytest.raises(ConfigError, match=r"method.num_layers_unfrozen = 0 is not used by ilql"):
        ilql.check_config(build(Config, {}, ["lora.enabled=true", "method.num_layers_unfrozen=0"]))
    ilql.check_config(build(Config, {}, ["lora.enabled=true"]))
    # two refused fields: both named in one error
    with pytest.raises(ConfigError, match=r"generation.bf16 = True .*; trainer.fsdp = True"):
        ilql.check_config(build(Config, {}, ["generation.bf16=true", "trainer.fsdp=true"]))
    with pytest.raises(ConfigError, match="steps_for_target_q_sync must be >= 1"):
        ilql.check_config(build(Config, {}, ["method.steps_for_target_q_sync=0"]))


def test_lora_section_replaces_method_lora_keys(rw):
    from ankus.config import ConfigError, LoRAConfig, build
    from ankus.models.lora import is_peft

    for old in ("method.lora_r=4", "method.lora_alpha=8"):
        with pytest.raises(ConfigError, match="unknown key"):
            build(Config, {}, [old])
    cfg = build(Config, {}, ["lora.enabled=true", "lora.r=4", "lora.alpha=8"])
    assert cfg.lora == LoRAConfig(enabled=True, r=4, alpha=8)
    model = __import__("copy").deepcopy(rw[0])
    policy = ilql._prepare_trainable(model, cfg)
    assert is_peft(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert policy.peft_config["default"].r == 4 and policy.peft_config["default"].lora_alpha == 8
    # without LoRA: num_layers_unfrozen freezes all but the top blocks
    model = __import__("copy").deepcopy(rw[0])
    policy = ilql._prepare_trainable(model, build(Config, {}, ["method.num_layers_unfrozen=0"]))
    assert not is_peft(policy) and not any(p.requires_grad for p in policy.parameters())


def test_lr_schedule_follows_trainer_config(tmp_path):
    from ankus.optim import lr_multiplier

    cfg = _tiny_cfg(tmp_path, "cos", total_steps=4, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.2)
    cfg.eval.betas = [0.0]
    cfg.run.save_model = False
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "cos" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # the logged lr is the one for the next step (the scheduler has stepped)
    expected = [1e-3 * lr_multiplier(s, warmup_steps=1, total_steps=4, schedule="cosine", min_lr_ratio=0.2)
                for s in range(1, 5)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[-1] == pytest.approx(2e-4) and len(set(lrs)) == 4
