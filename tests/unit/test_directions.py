"""Linear directions: hooks, interventions and metrics by hand, direction methods on synthetic data,
steering invariants (alpha 0, batching, KV cache, CFG), saved directions, serve's steering field,
and a tiny-model smoke run of ``ankus audit directions`` and ``ankus steer``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ankus.audits.directions import (EmptyActivationsError, find_direction, logistic_direction, mean_diff,
                                     probe_accuracy)
from ankus.audits.interventions import accuracy, fraction_removed, logit_diff, mean_ablate, patch_along
from ankus.generation.engine import GenerationConfig, generate
from ankus.generation.hooks import HookPointError, add_direction, edit_residual, residual_stream
from ankus.generation.steering import (Direction, DirectionMismatchError, load_direction, save_direction, steer)
from ankus.models.layers import decoder_layers
from ankus.models.loading import load_model

PROMPTS = [[504, 2365, 8130, 28, 29, 441], [253, 1109], [1, 9690, 198, 2683, 359, 253, 5356], [4093]]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _direction(model, layer=1, seed=0) -> Direction:
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return Direction(v, layer, "", "test")


# ---------------------------------------------------------------------------------------------
# pure math, by hand


def test_mean_ablation_hand_computed():
    h = torch.tensor([[3.0, 4.0, 0.0], [-1.0, 2.0, 5.0]])
    d = torch.tensor([1.0, 0.0, 0.0])
    assert mean_ablate(h, d, 1.0).tolist() == [[1.0, 4.0, 0.0], [1.0, 2.0, 5.0]]
    d = torch.tensor([0.6, 0.8, 0.0])  # h[0].d = 5 -> 2: h[0] - 3 d = [1.2, 1.6, 0]
    assert torch.allclose(mean_ablate(h[:1], d, 2.0), torch.tensor([[1.2, 1.6, 0.0]]))
    out = mean_ablate(h, d, 0.7)
    assert torch.allclose(out @ d, torch.tensor([0.7, 0.7]))  # the coordinate is the mean
    orth = torch.tensor([0.8, -0.6, 0.0])
    assert torch.allclose(out @ orth, h @ orth, atol=1e-6)  # the rest unchanged


def test_patch_along_hand_computed():
    base, src = torch.tensor([3.0, 4.0]), torch.tensor([7.0, 1.0])
    assert patch_along(base, src, torch.tensor([1.0, 0.0])).tolist() == [7.0, 4.0]
    assert torch.allclose(patch_along(base, src, torch.tensor([0.6, 0.8])), base)  # (src - base).d = 0


def test_logit_diff_accuracy_and_fraction_removed():
    logits = torch.tensor([[1.0, 3.0, 0.5], [2.0, -1.0, 4.0]])
    ld = logit_diff(logits, 1, 2)
    assert ld.tolist() == [2.5, -5.0]
    assert accuracy(ld, torch.tensor([1, 0])) == 1.0 and accuracy(ld, torch.tensor([1, 1])) == 0.5
    assert fraction_removed(0.9, 0.6) == pytest.approx(0.75)
    assert fraction_removed(0.9, 0.5) == pytest.approx(1.0)
    assert math.isnan(fraction_removed(0.5, 0.4))


def _separable(n=200, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = 0.3 * torch.randn(n, D, generator=g)
    X[:, 3] += 2.0 * (2 * y - 1)
    return X, y


@pytest.mark.parametrize("method", ["mean_diff", "kmeans", "pca", "logistic"])
def test_directions_on_separable_synthetic_data(method):
    X, y = _separable()
    d = find_direction(method, X, y)
    assert d.shape == (8,) and float(d.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(d[3]) > 0.95  # the separating axis, oriented positive-up
    Xt, yt = _separable(seed=1)
    assert probe_accuracy(d, X, y, Xt, yt) == 1.0


def test_mean_diff_and_logistic_hand_checked():
    X = torch.tensor([[2.0, 0.0], [4.0, 2.0], [0.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([1, 1, 0, 0])  # means (3, 1) and (0, 1): difference (3, 0)
    assert torch.allclose(mean_diff(X, y), torch.tensor([1.0, 0.0]))
    assert float(logistic_direction(X, y)[0]) > 0.9


def test_empty_or_one_class_activations_raise():
    with pytest.raises(EmptyActivationsError, match="no activations"):
        mean_diff(torch.zeros(0, 8), torch.zeros(0))
    with pytest.raises(EmptyActivationsError, match="one class"):
        find_direction("pca", torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="unknown method"):
        find_direction("lda", torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))


# ---------------------------------------------------------------------------------------------
# hooks


def _no_hooks(model) -> bool:
    """None of ours left (transformers may keep its own output-recording hooks)."""
    return all(getattr(h, "__module__", "") != "ankus.generation.hooks"
               for layer in decoder_layers(model) for h in layer._forward_hooks.values())


def test_residual_stream_is_the_decoder_layer_output(tiny):
    model, _ = tiny
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), residual_stream(model, [0, 2], positions=[-1, 1]) as acts:
        hs = model(ids, output_hidden_states=True).hidden_states
    assert set(acts) == {0, 2} and acts[2][0].shape == (1, 2, model.config.hidden_size)
    assert torch.allclose(acts[2][0], hs[3][:, [-1, 1]], atol=1e-6)
    with torch.no_grad(), residual_stream(model, [-1]) as acts:  # negative index: the last layer
        model(ids)
    assert list(acts) == [3] and acts[3][0].shape == (1, 6, 64)
    assert _no_hooks(model)


def test_hooks_removed_after_an_exception_and_bad_points_named(tiny):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with residual_stream(model, [1]), edit_residual(model, [0, 3], lambda h: h):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(HookPointError, match="4 decoder layers"):
        with residual_stream(model, [4]):
            pass
    with pytest.raises(HookPointError, match="position"):
        with residual_stream(model, [1], positions=[10]):
            model(torch.tensor([PROMPTS[1]]))
    assert _no_hooks(model)
    with pytest.raises(HookPointError, match="shape"):
        add_direction(model, 1, torch.ones(3), 1.0)


# ---------------------------------------------------------------------------------------------
# steering


def test_alpha_zero_equals_unsteered_and_steering_changes_output(tiny):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False)
    plain = generate(model, tok, PROMPTS, cfg)
    d = _direction(model)
    assert steer(model, tok, PROMPTS, d, 0.0, cfg).response_ids.tolist() == plain.response_ids.tolist()
    d0 = Direction(torch.zeros(64), 1)  # a zero vector with alpha != 0 goes through the hook: same tokens
    assert steer(model, tok, PROMPTS, d0, 5.0, cfg).response_ids.tolist() == plain.response_ids.tolist()
    assert steer(model, tok, PROMPTS, d, 30.0, cfg).response_ids.tolist() != plain.response_ids.tolist()
    assert _no_hooks(model)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_steered_batched_equals_one_by_one(tiny, guidance):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=6, do_sample=False, guidance_scale=guidance)
    d = _direction(model, layer=2)
    whole = steer(model, tok, PROMPTS, d, 8.0, cfg)
    for i, p in enumerate(PROMPTS):
        one = steer(model, tok, [p], d, 8.0, cfg)
        n = int(one.response_mask.sum())
        assert one.response_ids[0, :n].tolist() == whole.response_ids[i, :n].tolist()


def test_steered_kv_cache_equals_full_recomputation(tiny):
    """Greedy steered decoding with the cache == re-running the whole steered sequence each step."""
    model, tok = tiny
    d = _direction(model, layer=1, seed=3)
    cfg = GenerationConfig(max_new_tokens=5, do_sample=False)
    out = steer(model, tok, [PROMPTS[0]], d, 6.0, cfg)
    seq = list(PROMPTS[0])
    with torch.no_grad(), add_direction(model, 1, d.unit(), 6.0):
        for _ in range(5):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.response_ids[0].tolist() == seq[len(PROMPTS[0]):]


def test_direction_file_roundtrip_and_mismatch(tiny, tmp_path):
    model, _ = tiny
    d = Direction(torch.randn(64), 2, "", "mean_diff")
    path = save_direction(d, tmp_path / "d.safetensors")
    back = load_direction(path, model)
    assert torch.equal(back.vector, d.vector) and back.layer == 2 and back.method == "mean_diff"
    save_direction(Direction(torch.randn(32), 1, "other-model"), tmp_path / "small.safetensors")
    with pytest.raises(DirectionMismatchError, match="32 dimensions"):
        load_direction(tmp_path / "small.safetensors", model)
    save_direction(Direction(torch.randn(64), 1, "smollm2-135m-instruct"), tmp_path / "named.safetensors")
    with pytest.raises(DirectionMismatchError, match="not 'tiny'"):
        load_direction(tmp_path / "named.safetensors", model, expected_name="tiny")
    save_direction(Direction(torch.randn(64), 9), tmp_path / "deep.safetensors")
    with pytest.raises(DirectionMismatchError, match="4 layers"):
        load_direction(tmp_path / "deep.safetensors", model)
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(DirectionMismatchError, match="not a direction file"):
        load_direction(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# serve: the steering field


def test_serve_steering_field(tiny):
    from ankus.serve import APIError, ModelAPI

    model, tok = tiny
    d = _direction(model, layer=2)
    api = ModelAPI(model, tok, "tiny", seed=0, directions={"pos": d})
    body = {"prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 5, "temperature": 0}
    steered = api.completions({**body, "steering": {"direction": "pos", "alpha": 8.0}})
    ref = steer(model, tok, [PROMPTS[0], PROMPTS[1]], d, 8.0,
                GenerationConfig(max_new_tokens=5, do_sample=False, chat_template=False))
    assert [c["text"] for c in steered["choices"]] == ref.texts
    plain = api.completions(body)
    zero = api.completions({**body, "steering": {"direction": "pos", "alpha": 0}})
    assert [c["text"] for c in zero["choices"]] == [c["text"] for c in plain["choices"]]
    chat = api.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                                 "steering": {"direction": "pos", "alpha": 8.0}})
    assert chat["choices"][0]["message"]["role"] == "assistant"
    with pytest.raises(APIError, match="unknown steering direction 'neg'"):
        api.completions({**body, "steering": {"direction": "neg", "alpha": 1}})
    for bad in ({"direction": "pos"}, {"direction": "pos", "alpha": "big"}, "pos", {"direction": "pos", "alpha": 1,
                                                                                    "layer": 3}):
        with pytest.raises(APIError, match="'steering' must be"):
            api.completions({**body, "steering": bad})
    assert _no_hooks(model)
    with pytest.raises(DirectionMismatchError):
        ModelAPI(model, tok, "tiny", directions={"x": Direction(torch.ones(5), 0)})


# ---------------------------------------------------------------------------------------------
# the commands on a tiny model


def test_audit_directions_and_steer_commands(tiny, tmp_path, capsys):
    from ankus.cli import main

    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "A wonderful, moving film. I loved it.", "Terrible acting, boring and awful.", "Great fun, brilliant cast.",
        "A dull, painful mess, I hated it.", "It was a film."]))
    rc = main(["audit", "directions", "model=tiny-llama", "layers=[1,2]", "ablate_from=[1]", "steer_layer=1",
               "ablate_layers=[0,1]", "comma_methods=[das]", "eval_sentences=8",
               f"reviews_file={reviews}", "words_per_class=4", "das_steps=2", "das_batch=4", "patch_pairs=4",
               "alphas=[-4,0,4]", "samples_per_prompt=1", "steer_tokens=3", "steer_prompts=[Hello there]",
               f"run.out_dir={tmp_path}", "run.name=a"])
    assert rc == 0
    run = tmp_path / "a"
    for name in ("probe.csv", "ablation.csv", "steering.csv", "results.jsonl", "directions.png", "reviews.jsonl",
                 "directions/das_L2.safetensors", "directions/mean_diff_L1.safetensors"):
        assert (run / name).is_file(), name
    assert len((run / "reviews.jsonl").read_text().splitlines()) == 4  # the neutral one is dropped
    probe = (run / "probe.csv").read_text().splitlines()
    assert len(probe) == 1 + 2 * 5 + 2  # + the no-patch base rate per layer
    tables = {json.loads(line)["table"] for line in (run / "results.jsonl").read_text().splitlines()}
    assert {"data", "probe", "ablation", "steering", "time"} <= tables
    capsys.readouterr()
    direction = run / "directions" / "mean_diff_L1.safetensors"
    assert main(["steer", "Hello", "--model", "tiny-llama", "--direction", str(direction), "--alpha", "3",
                 "--max-new-tokens", "3", "--greedy"]) == 0
    save_direction(Direction(torch.ones(32), 1, "other"), tmp_path / "other.safetensors")
    assert main(["steer", "Hello", "--model", "tiny-llama", "--direction", str(tmp_path / "other.safetensors"),
                 "--alpha", "3"]) == 2
    assert "32 dimensions" in capsys.readouterr().err
    assert main(["audit", "directions", "model=tiny-llama", "layers=[7]", "ablate_from=[7]", "steer_layer=7",
                 f"run.out_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_recipe_builds_and_bad_settings_are_named():
    from ankus.audits.linear_directions import DirectionsConfig, check_config
    from ankus.config import ConfigError, build, read_yaml
    from ankus.recipes import resolve_recipe

    cfg = build(DirectionsConfig, read_yaml(resolve_recipe("audit_directions")))
    check_config(cfg)
    assert cfg.model == "smollm2-135m-instruct" and len(cfg.alphas) >= 5
    for bad, match in ((["methods=[lda]"], "unknown direction method"), (["alphas=[]"], "alphas is empty"),
                       (["steer_method=das", "methods=[pca]"], "steer_method"), (["ablate_from=[3]"], "ablate_from")):
        with pytest.raises(ConfigError, match=match):
            check_config(build(DirectionsConfig, read_yaml(resolve_recipe("audit_directions")), bad))
