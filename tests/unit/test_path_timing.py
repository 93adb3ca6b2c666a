"""The start-up measurement that picks the CPU linear path: the rule on hand-made times, the
measurement itself, its cache and cross-process reduction, and what generate and PPO's rollouts
do with the choice."""

from __future__ import annotations

import pytest
import torch

from ankus import load_model
from ankus.generation import onednn, path_timing
from ankus.generation.engine import GenerationConfig, generate
from ankus.generation.onednn import PACKED, PACKED_BF16, PLAIN
from ankus.rl import rollouts

needs_onednn = pytest.mark.skipif(not onednn.probe()[0], reason="torch here cannot run oneDNN's packed linears")


@pytest.fixture
def fresh(monkeypatch):
    path_timing.reset_choices()
    monkeypatch.setattr(path_timing, "MIN_BYTES", 0)  # time even the tiny test models
    yield
    path_timing.reset_choices()


def test_choose_keeps_packed_unless_another_path_wins_by_its_margin():
    # plain must be 5% faster to replace packed; bf16 15% faster than the best fp32 path
    assert path_timing.choose({PACKED: 1.00, PLAIN: 0.96}) == PACKED  # 1.04x: not enough
    assert path_timing.choose({PACKED: 1.00, PLAIN: 0.90}) == PLAIN  # 1.11x
    assert path_timing.choose({PACKED: 1.00, PLAIN: 2.0, PACKED_BF16: 0.90}) == PACKED  # 1.11x
    assert path_timing.choose({PACKED: 1.00, PLAIN: 2.0, PACKED_BF16: 0.80}) == PACKED_BF16  # 1.25x
    assert path_timing.choose({PACKED: 1.00, PLAIN: 0.50, PACKED_BF16: 0.80}) == PLAIN  # bf16 vs plain: 0.625x
    assert path_timing.choose({PLAIN: 1.0}) == PLAIN


@needs_onednn
def test_time_paths_times_one_pass_over_every_linear_weight_per_candidate():
    model, _ = load_model("tiny-llama")
    weights = path_timing.linear_weights(model)
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert len(weights) == len(linears)  # a tied head counted once
    times = path_timing.time_paths(model, 4, (PACKED, PLAIN, PACKED_BF16), repeats=2)
    assert list(times) == [PACKED, PLAIN, PACKED_BF16] and all(t > 0 for t in times.values())


def test_models_under_min_bytes_are_not_timed(monkeypatch):
    path_timing.reset_choices()
    model, _ = load_model("tiny-llama")
    monkeypatch.setattr(path_timing, "time_paths", lambda *a, **k: pytest.fail("timed a tiny model"))
    assert path_timing.fastest_path(model, 16, (PACKED, PLAIN)) == (PACKED, {})


def test_fastest_path_measures_once_and_reduces_the_times_before_choosing(fresh, monkeypatch):
    model, _ = load_model("tiny-llama")
    calls = []

    def fake_times(m, rows, candidates, repeats=3):
        calls.append(rows)
        return {PACKED: 1.0, PLAIN: 0.5}

    monkeypatch.setattr(path_timing, "time_paths", fake_times)
    # another process measured packed at 0.4 s and plain at 3 s: the max over processes decides
    other = torch.tensor([0.4, 3.0], dtype=torch.float64)
    path, times = path_timing.fastest_path(model, 8, (PACKED, PLAIN), reduce=lambda t: torch.maximum(t, other))
    assert (path, times) == (PACKED, {PACKED: 1.0, PLAIN: 3.0})
    assert path_timing.fastest_path(model, 8, (PACKED, PLAIN)) == (PACKED, {PACKED: 1.0, PLAIN: 3.0})
    assert calls == [8]  # cached for this shape, batch and thread count
    assert path_timing.fastest_path(model, 4, (PACKED, PLAIN))[0] == PLAIN  # a new batch size: measured again
    assert calls == [8, 4]


@needs_onednn
def test_generate_runs_the_measured_path_and_says_why(fresh, monkeypatch):
    """When plain F.linear is measured faster, generate takes it: its output is exactly that of
    packed_linears=False, and cpu_path_info's reason carries the measured times."""
    model, tok = load_model("tiny-llama")
    monkeypatch.setattr(path_timing, "time_paths", lambda *a, **k: {PACKED: 2.0, PLAIN: 1.0})
    info = path_timing.cpu_path_info(model, GenerationConfig(), rows=4)
    assert info["path"] == PLAIN and "onednn-packed 2000.0 ms, plain-linear 1000.0 ms" in info["reason"]
    prompts = [[504, 2365, 8130], [253, 1109, 7]]
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True)
    chosen = generate(model, tok, prompts, cfg, generator=torch.Generator().manual_seed(3))
    plain = generate(model, tok, prompts, GenerationConfig(max_new_tokens=6, do_sample=True, packed_linears=False),
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(chosen.response_ids, plain.response_ids) and torch.equal(chosen.logprobs, plain.logprobs)


@needs_onednn
def test_rollout_auto_takes_bf16_only_where_it_is_measured_faster(fresh, monkeypatch):
    model, _ = load_model("tiny-llama")
    cfg = GenerationConfig(max_new_tokens=4)
    monkeypatch.setattr(path_timing, "time_paths", lambda *a, **k: {PACKED: 1.0, PLAIN: 2.0, PACKED_BF16: 0.5})
    assert rollouts.rollout_config(model, cfg, "auto", rows=8).bf16 is True
    path_timing.reset_choices()
    monkeypatch.setattr(path_timing, "time_paths", lambda *a, **k: {PACKED: 1.0, PLAIN: 2.0, PACKED_BF16: 0.95})
    assert rollouts.rollout_config(model, cfg, "auto", rows=8) is cfg  # 1.05x: not worth changing the numbers
    assert rollouts.rollout_config(model, GenerationConfig(packed_linears=False), "auto").bf16 is False


def test_rollout_auto_stays_fp32_without_a_warning_where_bf16_cannot_run(monkeypatch, caplog):
    model, _ = load_model("tiny-llama")
    monkeypatch.setattr(onednn, "probe", lambda: (False, "no oneDNN here"))
    cfg = GenerationConfig(max_new_tokens=4)
    with caplog.at_level("WARNING", logger="ankus.rl"):
        assert rollouts.rollout_config(model, cfg, "auto") is cfg
    assert caplog.text == ""
