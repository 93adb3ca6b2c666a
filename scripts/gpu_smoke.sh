#!/usr/bin/env bash
# Smoke runs of every trainer on GPUs, and their sharded (FSDP2) forms, each compared with a plain
# single process on the same global batch:
#
#   bash scripts/gpu_smoke.sh            # PYTHON=... interpreter; NPROC=... processes (default: one per GPU)
#
# One GPU (NPROC=1):
#   * plain runs on cuda:0 of SFT, DPO, PPO (Hydra reference; separate copy; GRPO), reward model, ILQL;
#   * FSDP2 over a mesh of one (torchrun --nproc_per_node 1, trainer.fsdp=true) of SFT, DPO, PPO and the RM:
#     the sharded code path (DTensor parameters, gathered sampling, gathered checkpoints), whose
#     parameters must equal the plain run's.
# Several GPUs (NPROC>=2), launched with Accelerate:
#   * DDP (configs/accelerate/ddp_multigpu.yaml) of every trainer vs 1 process with the global batch;
#   * FSDP2 (configs/accelerate/fsdp.yaml) of SFT, DPO, PPO and the reward model vs the same single process.
# Always: a sharded launch of ILQL and a DeepSpeed launch must be refused, not run replicated.
#
# GPU kernels reduce in another order than the CPU tests, so differences are printed and flagged
# above 1e-4 (the CPU tests hold 1e-5). TF32 is off. The script runs every check, then exits 1 if
# any failed; logs and run directories are under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
OUT=${OUT:-$(mktemp -d /tmp/ankus-gpu-smoke-XXXX)}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the same script on the CPU (gloo), to check the script itself
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false NVIDIA_TF32_OVERRIDE=0
FAILED=()

"$PYTHON" - <<'PY'
import torch, accelerate, transformers
print(f"torch {torch.__version__}  accelerate {accelerate.__version__}  transformers {transformers.__version__}")
print("cuda:", torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY

run() {  # run NAME LAUNCHER... -- RECIPE OVERRIDES...
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done
  shift
  local recipe=$1; shift
  echo "== $name"
  local t0=$SECONDS
  if "${launcher[@]}" -m ankus.cli train "$recipe" run.out_dir="$OUT" run.name="$name" run.progress=false "$@" \
       > "$OUT/$name.log" 2>&1; then
    echo "   ok, $((SECONDS - t0)) s; $(grep -m1 -o "mean held-out score: [^(]*" "$OUT/$name.log" || true)"
  else
    echo "   FAILED ($((SECONDS - t0)) s):"; tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'; FAILED+=("$name")
  fi
}
PLAIN=("$PYTHON")
TORCHRUN1=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1)
ACCEL=("$PYTHON" -m accelerate.commands.launch --num_processes "$NPROC")
DDP=("${ACCEL[@]}" --config_file configs/accelerate/ddp_multigpu.yaml)
FSDP=("${ACCEL[@]}" --config_file configs/accelerate/fsdp.yaml)

SFT=(recipes/sft_tiny.yaml method.lora=false trainer.device=$DEVICE)
DPO=(recipes/dpo_tiny.yaml trainer.total_steps=4 trainer.device=$DEVICE)
PPO=(ppo_sentiment model.spec=tiny-llama trainer.total_steps=2 trainer.checkpoint_every=2 method.chunk_size=4
     method.ppo_epochs=2 generation.max_new_tokens=8 data.num_eval=2 method.num_layers_unfrozen=2 trainer.device=$DEVICE)
GRPO=(method.estimator=grpo method.samples_per_prompt=2 method.reference=copy method.num_layers_unfrozen=-1)
RM=(recipes/rm_synthetic.yaml data.batching=pack trainer.total_steps=4 "data.kwargs={n_train: 64, n_eval: 8}"
    trainer.device=$DEVICE)
ILQL=(recipes/ilql_randomwalks.yaml model.spec=tiny-llama trainer.total_steps=4 data.num_eval=2
      eval.samples_per_prompt=1 generation.max_new_tokens=4 method.steps_for_target_q_sync=1 method.alpha=0.5
      trainer.device=$DEVICE)
N=$NPROC
# the single-process baselines, with the global batch
run sft_1 "${PLAIN[@]}" -- "${SFT[@]}" trainer.batch_size=$((4 * N))
run dpo_1 "${PLAIN[@]}" -- "${DPO[@]}" trainer.batch_size=$((4 * N))
run ppo_1 "${PLAIN[@]}" -- "${PPO[@]}" method.num_rollouts=$((4 * N)) trainer.batch_size=$((2 * N))
run grpo_1 "${PLAIN[@]}" -- "${PPO[@]}" "${GRPO[@]}" method.num_rollouts=$((4 * N)) trainer.batch_size=$((2 * N))
run rm_1 "${PLAIN[@]}" -- "${RM[@]}" trainer.batch_size=$((8 * N))
run ilql_1 "${PLAIN[@]}" -- "${ILQL[@]}" trainer.batch_size=$((4 * N))
PAIRS=()  # "baseline run file" to compare
if (( N == 1 )); then
  run sft_fsdp "${TORCHRUN1[@]}" -- "${SFT[@]}" trainer.batch_size=4 trainer.fsdp=true
  run dpo_fsdp "${TORCHRUN1[@]}" -- "${DPO[@]}" trainer.batch_size=4 trainer.fsdp=true
  run ppo_fsdp "${TORCHRUN1[@]}" -- "${PPO[@]}" method.num_rollouts=4 trainer.batch_size=2 trainer.fsdp=true
  run grpo_fsdp "${TORCHRUN1[@]}" -- "${PPO[@]}" "${GRPO[@]}" method.num_rollouts=4 trainer.batch_size=2 \
    trainer.fsdp=true
  run rm_fsdp "${TORCHRUN1[@]}" -- "${RM[@]}" trainer.batch_size=8 trainer.fsdp=true
else
  run sft_n "${DDP[@]}" -- "${SFT[@]}" trainer.batch_size=4
  run dpo_n "${DDP[@]}" -- "${DPO[@]}" trainer.batch_size=4
  run ppo_n "${DDP[@]}" -- "${PPO[@]}" method.num_rollouts=4 trainer.batch_size=2
  run grpo_n "${DDP[@]}" -- "${PPO[@]}" "${GRPO[@]}" method.num_rollouts=4 trainer.batch_size=2
  run rm_n "${DDP[@]}" -- "${RM[@]}" trainer.batch_size=8
  run ilql_n "${DDP[@]}" -- "${ILQL[@]}" trainer.batch_size=4
  run sft_fsdp "${FSDP[@]}" -- "${SFT[@]}" trainer.batch_size=4
  run dpo_fsdp "${FSDP[@]}" -- "${DPO[@]}" trainer.batch_size=4
  run ppo_fsdp "${FSDP[@]}" -- "${PPO[@]}" method.num_rollouts=4 trainer.batch_size=2
  run grpo_fsdp "${FSDP[@]}" -- "${PPO[@]}" "${GRPO[@]}" method.num_rollouts=4 trainer.batch_size=2
  run rm_fsdp "${FSDP[@]}" -- "${RM[@]}" trainer.batch_size=8
  PAIRS+=("sft_1 sft_n model/model.safetensors" "dpo_1 dpo_n model/model.safetensors"
          "ppo_1 ppo_n checkpoints/step-00000002/policy.safetensors"
          "ppo_1 ppo_n checkpoints/step-00000002/value_head.safetensors"
          "grpo_1 grpo_n checkpoints/step-00000002/policy.safetensors"
          "rm_1 rm_n model/model.safetensors" "rm_1 rm_n model/value_head.safetensors"
          "ilql_1 ilql_n model/model.safetensors" "ilql_1 ilql_n model/ilql_heads.safetensors")
fi
PAIRS+=("sft_1 sft_fsdp model/model.safetensors" "dpo_1 dpo_fsdp model/model.safetensors"
        "ppo_1 ppo_fsdp checkpoints/step-00000002/policy.safetensors"
        "ppo_1 ppo_fsdp checkpoints/step-00000002/value_head.safetensors"
        "grpo_1 grpo_fsdp checkpoints/step-00000002/policy.safetensors"
        "rm_1 rm_fsdp model/model.safetensors" "rm_1 rm_fsdp model/value_head.safetensors")

"$PYTHON" - "$OUT" "${PAIRS[@]}" <<'PY' || FAILED+=(compare)
import sys
from pathlib import Path
from safetensors.torch import load_file
out, bad = Path(sys.argv[1]), 0
for pair in sys.argv[2:]:
    one, many, rel = pair.split()
    a, b = out / one / rel, out / many / rel
    if not (a.exists() and b.exists()):
        print(f"{many:10s} {rel:48s} missing (a run failed)"); bad += 1; continue
    ta, tb = load_file(str(a)), load_file(str(b))
    d = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)  # a gathered file may add a tied name
    bad += d > 1e-4
    print(f"{many:10s} {rel:48s} max |param diff| vs {one}: {d:.3g}  {'OK' if d <= 1e-4 else 'FAIL'}")
sys.exit(1 if bad else 0)
PY
grep -h "device\|cuda" "$OUT"/ppo_1.log | head -n 3 || true

refused() {  # refused NAME LAUNCHER... -- RECIPE: must stop with a clear message, not run replicated
  local name=$1; shift
  local launcher=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done
  echo "== $name (expected: refused)"
  if "${launcher[@]}" -m ankus.cli train "$2" run.out_dir="$OUT" run.name="$name" run.progress=false \
       > "$OUT/$name.log" 2>&1; then
    echo "   UNEXPECTED: it ran"; FAILED+=("$name")
  else
    grep -m1 -o "does not shard it\|No module named 'deepspeed'\|DeepSpeed is not installed" "$OUT/$name.log" \
      | sed 's/^/   refused: /' || { tail -n 20 "$OUT/$name.log"; FAILED+=("$name"); }
  fi
}
refused ilql_fsdp "${FSDP[@]}" -- recipes/ilql_randomwalks.yaml
refused zero2 "${ACCEL[@]}" --config_file configs/accelerate/deepspeed_zero2.yaml -- recipes/sft_tiny.yaml
echo "runs in $OUT"
if (( ${#FAILED[@]} )); then echo "FAILED: ${FAILED[*]}"; exit 1; fi
echo "all GPU smoke checks passed"
