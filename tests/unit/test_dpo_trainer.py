"""The DPO trainer: packed layout, one-forward log-probs, precomputed reference, LoRA reference,
data errors, and short training runs on tiny-llama."""

import copy
import json
import math

import pytest
import torch

from ankus import load_model
from ankus.config import build
from ankus.data.io import DataError
from ankus.trainers import dpo as D


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: a second OpenMP thread buys nothing here and, on a busy 2-core machine, its
    # barrier waits made these tests several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny-llama", seed=3)
    return model, tok


def fresh(tiny):
    """A trainable copy of the module's tiny model (loading anew re-reads the tokenizer: slow)."""
    return {"model": copy.deepcopy(tiny[0]), "tokenizer": tiny[1]}


@pytest.fixture(scope="module")
def pairs(tiny):
    _, tok = tiny
    return D.tokenize_pairs(D.load_pairs("prefs_tiny"), tok)


def write_pairs(path, n=12):
    rows = [{"prompt": f"What is {a} + 2?", "chosen": f"{a} + 2 = {a + 2}.", "rejected": f"No idea, {a * 7}."}
            for a in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def naive_logps(model, prompt, completion):
    """Sum of log p(completion token | everything before it), one unpadded sequence, token by token."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0]  # (T, V)
    total = 0.0
    for j, token in enumerate(completion):
        row = logits[len(prompt) + j - 1]
        total = total + (row[token] - torch.logsumexp(row, -1))
    return total


def cfg_for(tmp_path, data, **over):
    base = {"model": {"spec": "tiny-llama", "seed": 3}, "data": {"path": data},
            "trainer": {"lr": 1e-3, "batch_size": 4, "total_steps": 3, "weight_decay": 0.0},
            "run": {"out_dir": str(tmp_path), "progress": False, "save_model": False}}
    return build(D.Config, base, over)


# ---------------------------------------------------------------------------------------------
# layout


def test_pack_rows_layout_by_hand():
    pairs = [D.Pair([5, 6], [7], [8, 9]), D.Pair([4], [3, 2], [1])]
    packed = D.pack_rows(pairs, pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1]]
    # rejected continues the prompt's positions, not the chosen tokens'
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    assert packed.segment.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert packed.part.tolist() == [[0, 0, 1, 2, 2, 0, 1, 1, 2]]
    # logits kept at: 6 (predicts 7 and 8), 8 (predicts 9), 4' (idx 5: predicts 3 and 1), 6 (predicts 2)
    assert packed.keep.tolist() == [[False, True, False, True, False, True, True, False, False]]
    kept_positions = [1, 3, 5, 6]
    pred_positions = [kept_positions[i] for i in packed.predictor.tolist()]
    assert list(zip(pred_positions, packed.labels.tolist(), packed.seq_index.tolist())) == [
        (1, 7, 0), (1, 8, 2), (3, 9, 2), (5, 3, 1), (6, 2, 1), (5, 1, 3)]
    mask = D.prefix_shared_mask(packed.segment, packed.part, torch.float32)[0, 0] == 0
    expected = [  # query rows, key columns; pair 0 then pair 1
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # chosen: prompt + itself
        [1, 1, 0, 1, 0, 0, 0, 0, 0],  # rejected: prompt, not the chosen token
        [1, 1, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0],  # next pair sees nothing of the first
        [0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 1],
    ]
    assert mask.int().tolist() == expected


def test_padding_rows_attend_to_themselves_only():
    pairs = [D.Pair([5, 6], [7], [8, 9]), D.Pair([4], [3], [1])]
    packed = D.pack_rows(pairs, pad_id=0, max_row_tokens=5)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 1, 0, 0]]
    mask = D.prefix_shared_mask(packed.segment, packed.part, torch.float32)[1, 0] == 0
    assert mask[3].int().tolist() == [0, 0, 0, 1, 0] and mask[4].int().tolist() == [0, 0, 0, 0, 1]
    # first-fit, longest first: lengths 3, 5, 3, 4 into rows of 6 -> [5], [4], [3, 3]
    pairs = [D.Pair([1], [2], [3]), D.Pair([1, 1], [2], [3, 3]), D.Pair([4], [5], [6]), D.Pair([7, 7], [8], [9])]
    packed = D.pack_rows(pairs, pad_id=0, max_row_tokens=6)
    assert packed.segment.tolist() == [[1, 1, 1, 1, 1, -1], [3, 3, 3, 3, -1, -1], [0, 0, 0, 2, 2, 2]]
    assert packed.position_ids[2].tolist() == [0, 1, 1, 0, 1, 1]


# ---------------------------------------------------------------------------------------------
# log-probs: one forward, packed, padded, naive


def test_one_forward_equals_separate_forwards(tiny, pairs):
    model = copy.deepcopy(tiny[0]).double()  # float64 so 1e-5 tests the layout, not rounding
    batch = pairs[:5]
    chosen, rejected = D.padded_logps(model, batch, pad_id=2)
    for i, p in enumerate(batch):
        assert abs(float(chosen[i].detach() - naive_logps(model, p.prompt_ids, p.chosen_ids))) < 1e-5
        assert abs(float(rejected[i].detach() - naive_logps(model, p.prompt_ids, p.rejected_ids))) < 1e-5


@pytest.mark.parametrize("max_row_tokens", [0, 100])
def test_packing_equals_padding_values_and_gradients(tiny, pairs, max_row_tokens):
    model = copy.deepcopy(tiny[0]).double()
    batch = [pairs[0], pairs[13], pairs[30], pairs[47]]  # mixed lengths
    packed = D.packed_logps(model, D.pack_rows(batch, 2, max_row_tokens))
    padded = D.padded_logps(model, batch, 2)
    for a, b in zip(packed, padded):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    # gradients agree too; Llama's RMSNorm computes in float32 even in a float64 model, so an
    # occasional 1-ulp float32 flip (~1e-7 relative) is expected
    grads = []
    for fn in (lambda: D.packed_logps(model, D.pack_rows(batch, 2, max_row_tokens)),
               lambda: D.padded_logps(model, batch, 2)):
        model.zero_grad()
        c, r = fn()
        (c - r).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert grads[0].abs().max() > 1.0


def test_average_logps_divide_by_completion_length(tiny, pairs):
    model = copy.deepcopy(tiny[0]).double()
    batch = pairs[:3]
    total_c, total_r = D.packed_logps(model, D.pack_rows(batch, 2))
    mean_c, mean_r = D.packed_logps(model, D.pack_rows(batch, 2), average=True)
    for i, p in enumerate(batch):
        assert float(mean_c[i]) == pytest.approx(float(total_c[i]) / len(p.chosen_ids), abs=1e-10)
        assert float(mean_r[i]) == pytest.approx(float(total_r[i]) / len(p.rejected_ids), abs=1e-10)


def test_precomputed_reference_equals_live_frozen_copy(tiny, pairs):
    model = copy.deepcopy(tiny[0])
    frozen = copy.deepcopy(model).eval()
    ref_c, ref_r = D.reference_logps(model, pairs[:20], pad_id=2, batch_size=6)
    with torch.no_grad():
        for i in (0, 7, 19):
            p = pairs[i]
            assert float(ref_c[i]) == pytest.approx(float(naive_logps(frozen, p.prompt_ids, p.chosen_ids)), abs=1e-4)
            assert float(ref_r[i]) == pytest.approx(float(naive_logps(frozen, p.prompt_ids, p.rejected_ids)), abs=1e-4)
    # the padded fallback gives the same numbers
    pad_c, pad_r = D.reference_logps(model, pairs[:20], pad_id=2, batch_size=6, packing=False)
    assert torch.allclose(pad_c, ref_c, atol=1e-4) and torch.allclose(pad_r, ref_r, atol=1e-4)


def test_lora_reference_is_the_model_with_adapters_disabled(tiny, pairs):
    from ankus.config import LoRAConfig
    from ankus.models.lora import apply_lora

    base = copy.deepcopy(tiny[0])
    with torch.no_grad():
        expected = D.packed_logps(base, D.pack_rows(pairs[:4], 2))
    peft = apply_lora(copy.deepcopy(base), LoRAConfig(True, r=4, alpha=8))
    with torch.no_grad():  # move the adapters away from their zero init
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        adapted = D.packed_logps(peft, D.pack_rows(pairs[:4], 2))
    ref = D.reference_logps(peft, pairs[:4], pad_id=2, lora=True)
    for got, want, moved in zip(ref, expected, adapted):
        assert torch.allclose(got, want, atol=1e-5)
        assert (got - moved).abs().max() > 1e-3  # so the check above could fail


# ---------------------------------------------------------------------------------------------
# data


def test_tokenize_chat_and_plain(tiny):
    _, tok = tiny
    row = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    (chat,) = D.tokenize_pairs([row], tok)
    assert tok.decode(chat.prompt_ids).endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(chat.chosen_ids) == "Blue.<|im_end|>\n"
    assert tok.decode(chat.rejected_ids) == "Seven.<|im_end|>\n"
    (plain,) = D.tokenize_pairs([row], tok, chat_template=False)
    assert tok.decode(plain.prompt_ids) == "Name a colour."
    assert tok.decode(plain.chosen_ids) == "Blue." + tok.eos_token
    (cut,) = D.tokenize_pairs([row], tok, chat_template=False, max_length=len(plain.prompt_ids) + 1)
    assert cut.chosen_ids == plain.chosen_ids[:1] and cut.rejected_ids == plain.rejected_ids[:1]
    with pytest.raises(DataError, match="no room for a completion"):
        D.tokenize_pairs([row], tok, chat_template=False, max_length=len(plain.prompt_ids))


def test_bad_data_names_file_line_and_field(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: missing field 'rejected'"):
        D.load_pairs(str(bad))
    bad.write_text('{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"line 1: field 'chosen' must be a string"):
        D.train(cfg_for(tmp_path, str(bad)), **fresh(tiny))
    with pytest.raises(DataError, match="file not found"):
        D.load_pairs(str(tmp_path / "missing.jsonl"))


def test_batch_order_is_a_permutation_per_epoch_and_resumable():
    n, bs = 10, 4
    stream = [i for s in range(5) for i in D.batch_order(n, bs, s, seed=1, shuffle=True)]  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled
    assert D.batch_order(n, bs, 3, seed=1, shuffle=True) == stream[12:16]
    assert D.batch_order(n, bs, 2, seed=1, shuffle=False) == [8, 9, 0, 1]


# ---------------------------------------------------------------------------------------------
# training


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_train_first_loss_log2_params_change_and_precompute_matches_live(tmp_path, tiny):
    data = write_pairs(tmp_path / "p.jsonl")
    model, tok = fresh(tiny).values()
    before = _params(model)
    out = D.train(cfg_for(tmp_path / "a", data), model=model, tokenizer=tok)
    assert out["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    after = _params(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # full fine-tuning moves every tensor
    rows = [json.loads(x) for x in open(f"{out['run_dir']}/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["rewards/margins"] == 0.0 and rows[-1]["loss"] < math.log(2)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "perf/tokens_per_s", "grad_norm"):
        assert key in rows[-1]
    # a live frozen-copy reference every step gives the same trajectory
    live = D.train(cfg_for(tmp_path / "b", data, **{"method.precompute_ref": False}), **fresh(tiny))
    live_rows = [json.loads(x) for x in open(f"{live['run_dir']}/metrics.jsonl")]
    for a, b in zip(rows, live_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_grad_accum_and_padding_give_the_same_trajectory(tmp_path, tiny):
    data = write_pairs(tmp_path / "p.jsonl")
    runs = {}
    for name, over in {"base": {}, "accum": {"trainer.grad_accum": 2},
                       "padded": {"method.packing": False}}.items():
        out = D.train(cfg_for(tmp_path / name, data, **{"trainer.total_steps": 2, **over}), **fresh(tiny))
        runs[name] = [json.loads(x) for x in open(f"{out['run_dir']}/metrics.jsonl")]
    for name in ("accum", "padded"):
        for a, b in zip(runs["base"], runs[name]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), name


def test_ipo_first_loss_and_lora_training(tmp_path, tiny):
    data = write_pairs(tmp_path / "p.jsonl")
    model, tok = fresh(tiny).values()
    base = _params(model)
    out = D.train(cfg_for(tmp_path, data, **{"method.loss_type": "ipo", "lora.enabled": True, "lora.r": 4,
                                              "trainer.total_steps": 2}), model=model, tokenizer=tok)
    # h = 0 at step 0, so the IPO loss is (0 - 1/(2*0.1))^2 = 25
    assert out["loss_first"] == pytest.approx(25.0, abs=1e-4)
    # the model was wrapped in place: base weights frozen, adapters trained
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, base[key]), name
    assert out["loss_last"] < 25.0


def test_resumed_run_equals_uninterrupted(tmp_path, tiny):
    data = write_pairs(tmp_path / "p.jsonl")
    over = {"trainer.total_steps": 4, "trainer.checkpoint_every": 2, "run.name": "full"}
    full = D.train(cfg_for(tmp_path, data, **over), **fresh(tiny))
    # the same run cut after step 2 (its end-of-run checkpoint), then resumed to step 4
    D.train(cfg_for(tmp_path, data, **{**over, "trainer.total_steps": 2, "run.name": "cut"}), **fresh(tiny))
    resumed = D.train(cfg_for(tmp_path, data, **{**over, "run.name": "cut"}), resume=True, **fresh(tiny))
    assert resumed["steps"] == 2  # only steps 3 and 4 ran
    rows = {name: [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")] for name in ("full", "cut")}
    assert [r["step"] for r in rows["cut"]] == [1, 2, 3, 4]
    for a, b in zip(rows["full"], rows["cut"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert full["loss_last"] == pytest.approx(resumed["loss_last"], abs=1e-6)
