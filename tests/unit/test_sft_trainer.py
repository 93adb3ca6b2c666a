"""SFT trainer: loss masking in the trainer's own batches (token by token), packing/bucketing
equivalence with a naive per-example loop, gradient accumulation, parameters moving, resume."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from ankus import load_model
from ankus.config import build
from ankus.data.batching import Example, bucketed_batches, shuffled_batches, make_batch, pack_batch, pack_rows, packing_is_exact
from ankus.trainers import sft
from ankus.optim import lr_multiplier
from ankus.rewards.randomwalks import randomwalk_rows, spaced_walk
from ankus.trainers.sft import SFTData, sft_batch_loss, tokenize_chat, tokenize_prompt_completion, tokenize_row

# SmolLM2 token ids, read once off the tokenizer and written down: 'b' 82, ' h' 294, ' a' 253,
# '<|im_end|>' (EOS) 2, '<|im_start|>' 1, '\n' 198, 'ass' 520, 'istant' 9531.
B, H, A, EOS, IM_START, NL, ASS, ISTANT = 82, 294, 253, 2, 1, 198, 520, 9531


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama")[1]


def test_randomwalk_rows_are_space_separated():
    assert spaced_walk("bha") == "b h a"
    rows = randomwalk_rows(seed=1000, n_walks=5)
    for r in rows:
        assert len(r["prompt"]) == 1 and r["completion"].startswith(" ")
        assert (r["prompt"] + r["completion"]).replace(" ", "") in {w for w in _walks()}


def _walks():
    from ankus.rewards.randomwalks import generate_random_walks

    return generate_random_walks(seed=1000, n_walks=5).walks


def test_prompt_completion_tokens_and_mask(tok):
    ex = tokenize_prompt_completion(tok, "b", " h a", add_eos=True)
    assert ex.input_ids == [B, H, A, EOS]
    assert ex.loss_mask == [0, 1, 1, 1]  # the prompt 'b' is context; ' h', ' a' and EOS are learned
    no_eos = tokenize_prompt_completion(tok, "b", " h a", add_eos=False)
    assert no_eos.input_ids == [B, H, A] and no_eos.loss_mask == [0, 1, 1]
    # truncation keeps the left part; an example whose targets are all cut is dropped
    assert tokenize_prompt_completion(tok, "b", " h a", max_length=2).input_ids == [B, H]
    assert tokenize_prompt_completion(tok, "b", " h a", max_length=1) is None


def test_chat_mask_covers_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ex = tokenize_chat(tok, msgs)
    pieces = [(tok.decode([t]), m) for t, m in zip(ex.input_ids, ex.loss_mask)]
    targets = "".join(s for s, m in pieces if m)
    assert targets == "hello<|im_end|>\nciao<|im_end|>\n"
    # everything else -- default system prompt, user turns, the assistant headers -- is context
    context = "".join(s for s, m in pieces if not m)
    assert context.endswith("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")
    assert "hello" not in context and "ciao" not in context
    # the tokens are exactly the full rendered conversation's
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    # each target run starts right after '<|im_start|>assistant\n'
    starts = [i for i in range(1, len(ex.loss_mask)) if ex.loss_mask[i] and not ex.loss_mask[i - 1]]
    assert len(starts) == 2
    for i in starts:
        assert ex.input_ids[i - 4:i] == [IM_START, ASS, ISTANT, NL]
    # a trailing user turn teaches nothing and is dropped
    assert tokenize_chat(tok, msgs + [{"role": "user", "content": "?"}]).input_ids == ex.input_ids


def test_prompt_completion_as_chat_and_rows(tok):
    d = SFTData(chat_template=True)
    ex = tokenize_row(tok, {"prompt": "hi", "completion": "hello"}, d)
    assert "".join(tok.decode([t]) for t, m in zip(ex.input_ids, ex.loss_mask) if m) == "hello<|im_end|>\n"
    with pytest.raises(Exception, match="prompt"):
        tokenize_row(tok, {"text": "x"}, SFTData())


def test_trainer_batches_token_by_token():
    """pack_batch, as the trainer calls it, on two hand-written examples."""
    a = Example([B, H, A, EOS], [0, 1, 1, 1])
    b = Example([7, 8, 9], [0, 0, 1])
    batch = pack_batch([a, b], pad_id=EOS, pack_length=100)
    assert batch.input_ids.tolist() == [[B, H, A, EOS, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]  # restart per example
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1, 0, 0, 1]]
    assert batch.last_index.tolist() == [[0, 3], [0, 6]]
    # pack_length 5 forces two rows; the shorter row is right-padded, pads never learned
    batch = pack_batch([a, b], pad_id=EOS, pack_length=5)
    assert batch.input_ids.tolist() == [[B, H, A, EOS], [7, 8, 9, EOS]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert batch.last_index.tolist() == [[0, 3], [1, 2]]
    assert batch.pad_fraction == pytest.approx(1 / 8)
    padded = make_batch([b, a], EOS, "bucket", 0)
    assert padded.input_ids.tolist() == [[7, 8, 9, EOS], [B, H, A, EOS]]
    assert padded.loss_mask.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="loss_mask\\[0\\]"):
        pack_batch([Example([1, 2], [1, 1])], 0, 10)


def test_pack_rows_first_fit_decreasing():
    # lengths 5,4,3,3,1 into rows of 8: 5+3, 4+3+1
    assert pack_rows([3, 5, 1, 4, 3], 8) == [[1, 0], [3, 4, 2]]
    assert pack_rows([10, 2], 8) == [[0], [1]]  # too long: a row of its own
    # first fit alone gives [6, 2] + [2, 2], padded to 8 + 8; balanced rows need no padding
    assert pack_rows([6, 2, 2, 2], 8) == [[0], [1, 2, 3]]
    # 16 examples of 100 in rows of 1024: two rows of 800, not 1000 + 600
    assert sorted(len(r) for r in pack_rows([100] * 16, 1024)) == [8, 8]


def test_bucketed_batches_group_similar_lengths():
    lengths = [i % 50 for i in range(640)]
    batches = bucketed_batches(lengths, 16, seed=0, group_batches=8)
    assert sorted(i for b in batches for i in b) == list(range(640))
    def spread(bs):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs) / len(bs)

    # a sorted group of 128 over 50 lengths cut into 8 batches: each spans about 50 / 8 lengths
    assert spread(batches) < 8
    assert spread(shuffled_batches(640, 16, seed=0)) > 40  # random batches of 16 span nearly 0..49
    assert bucketed_batches(lengths, 16, seed=0, group_batches=8) == batches  # deterministic


def _naive_loss(model, examples) -> torch.Tensor:
    """Each example alone, full logits, an explicit loop over its target tokens."""
    total, n = torch.zeros(()), 0
    for ex in examples:
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (T, V)
        logps = torch.log_softmax(logits.double(), -1)
        for t in range(1, len(ex.input_ids)):
            if ex.loss_mask[t]:
                total = total - logps[t - 1, ex.input_ids[t]]
                n += 1
    return total / n


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"])
def test_packed_and_bucketed_loss_equal_naive_loop(tok, spec):
    model, _ = load_model(spec, seed=3)
    assert packing_is_exact(model)
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, n_prompt in [(9, 3), (4, 1), (12, 7), (6, 2), (3, 1)]:
        ids = torch.randint(10, 5000, (length,), generator=g).tolist()
        examples.append(Example(ids, [0] * n_prompt + [1] * (length - n_prompt)))
    expected = _naive_loss(model, examples)
    for mode, pack_length in [("pack", 1000), ("pack", 13), ("bucket", 0), ("pad", 0)]:
        loss, stats = sft_batch_loss(model, make_batch(examples, EOS, mode, pack_length))
        assert int(stats["tokens"]) == 6 + 3 + 5 + 4 + 2
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5), (mode, pack_length)
    # gradients agree too (packing must not leak attention across examples)
    model.zero_grad()
    sft_batch_loss(model, make_batch(examples, EOS, "pack", 1000))[0].backward()
    g_pack = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    _naive_loss(model, examples).float().backward()
    g_naive = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_pack, g_naive):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_lr_schedule_by_hand():
    def lr_lambda(step, warmup, total, schedule="constant", min_ratio=0.1):
        return lr_multiplier(step, warmup_steps=warmup, total_steps=total, schedule=schedule, min_lr_ratio=min_ratio)

    assert [lr_lambda(s, 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # cosine from 1 at the end of warm-up to min_ratio at total
    assert lr_lambda(4, 4, 104, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(54, 4, 104, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(104, 4, 104, "cosine", 0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# the trainer end to end: a tiny Llama, a few short rows, 2-4 steps each


SHORT_ROWS = [{"prompt": "b", "completion": " h a"}, {"prompt": "c", "completion": " d a"},
              {"prompt": "Opposite of up:", "completion": " down"}, {"prompt": "1, 2,", "completion": " 3"},
              {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}]},
              {"prompt": "e", "completion": " f g a"}, {"prompt": "Say yes:", "completion": " yes"},
              {"prompt": "x", "completion": " y"}]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHORT_ROWS))
    return str(path)


def _cfg(tmp_path, rows_file, name, **over):
    data = {"algorithm": "sft", "model": {"spec": "tiny-llama"},
            "data": {"name": rows_file, "eval_fraction": 0.0},
            "trainer": {"lr": 1e-3, "batch_size": 4, "total_steps": 2, "max_grad_norm": 0.0},
            "run": {"out_dir": str(tmp_path), "name": name, "progress": False, "save_model": False}}
    return build(sft.Config, data, over)


def _weights(run_dir):
    from ankus.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _read_metrics(run_dir):
    from ankus.runs import read_metrics

    return read_metrics(run_dir)


def test_train_changes_parameters_and_grad_accum_matches(tmp_path, rows_file):
    init = {k: v.clone() for k, v in load_model("tiny-llama")[0].state_dict().items()}
    # AdamW's first step is about lr * sign(g): float noise in a near-zero gradient could flip it.
    # eps = 1 makes the step about lr * g, so equal weights below mean equal gradients.
    common = {"trainer.eps": 1.0, "trainer.lr": 0.1}
    s1 = sft.train(_cfg(tmp_path, rows_file, "a", **common, **{"run.save_model": True}))
    s2 = sft.train(_cfg(tmp_path, rows_file, "b", **common, **{"trainer.grad_accum": 3}))
    w1, w2 = _weights(s1["run_dir"]), _weights(s2["run_dir"])
    changed = [k for k in w1 if not torch.equal(w1[k], init[k])]
    assert len(changed) == len(w1)  # every tensor moved
    for k in w1:  # 3 micro-batches weighted by their target tokens == one batch (to 0.1% of the update)
        update = (w1[k] - init[k]).abs().max()
        assert (w1[k] - w2[k]).abs().max() <= 1e-3 * update, k
    # the HF save loads back as a plain model with the trained weights
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(f"{s1['run_dir']}/model").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[key], w1[key])
    rows = [r for r in _read_metrics(s1["run_dir"]) if "loss/sft" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/sft"]) for r in rows)
    assert rows[0]["perf/tokens_per_s"] > 0 and rows[0]["lr"] == pytest.approx(0.1)
    assert rows[0]["perf/pad_fraction"] == 0.0  # 4 short examples pack into one row


def test_resume_equals_uninterrupted(tmp_path, rows_file):
    full = sft.train(_cfg(tmp_path, rows_file, "full", **{"trainer.total_steps": 4}))
    # a run of 2 steps (it checkpoints at its end), then continued to 4: crosses an epoch boundary
    sft.train(_cfg(tmp_path, rows_file, "part", **{"trainer.total_steps": 2}))
    resumed = sft.train(_cfg(tmp_path, rows_file, "part", **{"trainer.total_steps": 4}), resume=True)
    w_full, w_res = _weights(full["run_dir"]), _weights(resumed["run_dir"])
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert [r["step"] for r in _read_metrics(resumed["run_dir"]) if "loss/sft" in r] == [1, 2, 3, 4]

