import os
import random
import signal

import pytest
import torch

from ankus import load_model
from ankus.checkpoint import (GracefulExit, NonFiniteError, NonFiniteGuard, latest_checkpoint, list_checkpoints,
                              load_checkpoint, save_checkpoint)


def _train_steps(model, opt, gen, n):
    for _ in range(n):
        ids = torch.randint(0, 200, (2, 6), generator=gen)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    def fresh():
        model, _ = load_model("tiny-llama", seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, torch.Generator().manual_seed(7)

    model, opt, gen = fresh()
    _train_steps(model, opt, gen, 4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, gen = fresh()
    _train_steps(model, opt, gen, 2)
    random.seed(99)
    save_checkpoint(tmp_path, 2, modules={"model": model}, optimizer=opt, generators={"data": gen},
                    extra={"kl_coef": 0.5})
    py_next = random.random()
    del model, opt

    model, opt, gen = fresh()  # a new process would start here
    extra = load_checkpoint(latest_checkpoint(tmp_path), modules={"model": model}, optimizer=opt,
                            generators={"data": gen})
    assert extra == {"step": 2, "kl_coef": 0.5}
    assert random.random() == py_next
    _train_steps(model, opt, gen, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_keep_last_and_incomplete_dirs_ignored(tmp_path):
    lin = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules={"m": lin}, keep_last=2)
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # a crash mid-write leaves no state.json
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"


def test_mismatched_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path, 1, modules={"m": torch.nn.Linear(2, 2)})
    with pytest.raises(RuntimeError, match="does not match the model"):
        load_checkpoint(latest_checkpoint(tmp_path), modules={"m": torch.nn.Linear(2, 3, bias=False)})


def test_nonfinite_guard():
    guard = NonFiniteGuard(max_bad=3)
    assert guard.check(torch.tensor(1.0), 2.0)
    assert not guard.check(torch.tensor(float("nan")))
    assert not guard.check(1.0, float("inf"))
    assert guard.check(0.5) and guard.consecutive == 0 and guard.skipped == 2
    guard.check(float("nan"))
    guard.check(float("nan"))
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        guard.check(float("nan"))


def test_graceful_exit_turns_sigterm_into_a_flag():
    with GracefulExit() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
