"""Sampling speed: transformers' ``generate`` and ankus' ``generate`` side by side, same prompts,
same sampling distribution (T=1, no top-k / top-p, EOS ignored so both make every token).

    python benchmarks/generation.py                      # CPU, SmolLM2-135M fp32, batch 1 and 16
    python benchmarks/generation.py --bf16               # also ankus with bf16 packed linears (PPO demo's rollouts)
    python benchmarks/generation.py --device cuda        # random-init 135M / 360M / 1B shapes, bf16, batch 64

Prints, for each engine, the median over the repeats (after a warm-up) of new tokens per
wall-clock second and per CPU-second, each with its ratio to transformers. Runs alternate
between the engines so that load from other processes hits all alike; on a shared machine quote
the ratios, not the absolute numbers, and check `uptime` first. The warm-up call's time is
printed as "first call" (on a GPU it includes capturing the CUDA graph, or compiling).
In CPU mode a header line says which linear layers ankus runs (``cpu_path_info``: oneDNN with
packed weights, or the model's own when the oneDNN probe fails, with the reason), on which ISA
and with how many threads; each row names its engine's path, so a fallback cannot pass unseen.

History: where the CPU time went on the machine of 2026-11-26 (SmolLM2-135M fp32, batch 16;
torch.profiler over 24 decode steps): 74% of the step is the 211 linear layers (oneDNN, packed weights), ~60 ms a step.
They stream all 540 MB of fp32 weights once per step. On this 2-core VM, reading a 540 MB tensor
takes 57.5 ms with 2 threads (9.4 GB/s, measured with torch ``sum``), so the linear layers run at
the memory-bandwidth floor. transformers' step is ~104 ms; at that floor, fp32 can be at most
~1.7x faster. ankus measures 1.62-1.65x. The 2x goal needs fewer bytes per weight:
``--bf16`` (opt-in: the numbers change) measured 2.07-2.09x.

Each CPU run measures its own floor: the memory read bandwidth (the median time of ``sum`` over an
fp32 tensor as large as the linear weights) and the matmul peak (a 1024^3 product, fp32 and bf16),
at the run's thread count. The floor of a call is its prefill plus its decode steps, each at the
slower of reading the linear weights once and doing 2 FLOPs per weight per row at that peak; each
row prints its tok/s as a fraction of the floor for its weight precision. Before timing, the run
prints the path ``generate`` takes (measured at start-up by :mod:`ankus.generation.path_timing`:
one pass over every linear weight through packed oneDNN and plain ``F.linear``, and bf16 for
PPO's ``rollout_bf16: auto``, with the times), so a slow or fallen-back path shows in the log.

Measured 2026-12-06 on the idle 2-core AMD EPYC (AVX-512 with bf16, load < 0.5),
``--batch-sizes 16 --repeats 5 --bf16``, three runs in a row (2 threads; bandwidth 45-65 GB/s,
matmul peak 176-189 GFLOP/s fp32, 384-425 bf16)::

  transformers   ankus fp32 (packed)        ankus bf16 (PPO's auto choice here)   floor fp32 / bf16
  117.9 tok/s    216.7 (1.84x, *)           281.7 (2.39x, *)                      *
  128.3          217.8 (1.70x, 55%)         286.6 (2.23x, 33%)                    393 / 857 tok/s
  118.9          223.7 (1.88x, 53%)         278.5 (2.34x, 32%)                    421 / 863

(* the first run still used a decode-only floor, 680 / 1579 tok/s: 32% / 18% of it; the prefill
of 16 x 32 prompt tokens is ~40% of the work of a call with 48 new tokens, so the second and third
runs count it.) ankus agrees with itself within 3% over the runs (fp32 and bf16); transformers moves by 9%, which
is most of the spread in the ratios. The start-up measurement took packed oneDNN (31.5 ms a pass
over the weights at 16 rows, plain ``F.linear`` 79 ms) and, for PPO, bf16 (19.5 ms). On this
machine a decode step is compute-bound, not memory-bound: reading the 538 MB of fp32 weights takes
8-12 ms, their products at the matmul peak 24 ms. So "90% of the bandwidth floor" cannot be met
here by any engine; against the roofline floor (prefill included) fp32 ankus reaches 53-55%. Where
the rest goes (torch.profiler, 2 threads, the same call): the linear layers run at about the fp32
matmul peak (~24 ms a decode step plus ~0.9 s of prefill over 512 prompt tokens); the attention
(flash SDPA at one query row, ~5 ms a step) and the per-layer norms, rotary and residual
elementwise ops (~15 ms a step) are the other half. The issue's 1.09x came from another machine,
where this header was not yet printed; what moves the fp32 ratio on this one is transformers'
run-to-run spread and the thread count (1.41x on one thread in an earlier run).

In GPU mode the 135M shape is first checked in fp32: the log-probs the engine reports for its
sampled tokens must equal those of one teacher-forced forward over prompt + response (prompts of
8-29 tokens, so left padding is exercised), through the CUDA-graph path and the eager one. After
each comparison the kept graph is replayed alone ("graph replay alone"): the GPU time of a decode
step without the sampling loop around it.

Measured on one NVIDIA H100 80GB HBM3 (2026-11-26, torch 2.11.0+cu130, transformers 5.24.0,
random-init bf16 models, 32-token prompts, 64 new tokens, median of 3;
``python benchmarks/generation.py --device cuda --new-tokens 64 --repeats 3 --batch-sizes 64 1``).
Three runs on the same kind of machine; transformers' figure moved by up to 15% between runs::

  shape          batch  transformers tok/s   ankus tok/s   ratio       ankus first call
  smollm2-135m     64       2782-3252        14906-15043   4.63-5.36x   0.4-1.0 s
  smollm2-135m      1       33.8-49.6        280-285       5.75-8.27x
  smollm2-360m     64         3031             12927       4.26x
  smollm2-360m      1         45.1             249         5.52x
  llama-3.2-1b     64       4435-5386        15634-15977   2.97-3.53x
  llama-3.2-1b      1         78.6             339         4.31x
  smollm2-135m     64         2921   ankus 14982 (5.13x); ankus + compile 21973 (7.52x, first call 28 s)

The fp32 check gave 1.9e-6 for both paths. transformers spends ~20 ms a step launching the
model's kernels one by one. ankus replays the whole step as one CUDA graph, and the graph itself
is now most of a step: 3.50 ms of 4.3 ms (135M, batch 64) and 2.95 ms at batch 1. It is bound
by the count of its small kernels (30 layers × ~20 kernels), not by arithmetic or memory traffic.
``GenerationConfig(compile=True)`` fuses them with ``torch.compile`` before capture: 2.04 ms a
replay, 7.5x transformers, for 28 s of compiling per new shape. That is why it is opt-in.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ankus.generation import cuda_graphs
from ankus.generation.engine import GenerationConfig, cpu_path_info, generate, release_graphs
from ankus.generation.onednn import PACKED, PACKED_BF16, PLAIN
from ankus.generation.path_timing import describe, fastest_path
from ankus.rl.rollouts import rollout_config

AUTO_CANDIDATES = (PACKED, PLAIN, PACKED_BF16)  # what PPO's rollout_bf16=auto measures

# Random-init shapes for the GPU mode (weights do not matter for speed).
CUDA_MODELS = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
}

TEXT = ("The history of the region is long and varied. Farmers settled the river valleys first, growing barley "
        "and flax, and trading with the herders of the hills. Later, towns grew at the fords, and their markets "
        "drew merchants from the coast, who brought salt, copper and news of the wider world. ")


def make_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``length`` tokens: windows over a repeated passage."""
    ids = tokenizer(TEXT * 8)["input_ids"]
    return [ids[3 * i: 3 * i + length] for i in range(batch)]


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    ids = torch.tensor(prompts, device=model.device)
    gc = copy.deepcopy(model.generation_config)
    gc.update(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad_id,
              eos_token_id=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def ankus_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, bf16: bool = False,
                   compile: bool = False) -> int:
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, ignore_eos=True, bf16=bf16,
                           compile=compile)
    out = generate(model, tokenizer, prompts, cfg)
    return int(out.response_mask.sum())


def teacher_forced_check(model, tokenizer, new_tokens: int = 32, batch: int = 8, **overrides) -> float:
    """Sample with ankus, then score the same tokens with one ordinary forward over prompt +
    response: the largest |engine log-prob − teacher-forced log-prob| over the sampled tokens.
    Prompts of different lengths (left padding) and a decode path that wrote keys/values at the
    wrong place or read a stale mask would show up as a large gap; a correct one differs by
    rounding only."""
    from ankus.data.tokens import position_ids_from_mask

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 40000, (batch, 32), generator=g).tolist()
    prompts = [row[: 8 + 3 * i] for i, row in enumerate(ids)]  # 8..29 tokens
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=True, temperature=1.0, ignore_eos=True, **overrides)
    out = generate(model, tokenizer, prompts, cfg, generator=torch.Generator().manual_seed(2))
    full = torch.cat([out.prompt_ids, out.response_ids], 1)
    mask = torch.cat([out.prompt_mask, out.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
    P = out.prompt_ids.shape[1]
    logps = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, out.response_ids[..., None]).squeeze(-1)
    live = out.response_mask.bool()
    return float((logps - out.logprobs)[live].abs().max())


def graph_replay_time(model, name: str, batch: int, steps: int = 100) -> None:
    """GPU mode: the captured decode step alone (the kept graphs of the last calls), replayed
    up to ``steps`` times: the floor under a step's time, whatever the loop around it costs."""
    for key, slot in cuda_graphs.kept_slots():
        # only this model's graphs: an earlier model's were captured over memory since freed
        if slot.model() is not model or key[2] != batch or not isinstance(slot.graph, torch.cuda.CUDAGraph):
            continue
        n = min(steps, slot.length)  # each replay writes one more cache position: stay inside the cache
        slot.cache.reset()  # from position 0 (the next generate call resets it again)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            slot.graph.replay()
        end.record()
        torch.cuda.synchronize()
        label = "compiled graph" if key[-1] else "graph"
        print(f"{name:<12} batch {batch:<4} {label} replay alone: {start.elapsed_time(end) / n:.3f} ms/step",
              flush=True)


def timed(fn, sync) -> tuple[float, float]:
    """New tokens per wall-clock second and per CPU-second of this process (all its threads) for
    one call. On a machine shared with other jobs the wall clock swings with their load; CPU time
    much less so (with --threads 1 it is the cleanest comparison there)."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    sync()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def engine_path(model, batch: int, config: GenerationConfig) -> str:
    """The linear path ``generate`` runs for this batch (measured at start-up where it is a
    choice), printed with its reason (the measured times)."""
    info = cpu_path_info(model, config, rows=min(batch, 64))
    print(f"batch {batch}: ankus {'bf16' if config.bf16 else 'fp32'} linear path {info['path']} ({info['reason']})")
    return info["path"]


def describe_cpu_path(info: dict) -> str:
    """One line from ``cpu_path_info()``: which linear layers ankus runs, why, and on what ISA."""
    limit = f", limit {info['isa_limit']}" if info["isa_limit"] else ""
    return (f"ankus linear path: {info['path']} ({info['reason']}); oneDNN ISA: {info['onednn_isa'] or 'unknown'}, "
            f"matmul {info['onednn_impl'] or 'unknown'}{limit}; ATen ISA: {info['aten_isa']}; "
            f"torch threads {info['threads']} (interop {info['interop_threads']})")


def linear_weight_bytes(model, bytes_per_weight: int) -> int:
    """Bytes a decode step must stream: every ``nn.Linear`` weight (the tied LM head included) once."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            total += mod.weight.numel() * bytes_per_weight
    return total


def read_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes/s this process reads from memory at the current thread count: the median time of
    ``sum`` over an fp32 tensor of ``nbytes`` (larger than any cache), i.e. a streaming read."""
    t = torch.ones(nbytes // 4)
    t.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def floor_tok_s(model, batch: int, bandwidth: float, bytes_per_weight: int) -> float:
    """The memory-bandwidth floor as a ceiling on decode speed: a decode step cannot take less than
    reading the linear weights once, so at most ``batch`` tokens per that time."""
    return batch * bandwidth / linear_weight_bytes(model, bytes_per_weight)


def roofline_tok_s(model, batch: int, prompt: int, new: int, bandwidth: float, peak: float,
                   bytes_per_weight: int) -> tuple[float, str]:
    """(ceiling on new tokens/s for a whole call, what bounds its decode steps): the prefill of
    batch x prompt tokens and ``new`` decode steps of ``batch`` rows, each no faster than the
    slower of reading the linear weights once (bandwidth) and doing 2 FLOPs per weight per row at
    the measured matmul peak (compute). The attention's few FLOPs at short contexts are left out."""
    weights, nbytes = linear_weight_bytes(model, 1), linear_weight_bytes(model, bytes_per_weight)
    prefill = max(2 * weights * batch * prompt / peak, nbytes / bandwidth)
    step_compute, step_memory = 2 * weights * batch / peak, nbytes / bandwidth
    seconds = prefill + new * max(step_compute, step_memory)
    return batch * new / seconds, "compute" if step_compute > step_memory else "memory"


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large (n x n) @ (n x n) product in ``dtype`` at the current thread count (median)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def compare(name: str, engines: dict, repeats: int, sync, paths: dict | None = None,
            floors: dict | None = None) -> None:
    """``paths``: engine -> the linear path it runs, printed as a column (CPU mode). ``floors``:
    engine -> the bandwidth-floor tok/s of its weight precision; each row then prints its fraction."""
    first = {}
    for k, fn in engines.items():  # warm-up (one-time costs: packing weights, CUDA context and graphs, allocator)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first[k] = time.perf_counter() - t0
    wall = {k: [] for k in engines}
    cpu = {k: [] for k in engines}
    for _ in range(repeats):
        for k, fn in engines.items():  # alternate engines so that outside load hits all alike
            w, c = timed(fn, sync)
            wall[k].append(w)
            cpu[k].append(c)
    base_w, base_c = statistics.median(wall["transformers"]), statistics.median(cpu["transformers"])
    for k in engines:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        spread = f"[{min(wall[k]):.0f}-{max(wall[k]):.0f}]"
        path = f"  {(paths or {}).get(k, '-'):<18}" if paths else ""
        floor = f"  {w / floors[k]:4.0%} of floor" if floors and k in floors else ""
        print(f"{name:<22} {k:<20}{path} {w:8.1f} tok/s {spread:>12}  x{w / base_w:.2f}{floor}   |  "
              f"{c:7.1f} tok/CPU-s  x{c / base_c:.2f}   (first call {first[k]:.2f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--bf16", action="store_true", help="CPU: also time ankus with bf16 packed linears (opt-in)")
    ap.add_argument("--models", nargs="+", default=list(CUDA_MODELS), help="GPU mode: which shapes")
    ap.add_argument("--compile", action="store_true", help="GPU mode: also ankus with torch.compile (opt-in)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.device == "cpu":
        from ankus import load_model

        model, tok = load_model()
        batch_sizes = args.batch_sizes or [1, 16]
        new_tokens = args.new_tokens or 48
        print(f"SmolLM2-135M fp32 on CPU, {torch.get_num_threads()} threads, prompts of {args.prompt_tokens} tokens, "
              f"{new_tokens} new tokens, median of {args.repeats}")
        print(describe_cpu_path(cpu_path_info(model)))
        bandwidth = read_bandwidth(linear_weight_bytes(model, 4))
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        print(f"memory read bandwidth {bandwidth / 1e9:.2f} GB/s ({torch.get_num_threads()} threads); a decode step "
              f"streams {linear_weight_bytes(model, 4) / 1e6:.0f} MB of fp32 linear weights "
              f"({linear_weight_bytes(model, 2) / 1e6:.0f} MB in bf16); matmul peak {peaks['fp32'] / 1e9:.1f} "
              f"GFLOP/s fp32, {peaks['bf16'] / 1e9:.1f} bf16")
        for b in batch_sizes:
            paths = {"transformers": "model's own (MKL)", "ankus": engine_path(model, b, GenerationConfig())}
            if args.bf16:
                paths["ankus bf16"] = engine_path(model, b, GenerationConfig(bf16=True))
            floors = {}
            for prec, nbytes in (("fp32", 4), ("bf16", 2)):
                floors[prec], bound = roofline_tok_s(model, b, args.prompt_tokens, new_tokens, bandwidth, peaks[prec],
                                                     nbytes)
                print(f"batch {b} {prec}: floor {floors[prec]:.0f} tok/s (prefill + {new_tokens} decode steps at the "
                      f"roofline; decode {bound}-bound; bandwidth alone would allow "
                      f"{floor_tok_s(model, b, bandwidth, nbytes):.0f} tok/s of decode)")
            rollout = rollout_config(model, GenerationConfig(), "auto", b)
            print(f"batch {b}: PPO's default rollout path (method.rollout_bf16=auto) here: "
                  f"{'bf16' if rollout.bf16 else 'fp32'} ({describe(fastest_path(model, b, AUTO_CANDIDATES)[1])})")
            floors = {"transformers": floors["fp32"], "ankus": floors["fp32"], "ankus bf16": floors["bf16"]}
            prompts = make_prompts(tok, b, args.prompt_tokens)
            engines = {
                "transformers": lambda: hf_generate(model, prompts, new_tokens, tok.pad_token_id),
                "ankus": lambda: ankus_generate(model, tok, prompts, new_tokens),
            }
            if args.bf16:
                engines["ankus bf16"] = lambda: ankus_generate(model, tok, prompts, new_tokens, bf16=True)
            compare(f"batch {b}", engines, args.repeats, lambda: None, paths, floors)
        return

    from transformers import LlamaConfig, LlamaForCausalLM

    from ankus.models.loading import default_tokenizer

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    tok = default_tokenizer()
    batch_sizes = args.batch_sizes or [64]
    new_tokens = args.new_tokens or 128
    sync = torch.cuda.synchronize
    print(f"{torch.cuda.get_device_name()}: random-init models, bf16, prompts of {args.prompt_tokens} tokens, "
          f"{new_tokens} new tokens, median of {args.repeats}")
    for i, name in enumerate(args.models):
        shape = dict(CUDA_MODELS[name])
        rope_theta = shape.pop("rope_theta")
        config = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                             rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
        with torch.device("cuda"):  # initialise on the GPU (a 1B model's CPU init takes many seconds)
            model = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
        model.generation_config.pad_token_id = tok.eos_token_id
        if i == 0:  # is the CUDA-graph path right? (fp32 copy: rounding then stays far below any real fault)
            ref = copy.deepcopy(model).float()
            for label, kw in (("CUDA graph", {}), ("eager", {"cuda_graph": False})):
                gap = teacher_forced_check(ref, tok, **kw)
                print(f"{name} fp32 {label:10s} max |engine log-prob - teacher-forced log-prob|: {gap:.2e}  "
                      f"{'OK' if gap < 1e-3 else 'WRONG'}", flush=True)
            del ref
        vocab = shape["vocab_size"]
        for b in batch_sizes:
            g = torch.Generator().manual_seed(b)
            prompts = torch.randint(100, min(vocab, len(tok)), (b, args.prompt_tokens), generator=g).tolist()
            engines = {
                "transformers": lambda: hf_generate(model, prompts, new_tokens, tok.eos_token_id),
                "ankus": lambda: ankus_generate(model, tok, prompts, new_tokens),
            }
            if args.compile:
                engines["ankus + compile"] = lambda: ankus_generate(model, tok, prompts, new_tokens, compile=True)
            compare(f"{name} batch {b}", engines, args.repeats, sync)
            graph_replay_time(model, name, b)
        model = engines = None  # freed before the next shape loads
        release_graphs()  # the kept graphs and caches of this model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
