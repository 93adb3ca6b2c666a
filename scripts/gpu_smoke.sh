#!/usr/bin/env bash
# Multi-process smoke runs of SFT, DPO and PPO launched with Accelerate on a GPU machine,
# plus a check that the FSDP and DeepSpeed configurations are refused, not silently run replicated.
#
#   bash scripts/gpu_smoke.sh            # PYTHON=... to pick the interpreter; NPROC=... processes (default 2)
#
# What it shows: `accelerate launch` starts NPROC processes that join one process group
# (cpu:gloo,cuda:nccl), train, and write one run directory. It also shows that 2 processes train
# like 1 process with the global batch (the same check as tests/invariants/test_distributed.py,
# under this launcher). The trainers keep the model on the CPU for now, so the GPUs only host the
# process group. FSDP and DeepSpeed sharding are not wired into the trainers yet, see
# docs/distributed.md. The FSDP/DeepSpeed steps therefore only check that launching with them
# stops with a clear message. When the trainers support sharding, turn those steps into real runs.
# Not yet run: no GPU was at hand when it was written.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-2}
OUT=${OUT:-$(mktemp -d /tmp/ankus-gpu-smoke-XXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
LAUNCH=("$PYTHON" -m accelerate.commands.launch)

"$PYTHON" - <<'PY'
import torch, accelerate, transformers
print(f"torch {torch.__version__}  accelerate {accelerate.__version__}  transformers {transformers.__version__}")
print("cuda:", torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY

ddp() {  # ddp NAME RECIPE OVERRIDES...
  local name=$1 recipe=$2; shift 2
  echo "== DDP x$NPROC: $name"
  /usr/bin/time -f "   %e s" "${LAUNCH[@]}" --config_file configs/accelerate/ddp_multigpu.yaml --num_processes "$NPROC" \
    -m ankus.cli train "$recipe" run.out_dir="$OUT" run.name="$name" run.progress=false "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -n 40 "$OUT/$name.log"; exit 1; }
}
one() {  # one NAME RECIPE OVERRIDES...: the same run in one process
  local name=$1 recipe=$2; shift 2
  echo "== 1 process: $name"
  "$PYTHON" -m ankus.cli train "$recipe" run.out_dir="$OUT" run.name="$name" run.progress=false "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -n 40 "$OUT/$name.log"; exit 1; }
}

# SFT (full fine-tune, packed batches) and DPO: NPROC x batch 4 vs 1 x batch 4*NPROC
ddp sft_n recipes/sft_tiny.yaml method.lora=false trainer.batch_size=4
one sft_1 recipes/sft_tiny.yaml method.lora=false trainer.batch_size=$((4 * NPROC))
ddp dpo_n recipes/dpo_tiny.yaml trainer.batch_size=4 trainer.total_steps=4
one dpo_1 recipes/dpo_tiny.yaml trainer.batch_size=$((4 * NPROC)) trainer.total_steps=4
# PPO on a tiny model with the Hydra reference: NPROC x 4 rollouts vs 1 x 4*NPROC
PPO=(model.spec=tiny-llama trainer.total_steps=2 trainer.checkpoint_every=2 method.chunk_size=4 method.ppo_epochs=2
     generation.max_new_tokens=8 data.num_eval=2 method.num_layers_unfrozen=2)
ddp ppo_n ppo_sentiment "${PPO[@]}" method.num_rollouts=4 trainer.batch_size=2
one ppo_1 ppo_sentiment "${PPO[@]}" method.num_rollouts=$((4 * NPROC)) trainer.batch_size=$((2 * NPROC))

"$PYTHON" - "$OUT" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
def diff(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)
for name, rel in [("sft", "model/model.safetensors"), ("dpo", "model/model.safetensors"),
                  ("ppo", "checkpoints/step-00000002/policy.safetensors"),
                  ("ppo", "checkpoints/step-00000002/value_head.safetensors")]:
    d = diff(out / f"{name}_1" / rel, out / f"{name}_n" / rel)
    print(f"{name:4s} {rel:48s} max |param diff| N processes vs 1: {d:.3g}  {'OK' if d <= 1e-5 else 'FAIL'}")
PY

# sharding configurations: must stop with a clear message, not run replicated
for cfg in fsdp deepspeed_zero2 deepspeed_zero3; do
  echo "== $cfg (expected: refused)"
  if "${LAUNCH[@]}" --config_file "configs/accelerate/$cfg.yaml" --num_processes "$NPROC" -m ankus.cli train \
       recipes/sft_tiny.yaml run.out_dir="$OUT" run.name="$cfg" run.progress=false > "$OUT/$cfg.log" 2>&1; then
    echo "   UNEXPECTED: it ran"; exit 1
  fi
  grep -o "do not shard it yet\|No module named 'deepspeed'" "$OUT/$cfg.log" | head -n 1 | sed 's/^/   refused: /' \
    || { tail -n 20 "$OUT/$cfg.log"; exit 1; }
done
echo "runs in $OUT"
