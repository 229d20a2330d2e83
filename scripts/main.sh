#!/usr/bin/env bash
# The main job: set up, profile a MoE model on held-out text, plan with GRACE, then serve a fixed batch
# of prompts (prefill + greedy decode) on emulated nodes, once in DeepSpeed's native (contiguous)
# layout and once with GRACE, and report (table, PNG plots, Weights & Biases offline run).
#
#   bash scripts/main.sh [--model DIR] [--data TEXT] [--nodes N] [--gpus-per-node G]
# Defaults: the embedded OLMoE-architecture model, the standard library's held-out sources, 2 x 2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
MODEL="$ROOT/grace_ds/default_model" DATA="" NODES=2 GPUS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    *) echo "main.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
OUT="$ROOT/outputs"
mkdir -p "$OUT"
if [ -z "$DATA" ]; then
  DATA="$OUT/heldout.txt"
  python -c "from grace_ds.corpus import write_heldout_text; write_heldout_text('$DATA')"
fi
echo "== 1. profile $(basename "$MODEL") on $(basename "$DATA")"
grace-ds profile --model "$MODEL" --data "$DATA" --max-tokens 65536 --sequence-length 128 --out "$OUT/profile.safetensors"
echo "== 2. plan for $NODES nodes x $GPUS GPUs: GRACE, and DeepSpeed's contiguous layout"
grace-ds plan --profile "$OUT/profile.safetensors" --nodes "$NODES" --gpus-per-node "$GPUS" --policy grace --out "$OUT/plan_grace.json"
grace-ds plan --profile "$OUT/profile.safetensors" --nodes "$NODES" --gpus-per-node "$GPUS" --policy contiguous \
  --replica-slots 0 --out "$OUT/plan_native.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open("configs/ds_demo.json"))
for label, comm in (("grace", "auto"), ("native", "flat")):
    config = dict(base, grace_moe=dict(base["grace_moe"], plan=f"{out}/plan_{label}.json", communication=comm))
    json.dump(config, open(f"{out}/ds_{label}.json", "w"), indent=1)
PY
for label in native grace; do
  echo "== 3. serve with the $label layout on $NODES x $GPUS emulated ranks"
  rm -f "$OUT/$label.json"
  bash scripts/launch.sh --emulate-nodes "$NODES" --num-gpus "$GPUS" -- scripts/serve.py --model "$MODEL" \
    --config "$OUT/ds_$label.json" --prompts-file "$DATA" --sequence-length 128 --sequences-per-rank 4 \
    --new-tokens 8 --check --report "$OUT/$label.json" --label "$label" 2>&1 | grep -E "GRACE_SERVE|error" || true
  [ -f "$OUT/$label.json" ] || { echo "main.sh: the $label run wrote no report" >&2; exit 1; }
done
echo "== 4. report"
python -m grace_ds.report --native "$OUT/native.json" --grace "$OUT/grace.json" --profile "$OUT/profile.safetensors" \
  --plan "$OUT/plan_grace.json" --ds-config configs/ds_demo.json --out "$OUT"
