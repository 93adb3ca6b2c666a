"""Data parallelism: N processes with batch b each train exactly like one process with batch N·b.

Two-process runs are real gloo process groups started with torchrun (``--standalone`` picks a free
port, so concurrent test runs do not collide); every process gets one thread, as does the
single-process run they are compared with, so matrix products sum in the same order.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ankus import distributed
from ankus.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the single-process run must not think it is part of a group
    return env


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def _run_all(commands: dict[str, list[str]], env: dict, timeout: float = 240) -> None:
    """Start every command at once (they are independent) and wait; fail with the output tail."""
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    deadline = time.time() + timeout
    failures = []
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failures.append(f"{name}: timed out\n{out[-3000:]}")
            continue
        if proc.returncode != 0:
            failures.append(f"{name}: exit {proc.returncode}\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def _assert_same_params(a: Path, b: Path, label: str) -> float:
    """The largest |difference| between two safetensors files, printed and checked against TOL."""
    diff = _max_diff(a, b)
    print(f"{label}: max |param diff| {diff:.3g}")
    assert diff <= TOL, (label, diff)
    return diff


# ---------------------------------------------------------------------------------------------
# the helpers, one process


def test_shard_bounds_by_hand():
    # 7 items over 3 ranks: the first 7 % 3 = 1 rank gets the extra one
    assert [distributed.shard_bounds(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [list(distributed.shard(list("abcdefgh"), r, 2)) for r in range(2)] == [list("abcd"), list("efgh")]
    assert [distributed.shard_bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]  # an empty block


def test_single_process_helpers_are_identities():
    st = distributed.setup()
    assert (st.rank, st.world_size, st.is_main, st.enabled) == (0, 1, True, False)
    t = torch.tensor([1.5, -2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.all_gather_cat(t) is t
    assert distributed.weighted_stats({"a": 2.0, "b_max": 3.0}, 0.5, max_keys=("b_max",)) == {"a": 1.0, "b_max": 3.0}
    assert distributed.any_rank(False) is False and distributed.any_rank(True) is True
    assert distributed.on_main(lambda x: x + 1, 1) == 2
    assert distributed.rank_rng_states() == {}
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([3.0, 4.0])
    distributed.sync_gradients([p])
    assert p.grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_launch_configs_are_refused_not_run_replicated(monkeypatch, var):
    monkeypatch.setenv(var, "true")
    with pytest.raises(RuntimeError, match="does not shard it"):
        distributed.setup()
    if var == "ACCELERATE_USE_DEEPSPEED":  # refused even by the trainers that shard with FSDP
        with pytest.raises(RuntimeError, match="DeepSpeed"):
            distributed.setup(fsdp_ok=True)
    else:  # SFT and DPO take it; one process has nothing to shard over
        assert distributed.setup(fsdp_ok=True).world_size == 1 and not distributed.use_fsdp(True)


def test_device_choice():
    distributed.setup()
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            distributed.resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# the collectives, two processes

WORKER = textwrap.dedent('''
    import math, statistics, sys
    from pathlib import Path
    import torch
    from ankus import distributed
    from ankus.checkpoint import load_checkpoint, save_checkpoint
    from ankus.rl.stats import RunningMoments, masked_whiten

    out = Path(sys.argv[1])
    st = distributed.setup()
    r = st.rank
    assert st.world_size == 2 and st.enabled, st

    # sums and gathers
    assert distributed.all_reduce_sum(torch.tensor([r + 1.0])).item() == 3.0
    assert distributed.all_gather_cat(torch.arange(r + 1) + r).tolist() == [0, 1, 2]  # rank 0: [0], rank 1: [1, 2]
    assert distributed.sum_floats(r, 10.0) == [1.0, 20.0]
    assert distributed.any_rank(r == 1) and not distributed.any_rank(False)
    # rank 0: mean a = 1 with 1/4 of the elements, rank 1: a = 5 with 3/4 -> 4; maxima: 3
    got = distributed.weighted_stats({"a": [1.0, 5.0][r], "m_max": [3.0, 2.0][r]}, [0.25, 0.75][r], ("m_max",))
    assert got == {"a": 4.0, "m_max": 3.0}, got
    assert distributed.all_gather_objects({"r": r}) == [{"r": 0}, {"r": 1}]
    assert distributed.broadcast_object(f"from {r}") == "from 0"

    # whitening over both ranks' masked values {1, 2, 3} and {4, 5}: mean 3, population variance 2
    x = [torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[4.0, 5.0]])][r]
    m = [torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 1]])][r]
    w = masked_whiten(x, m, reduce=distributed.all_reduce_sum)
    expect = [[[-2.0, -1.0], [0.0, None]], [[1.0, 2.0]]][r]
    for row, erow in zip(w.tolist(), expect):
        for v, e in zip(row, erow):
            assert (v == 0.0) if e is None else abs(v - e / math.sqrt(2.0)) < 1e-6, (w, expect)

    # running moments over the stream 1..5 then 10 (rank 1 sees nothing in the second batch)
    rm = RunningMoments(reduce=distributed.all_reduce_sum)
    rm.update(torch.tensor([[1.0, 2.0], [3.0, 4.0, 5.0]][r]))
    rm.update(torch.tensor([[10.0], []][r]))
    seen = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    assert rm.count == 6 and abs(rm.mean - sum(seen) / 6) < 1e-12 and abs(rm.std - statistics.stdev(seen)) < 1e-12

    # gradients: p gets [r+1, 2(r+1), 0] on rank r -> [3, 6, 0]; q only on rank 1 -> 5; z nowhere -> None
    p, q, z = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 1, 2))
    (p * torch.tensor([r + 1.0, 2.0 * (r + 1), 0.0])).sum().backward()
    if r == 1:
        (q * 5.0).sum().backward()
    distributed.sync_gradients([p, q, z])
    assert p.grad.tolist() == [3.0, 6.0, 0.0] and q.grad.tolist() == [5.0] and z.grad is None
    distributed.sync_gradients([p], average=True)
    assert p.grad.tolist() == [3.0, 6.0, 0.0]  # equal on both ranks already: the average is the same

    # parameters start as rank 0's
    lin = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(lin.weight, float(r + 7))
    distributed.broadcast_parameters(lin)
    assert (lin.weight == 7.0).all()

    # on_main: the result, or the exception, reaches every rank
    assert distributed.on_main(lambda: f"made on {distributed.rank()}") == "made on 0"
    try:
        distributed.on_main(lambda: (_ for _ in ()).throw(ValueError("boom on main")))
        raise AssertionError("no exception")
    except ValueError as e:
        assert "boom on main" in str(e)

    # every rank's RNG survives a checkpoint that only rank 0 writes
    torch.manual_seed(100 + r)
    torch.rand(5)
    gens = distributed.rank_rng_states()
    assert sorted(gens) == ["torch_rank0", "torch_rank1"]
    expected_next = torch.rand(4)  # what this rank's stream gives next
    lin2 = torch.nn.Linear(2, 1)
    path = distributed.on_main(save_checkpoint, out / "run", 3, modules={"m": lin2}, generators=gens)
    torch.manual_seed(0)
    load_checkpoint(path, modules={"m": lin2})
    distributed.restore_rank_rng(path)
    assert torch.equal(torch.rand(4), expected_next)

    (out / f"ok{r}").write_text("ok")
''')


def test_collectives_on_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run_all({"workers": _torchrun(2, str(script), str(tmp_path))}, _env(tmp_path), timeout=180)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()  # really two processes


# ---------------------------------------------------------------------------------------------
# trainers: 2 processes x batch b == 1 process x batch 2b


def _train(tmp_path: Path, n: int, recipe: str, *overrides: str) -> list[str]:
    args = ["-m", "ankus.cli", "train", recipe, f"run.out_dir={tmp_path}", "run.progress=false", *overrides]
    return _torchrun(n, *args) if n > 1 else [sys.executable, *args]


def test_grpo_reused_update_forward_two_processes_equal_one(tmp_path):
    # GRPO, one epoch of one minibatch: the behaviour log-probs come from the update's forward on
    # each process's block of rows; the KL fed to the controller is still the global batch's.
    (tmp_path / "rank_reward.py").write_text(REWARD)
    common = ["model.spec=tiny-llama", "trainer.total_steps=2", "trainer.lr=1e-3", "trainer.checkpoint_every=2",
              "method.estimator=grpo", "method.samples_per_prompt=2", "method.reference=copy",
              "method.chunk_size=4", "method.ppo_epochs=1", "method.num_layers_unfrozen=2", "method.target=1.0",
              "method.init_kl_coef=0.05", "generation.max_new_tokens=6", "data.num_eval=2",
              "reward.name=rank_reward:vowels", "run.save_model=false"]

    def run(name: str, n: int, *extra: str) -> list[str]:
        return _train(tmp_path, n, "ppo_sentiment", *common, *extra, f"run.name={name}",
                      f"reward.kwargs={{log: {tmp_path / (name + '.log')}}}")

    _run_all({"one": run("one", 1, "method.num_rollouts=8", "trainer.batch_size=8"),
              "two": run("two", 2, "method.num_rollouts=4", "trainer.batch_size=4")}, _env(tmp_path), timeout=300)
    ck = "checkpoints/step-00000002"
    _assert_same_params(tmp_path / "one" / ck / "policy.safetensors", tmp_path / "two" / ck / "policy.safetensors",
                        "GRPO (reused update forward) 2 processes vs 1")
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
        assert a["policy/ratio_mean"] == b["policy/ratio_mean"] == 1.0  # the shortcut ran on both sides
        for key in ("reward/mean", "kl/mean", "kl/beta", "loss/pg", "loss/kl", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_dpo_two_processes_equal_one_with_the_global_batch(tmp_path):
    common = ["trainer.total_steps=4", "trainer.lr=1e-3", "method.ref_batch_size=8"]
    _run_all({
        "one": _train(tmp_path, 1, "dpo_tiny", *common, "trainer.batch_size=8", "run.name=one"),
        "two": _train(tmp_path, 2, "dpo_tiny", *common, "trainer.batch_size=4", "run.name=two"),
    }, _env(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    diff = _assert_same_params(one / "model" / "model.safetensors", two / "model" / "model.safetensors",
                               "DPO 2 processes vs 1")
    # the parameters did move, by far more than that
    trained = load_file(str(one / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert diff < 1e-2 * _moved_from_init("tiny-llama", trained)
    # the reference log-probs were split over the processes and computed exactly as one process does
    ra, rb = torch.load(one / "ref_logps.pt"), torch.load(two / "ref_logps.pt")
    assert torch.equal(ra["chosen"], rb["chosen"]) and torch.equal(ra["rejected"], rb["rejected"])
    # metrics are the global batch's, written once
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for a, b in zip(ma, mb):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    # the checkpoint holds both ranks' RNG streams
    rng = torch.load(two / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert sorted(rng["generators"]) == ["torch_rank0", "torch_rank1"]


def _moved_from_init(spec: str, trained: dict) -> float:
    from ankus import load_model

    model, _ = load_model(spec, seed=0)
    init = model.state_dict()
    return max(float((trained[k] - init[k]).abs().max()) for k in trained if k in init)


REWARD = textwrap.dedent('''
    import os

    def vowels(samples, prompts, outputs, log=""):
        """Share of vowels in each response; logs which rank scored how many samples."""
        with open(log, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {len(outputs)}\\n")
        return [sum(c in "aeiou" for c in o) / max(len(o), 1) for o in outputs]
''')


def test_ppo_two_processes_equal_one_with_the_global_batch(tmp_path):
    (tmp_path / "rank_reward.py").write_text(REWARD)
    common = ["model.spec=tiny-llama", "trainer.total_steps=2", "trainer.lr=1e-3", "trainer.checkpoint_every=2",
              "method.chunk_size=4", "method.ppo_epochs=2", "method.num_layers_unfrozen=2",
              "method.scale_reward=running", "method.target=1.0", "generation.max_new_tokens=6",
              "data.num_eval=2", "data.eval_samples=1", "reward.name=rank_reward:vowels", "run.save_model=false"]

    def run(name: str, n: int, *extra: str) -> list[str]:
        return _train(tmp_path, n, "ppo_sentiment", *common, *extra, f"run.name={name}",
                      f"reward.kwargs={{log: {tmp_path / (name + '.log')}}}")

    _run_all({
        "one": run("one", 1, "method.num_rollouts=8", "trainer.batch_size=4"),
        "two": run("two", 2, "method.num_rollouts=4", "trainer.batch_size=2"),
        "two_main": run("two_main", 2, "method.num_rollouts=4", "trainer.batch_size=2", "reward.on_main=true"),
    }, _env(tmp_path), timeout=300)

    ck = "checkpoints/step-00000002"
    for name in ("two", "two_main"):
        for module in ("policy", "value_head"):
            _assert_same_params(tmp_path / "one" / ck / f"{module}.safetensors",
                                tmp_path / name / ck / f"{module}.safetensors",
                                f"PPO ({name}) {module} 2 processes vs 1")

    # statistics are the global batch's: reward mean/std, the KL fed to the controller, beta, losses
    ma = read_metrics(tmp_path / "one")
    for name in ("two", "two_main"):
        mb = read_metrics(tmp_path / name)
        assert [r["step"] for r in mb] == [1, 2]
        for a, b in zip(ma, mb):
            for key in ("reward/mean", "reward/std", "kl/mean", "kl/beta", "loss/pg", "loss/vf", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (name, key, a[key], b[key])
            assert a["response/length"] == b["response/length"]
    # the running reward moments and the KL controller agree too
    sa = json.loads((tmp_path / "one" / ck / "state.json").read_text())["extra"]
    sb = json.loads((tmp_path / "two" / ck / "state.json").read_text())["extra"]
    assert sa["running"]["count"] == sb["running"]["count"] == 16  # 8 rollouts x 2 iterations, over both ranks
    assert abs(sa["running"]["mean"] - sb["running"]["mean"]) < 1e-9
    assert abs(sa["kl_ctl"]["value"] - sb["kl_ctl"]["value"]) < 1e-9

    # who scored what: (rank, number of samples) per reward call, after the main-only eval calls (2 prompts)
    def calls(name: str) -> list[tuple[str, int]]:
        rows = [tuple(line.split()) for line in (tmp_path / f"{name}.log").read_text().splitlines()]
        return sorted((r, int(n)) for r, n in rows)

    assert calls("one") == [("0", 2), ("0", 2), ("0", 8), ("0", 8)]
    assert calls("two") == [("0", 2), ("0", 2), ("0", 4), ("0", 4), ("1", 4), ("1", 4)]  # each its own samples
    assert calls("two_main") == [("0", 2), ("0", 2), ("0", 8), ("0", 8)]  # rank 0 scored both ranks' samples


def test_sft_two_processes_equal_one_with_the_global_batch(tmp_path):
    # 12 training examples, a global batch of 8: the second step of each epoch has 4 (2 per rank)
    common = ["lora={enabled: false}", "trainer.total_steps=4", "trainer.lr=1e-3", "method.eval_every=2"]
    _run_all({
        "one": _train(tmp_path, 1, "sft_tiny", *common, "trainer.batch_size=8", "run.name=one"),
        "two": _train(tmp_path, 2, "sft_tiny", *common, "trainer.batch_size=4", "run.name=two"),
    }, _env(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    diff = _assert_same_params(one / "model" / "model.safetensors", two / "model" / "model.safetensors",
                               "SFT 2 processes vs 1")
    trained = load_file(str(one / "model" / "model.safetensors"))
    assert diff < 1e-2 * _moved_from_init("tiny-llama", trained)
    # the token-mean loss, the global target count and the held-out loss are the whole batch's
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    for a, b in zip(ma, mb):
        for key in ("loss/sft", "grad_norm", "loss/sft_eval"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
        if "perf/targets" in a:
            assert a["perf/targets"] == b["perf/targets"]
    rng = torch.load(two / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert sorted(rng["generators"]) == ["torch_rank0", "torch_rank1"]


def test_reward_model_two_processes_equal_one_with_the_global_batch(tmp_path):
    # 40 training pairs, a global batch of 16: every third step is the epoch's short batch of 8.
    # Packed rows: with length bucketing each process pads its block to its own longest pair, and
    # that float rounding, amplified by Adam on near-zero gradients, measured 4.2e-5 (packed: 1.4e-6)
    common = ["data.batching=pack", "trainer.total_steps=4", "trainer.lr=1e-3", "trainer.warmup_steps=0", "method.eval_every=2",
              "data.kwargs={n_train: 40, n_eval: 8, seed: 0, negation: 0.25}", "trainer.checkpoint_every=2"]
    _run_all({
        "one": _train(tmp_path, 1, "rm_synthetic", *common, "trainer.batch_size=16", "run.name=one"),
        "two": _train(tmp_path, 2, "rm_synthetic", *common, "trainer.batch_size=8", "run.name=two"),
    }, _env(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    for f in ("model.safetensors", "value_head.safetensors"):
        _assert_same_params(one / "model" / f, two / "model" / f, f"RM {f} 2 processes vs 1")
    trained = load_file(str(one / "model" / "model.safetensors"))
    assert _max_diff(one / "model" / "model.safetensors", two / "model" / "model.safetensors") < \
        1e-2 * _moved_from_init("tiny-llama", trained)
    # the loss, accuracy and held-out metrics are the global batch's, written once
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in mb] == [r["step"] for r in ma] and [r["step"] for r in mb if "loss/rm" in r] == [1, 2, 3, 4]
    for a, b in zip(ma, mb):
        for key in ("loss/rm", "reward/accuracy", "reward/margin", "grad_norm", "eval/accuracy", "eval/loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    rng = torch.load(two / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert sorted(rng["generators"]) == ["torch_rank0", "torch_rank1"]


ILQL_WORKER = textwrap.dedent('''
    """ankus train under torchrun, then every rank writes its own ILQL heads (online and target)."""
    import sys
    from pathlib import Path
    from safetensors.torch import save_file
    import ankus.trainers.ilql as ilql
    from ankus import distributed
    from ankus.cli import main

    made = []

    class RecordedHeads(ilql.ILQLHeads):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    ilql.ILQLHeads = RecordedHeads
    rank = distributed.setup().rank  # before main(), which would tear the group down at exit only
    assert main(sys.argv[2:]) in (0, None)
    save_file({k: v.contiguous() for k, v in made[0].state_dict().items()},
              str(Path(sys.argv[1]) / f"heads_rank{rank}.safetensors"))
''')


def test_ilql_two_processes_equal_one_with_the_global_batch(tmp_path):
    # tiny-llama has no dropout, so the two runs draw nothing that depends on the process count.
    # alpha 0.5 with a Polyak sync every step moves the target heads far from their start: they
    # must stay the same on both ranks and equal to the single process's.
    (tmp_path / "ilql_worker.py").write_text(ILQL_WORKER)
    common = ["model.spec=tiny-llama", "data.dataset=randomwalks", "data.seq_length=11", "data.num_eval=2",
              "trainer.total_steps=4", "trainer.lr=1e-3", "trainer.checkpoint_every=2", "trainer.log_every=1",
              "method.alpha=0.5", "method.steps_for_target_q_sync=1", "method.num_layers_unfrozen=-1",
              "eval.betas=[0, 1]", "eval.samples_per_prompt=1", "generation.max_new_tokens=4"]
    _run_all({
        "one": _train(tmp_path, 1, "ilql_randomwalks", *common, "trainer.batch_size=8", "run.name=one"),
        "two": _torchrun(2, str(tmp_path / "ilql_worker.py"), str(tmp_path), "train", "ilql_randomwalks",
                         f"run.out_dir={tmp_path}", "run.progress=false", *common, "trainer.batch_size=4",
                         "run.name=two"),
    }, _env(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    for f in ("model.safetensors", "ilql_heads.safetensors"):
        _assert_same_params(one / "model" / f, two / "model" / f, f"ILQL {f} 2 processes vs 1")
    heads = load_file(str(two / "model" / "ilql_heads.safetensors"))
    init = load_file(str(two / "checkpoints" / "step-00000002" / "heads.safetensors"))
    assert float((heads["target_q_heads.0.2.weight"] - init["target_q_heads.0.2.weight"]).abs().max()) > 100 * TOL
    # every rank ends with bitwise the same heads, target heads included (rank 0's were saved above)
    rank0, rank1 = load_file(str(tmp_path / "heads_rank0.safetensors")), load_file(str(tmp_path / "heads_rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and any(k.startswith("target_q_heads") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert all(torch.equal(rank0[k], heads[k]) for k in heads)
    # the step-2 checkpoint (after 2 syncs) agrees with the single process's too
    _assert_same_params(one / "checkpoints" / "step-00000002" / "heads.safetensors",
                        two / "checkpoints" / "step-00000002" / "heads.safetensors",
                        "ILQL step-2 heads 2 processes vs 1")
    ma, mb = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    for a, b in zip(ma, mb):
        for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "values/advantage", "grad_norm",
                    "eval/beta=1", "eval/base_beta=0"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    rng = torch.load(two / "checkpoints" / "step-00000002" / "rng.pt", weights_only=True)
    assert sorted(rng["generators"]) == ["torch_rank0", "torch_rank1"]


# ---------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo processes == one plain process with the global batch


def test_sft_fsdp_two_processes_equal_one_plain_process_and_resume(tmp_path):
    common = ["lora={enabled: false}", "trainer.total_steps=4", "trainer.lr=1e-3", "method.eval_every=2",
              "trainer.checkpoint_every=2"]
    _run_all({
        "one": _train(tmp_path, 1, "sft_tiny", *common, "trainer.batch_size=8", "run.name=one"),
        "fsdp": _train(tmp_path, 2, "sft_tiny", *common, "trainer.batch_size=4", "trainer.fsdp=true",
                       "run.name=fsdp"),
    }, _env(tmp_path))
    one, two = tmp_path / "one", tmp_path / "fsdp"
    for rel in ("model/model.safetensors", "checkpoints/step-00000002/model.safetensors"):
        ta, tb = load_file(str(one / rel)), load_file(str(two / rel))
        # a gathered checkpoint names a tied weight twice (lm_head.weight too), with the same values
        assert set(ta) <= set(tb) and torch.equal(tb.get("lm_head.weight", tb["model.embed_tokens.weight"]),
                                                  tb["model.embed_tokens.weight"])
        diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
        print(f"SFT FSDP {rel}: max |param diff| 2 sharded processes vs 1 plain: {diff:.3g}")
        assert diff <= TOL
    # the saved model is an ordinary Hugging Face model, the gathered checkpoint a full one
    assert json.loads((two / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    opt = torch.load(two / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    full = load_file(str(two / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(opt["state"][k]["exp_avg"].shape == full[k].shape for k in opt["state"])
    rng = torch.load(two / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert sorted(rng["generators"]) == ["torch_rank0", "torch_rank1"]
    ma, mb = read_metrics(one), read_metrics(two)
    for a, b in zip(ma, mb):
        for key in ("loss/sft", "grad_norm", "loss/sft_eval"):
            if key in a:  # the norm sums squares shard by shard: measured up to 1.2e-5 relative
                assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])

    # resumed from the step-2 checkpoint (scattered back into the shards), it ends where it did
    uninterrupted = load_file(str(two / "model" / "model.safetensors"))
    import shutil

    shutil.rmtree(two / "checkpoints" / "step-00000004")
    shutil.rmtree(two / "model")
    _run_all({"resume": _train(tmp_path, 2, "sft_tiny", *common, "trainer.batch_size=4",
                               "trainer.fsdp=true", "run.name=fsdp", "--resume")}, _env(tmp_path))
    resumed = load_file(str(two / "model" / "model.safetensors"))
    diff = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    print(f"SFT FSDP resumed vs uninterrupted: {diff:.3g}")
    assert diff == 0.0
    assert [r["step"] for r in read_metrics(two) if "loss/sft" in r] == [1, 2, 3, 4]


def test_dpo_fsdp_two_processes_equal_one_plain_process(tmp_path):
    common = ["trainer.total_steps=4", "trainer.lr=1e-3", "method.ref_batch_size=8"]
    _run_all({
        "one": _train(tmp_path, 1, "dpo_tiny", *common, "trainer.batch_size=8", "run.name=one"),
        "fsdp": _train(tmp_path, 2, "dpo_tiny", *common, "trainer.batch_size=4", "trainer.fsdp=true",
                       "run.name=fsdp"),
    }, _env(tmp_path))
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors",
                        tmp_path / "fsdp" / "model" / "model.safetensors", "DPO FSDP 2 sharded processes vs 1 plain")
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_ppo_fsdp_two_processes_equal_one_plain_process_and_resume(tmp_path):
    """PPO (GAE, value head, Hydra reference) sharded over 2 processes == 1 plain process with the
    global batch; sampling and scoring run on gathered parameters, the updates sharded, and the
    value head (replicated) shares the optimizer and the gradient clipping with the shards."""
    common = ["model.spec=tiny-llama", "trainer.total_steps=2", "trainer.lr=1e-3", "trainer.checkpoint_every=1",
              "method.chunk_size=4", "method.ppo_epochs=2", "method.num_layers_unfrozen=2",
              "method.scale_reward=running", "method.target=1.0", "generation.max_new_tokens=6",
              "data.num_eval=2", "data.eval_samples=1"]
    fsdp = ["method.num_rollouts=4", "trainer.batch_size=2", "trainer.fsdp=true", "run.name=fsdp"]
    # GRPO, everything trains, a copy reference: prompts shared by their k = 2 responses in every forward
    grpo = ["method.estimator=grpo", "method.samples_per_prompt=2", "method.reference=copy",
            "method.num_layers_unfrozen=-1"]
    _run_all({
        "one": _train(tmp_path, 1, "ppo_sentiment", *common, "method.num_rollouts=8", "trainer.batch_size=4",
                      "run.name=one"),
        "fsdp": _train(tmp_path, 2, "ppo_sentiment", *common, *fsdp),
        "grpo_one": _train(tmp_path, 1, "ppo_sentiment", *common, *grpo, "method.num_rollouts=8",
                           "trainer.batch_size=4", "run.name=grpo_one"),
        "grpo_fsdp": _train(tmp_path, 2, "ppo_sentiment", *common, *grpo, *fsdp[:-1], "run.name=grpo_fsdp"),
    }, _env(tmp_path), timeout=400)
    one, two = tmp_path / "one", tmp_path / "fsdp"
    ck = "checkpoints/step-00000002"
    ga = load_file(str(tmp_path / "grpo_one" / ck / "policy.safetensors"))
    gb = load_file(str(tmp_path / "grpo_fsdp" / ck / "policy.safetensors"))
    diff = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
    print(f"GRPO (shared prompts) FSDP policy: max |param diff| 2 sharded processes vs 1 plain: {diff:.3g}")
    assert diff <= TOL
    _assert_same_params(one / ck / "value_head.safetensors", two / ck / "value_head.safetensors",
                        "PPO FSDP value head 2 sharded processes vs 1 plain")
    ta, tb = load_file(str(one / ck / "policy.safetensors")), load_file(str(two / ck / "policy.safetensors"))
    assert set(ta) <= set(tb)  # a gathered checkpoint names the tied head too
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    print(f"PPO FSDP policy: max |param diff| 2 sharded processes vs 1 plain: {diff:.3g}")
    assert diff <= TOL
    for a, b in zip(read_metrics(one), read_metrics(two)):
        for key in ("reward/mean", "kl/mean", "kl/beta", "loss/pg", "loss/vf", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    assert json.loads((two / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    # resumed from the step-1 checkpoint (optimizer state keyed by name over policy + value head)
    uninterrupted = load_file(str(two / ck / "policy.safetensors"))
    import shutil

    shutil.rmtree(two / ck)
    _run_all({"resume": _train(tmp_path, 2, "ppo_sentiment", *common, *fsdp, "--resume")}, _env(tmp_path))
    resumed = load_file(str(two / ck / "policy.safetensors"))
    diff = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    print(f"PPO FSDP resumed vs uninterrupted: {diff:.3g}")
    assert diff == 0.0
    assert [r["step"] for r in read_metrics(two)] == [1, 2]


def test_reward_model_fsdp_equals_data_parallel_and_one_process(tmp_path):
    """33 pairs, a global batch of 16: the third step has 1 pair, so the process without one runs a
    zero-weighted filler forward to match the other's count (FSDP needs the same forwards).
    This batch's near-zero gradients, amplified by Adam, put even data parallel 1.4e-5 from one
    process; FSDP must match data parallel, and both the single process up to that rounding."""
    common = ["data.batching=pack", "trainer.total_steps=3", "trainer.lr=1e-3", "trainer.warmup_steps=0",
              "data.kwargs={n_train: 33, n_eval: 8, seed: 0, negation: 0.25}"]
    _run_all({
        "one": _train(tmp_path, 1, "rm_synthetic", *common, "trainer.batch_size=16", "run.name=one"),
        "ddp": _train(tmp_path, 2, "rm_synthetic", *common, "trainer.batch_size=8", "run.name=ddp"),
        "fsdp": _train(tmp_path, 2, "rm_synthetic", *common, "trainer.batch_size=8", "trainer.fsdp=true",
                       "run.name=fsdp"),
    }, _env(tmp_path))
    one, ddp, two = (tmp_path / name / "model" for name in ("one", "ddp", "fsdp"))
    _assert_same_params(ddp / "value_head.safetensors", two / "value_head.safetensors", "RM FSDP vs DDP value head")
    ta, tb = load_file(str(ddp / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert set(ta) <= set(tb)  # a gathered checkpoint names the tied head too
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    print(f"RM FSDP trunk: max |param diff| 2 sharded processes vs 2 data parallel: {diff:.3g}")
    assert diff <= TOL
    trained = load_file(str(one / "model.safetensors"))
    far = max(float((trained[k] - tb[k]).abs().max()) for k in trained)
    print(f"RM FSDP trunk vs 1 plain process: {far:.3g}")
    assert far < 1e-2 * _moved_from_init("tiny-llama", trained)
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")):
        for key in ("loss/rm", "reward/accuracy", "eval/accuracy", "eval/loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_fsdp_is_refused_where_it_is_not_wired(tmp_path):
    """ILQL replicates; an FSDP launch of it stops at start-up."""
    env = dict(_env(tmp_path), ACCELERATE_USE_FSDP="true")
    out = subprocess.run([sys.executable, "-m", "ankus.cli", "train", "ilql_randomwalks",
                          f"run.out_dir={tmp_path}", "trainer.total_steps=1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "does not shard it" in out.stderr + out.stdout


def test_pretrain_two_processes_equal_one_data_parallel_and_fsdp(tmp_path):
    """Pretraining with 2 processes (data parallel, and FSDP) == 1 process with the global batch.
    Data parallel uses the fused head loss like the single process; FSDP runs the model's own head,
    so it is compared with a single process doing the same (method.loss_chunk=0)."""
    import random

    from ankus.data.corpus import build_corpus

    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away from home to see what is there".split()
    for i in range(10):
        (texts / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(100 + 20 * i)))
    build_corpus(str(texts), tmp_path / "corpus")
    common = ["pretrain_tiny", f"data.corpus={tmp_path / 'corpus'}", "trainer.total_steps=4",
              "trainer.checkpoint_every=2", "data.isolate_documents=true", "method.eval_every=2"]
    _run_all({
        "one": _train(tmp_path, 1, *common, "trainer.batch_size=8", "run.name=one"),
        "two": _train(tmp_path, 2, *common, "trainer.batch_size=4", "run.name=two"),
        "one_plain": _train(tmp_path, 1, *common, "trainer.batch_size=8", "method.loss_chunk=0", "run.name=one_plain"),
        "fsdp": _train(tmp_path, 2, *common, "trainer.batch_size=4", "trainer.fsdp=true", "run.name=fsdp"),
    }, _env(tmp_path), timeout=480)
    for a, b in (("one", "two"), ("one_plain", "fsdp")):
        ta = load_file(str(tmp_path / a / "model" / "model.safetensors"))
        tb = load_file(str(tmp_path / b / "model" / "model.safetensors"))
        assert set(ta) <= set(tb)  # FSDP's gathered state may name the tied head too
        diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
        print(f"pretrain {b} vs {a}: max |param diff| {diff:.3g}")
        assert diff <= TOL
        assert diff < 1e-2 * _moved_from_init("tiny-llama", ta)
        ma, mb = read_metrics(tmp_path / a), read_metrics(tmp_path / b)
        assert [r["step"] for r in ma] == [r["step"] for r in mb]
        for ra, rb in zip(ma, mb):
            for key in ("loss/train", "grad_norm", "loss/val"):
                if key in ra:
                    assert abs(ra[key] - rb[key]) < 1e-4 * max(1.0, abs(ra[key])), (b, key, ra[key], rb[key])
    rng_state = torch.load(tmp_path / "two" / "checkpoints" / "step-00000004" / "rng.pt", weights_only=True)
    assert sorted(rng_state["generators"]) == ["torch_rank0", "torch_rank1"]
