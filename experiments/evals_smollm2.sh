#!/usr/bin/env bash
# The evaluation suite on SmolLM2-135M-Instruct, with and without its chat template.
# Sizes fit ~15 min on one idle CPU core (OMP_NUM_THREADS=1); the full sets are the defaults of
# each `ankus eval` command. Writes runs/evals_smollm2/{chat,plain}/<task>/ and
# runs/evals_smollm2/results.md + results.csv (all tables, one block per task).
# Usage: experiments/evals_smollm2.sh [OUT_DIR]
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=${1:-runs/evals_smollm2}
ANKUS=${ANKUS:-ankus}
MODEL=smollm2-135m-instruct
start=$(date +%s)
for mode in plain chat; do
  flag=""; [ "$mode" = chat ] && flag="--chat-template"
  d="$OUT/$mode"
  $ANKUS eval implicature --model $MODEL $flag --templates 0,1,2,3 --shots 0,1,5 --limit 48 --out "$d/implicature"
  $ANKUS eval goal-reach --model $MODEL $flag --limit 12 --out "$d/goal-reach"
  $ANKUS eval pink-elephants --model $MODEL $flag --limit 24 --guidance-scale 1,3 --max-new-tokens 32 --out "$d/pink-elephants"
  $ANKUS eval adherence --model $MODEL $flag --guidance-scale 1,3 --max-new-tokens 32 --out "$d/adherence"
done
if python -c "import lm_eval" 2>/dev/null; then
  $ANKUS eval harness --model $MODEL --tasks ankus_implicature --limit 48 --out "$OUT/plain/harness"
fi
python - "$OUT" <<'PY'
import csv, pathlib, sys
out = pathlib.Path(sys.argv[1])
md, rows = [], []
for table in sorted(out.glob("*/*/table.md")):
    md.append(table.read_text())
    for r in csv.DictReader(open(table.with_suffix(".csv"))):
        rows.append({"task": table.parent.name, "mode": table.parent.parent.name, **r})
(out / "results.md").write_text("\n".join(md))
cols = list(dict.fromkeys(k for r in rows for k in r))
with open(out / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols); w.writeheader(); w.writerows(rows)
print(f"wrote {out / 'results.md'} and results.csv")
PY
echo "wall: $(( $(date +%s) - start )) s"
