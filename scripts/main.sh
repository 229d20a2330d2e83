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
MODEL="$ROOT/grace_ds/examples/default_model" DATA="" NODES=2 GPUS=2
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
BEGAN=$SECONDS
# stage NAME LOG COMMAND...: one line per stage with its elapsed seconds; the command's output goes to LOG.
# On failure: each distinct error line once (ranks repeat theirs, and DeepSpeed's launchers stamp theirs),
# then where the whole output is.
stage() {
  local name="$1" log="$2" began=$SECONDS
  shift 2
  printf '%-14s' "$name"
  if "$@" > "$log" 2>&1; then
    echo "$((SECONDS - began)) s"
    return
  fi
  echo "failed after $((SECONDS - began)) s"
  grep -iE "error|exception|killed" "$log" | sed -E 's/^\[[0-9-]+ [0-9:,.]+\] //; s/^\[rank[0-9]+\]:? ?//' \
    | awk '!seen[$0]++' | tail -n 15 >&2 || true
  echo "main.sh: $name failed; its whole output is in $log" >&2
  exit 1
}
if [ -z "$DATA" ]; then
  DATA="$OUT/heldout.txt"
  python -c "from grace_ds.examples.corpus import write_heldout_text; write_heldout_text('$DATA')"
fi
echo "main job: $(basename "$MODEL") on $(basename "$DATA"), $NODES nodes x $GPUS GPUs emulated; logs in outputs/"
stage "profile" "$OUT/profile.log" grace-ds profile --model "$MODEL" --data "$DATA" --max-tokens 65536 \
  --sequence-length 128 --out "$OUT/profile.safetensors"
plan_both() {  # GRACE, and DeepSpeed's contiguous layout (no replicas), each with the DeepSpeed JSON serving it
  grace-ds plan --profile "$OUT/profile.safetensors" --nodes "$NODES" --gpus-per-node "$GPUS" --policy grace \
    --out "$OUT/plan_grace.json" || return
  grace-ds plan --profile "$OUT/profile.safetensors" --nodes "$NODES" --gpus-per-node "$GPUS" --policy contiguous \
    --replica-slots 0 --out "$OUT/plan_native.json" || return
  python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open("configs/ds_demo.json"))
for label, comm in (("grace", "auto"), ("native", "flat")):
    config = dict(base, grace_moe=dict(base["grace_moe"], plan=f"{out}/plan_{label}.json", communication=comm))
    json.dump(config, open(f"{out}/ds_{label}.json", "w"), indent=1)
PY
}
stage "plan" "$OUT/plan.log" plan_both
serve() {  # serve LABEL: every rank's output into the stage's log; rank 0 writes outputs/LABEL.json
  rm -f "$OUT/$1.json"
  bash scripts/launch.sh --emulate-nodes "$NODES" --num-gpus "$GPUS" -- scripts/serve.py --model "$MODEL" \
    --config "$OUT/ds_$1.json" --prompts-file "$DATA" --sequence-length 128 --sequences-per-rank 4 \
    --new-tokens 8 --check --report "$OUT/$1.json" --label "$1" || return
  [ -f "$OUT/$1.json" ] || { echo "main.sh: error: the $1 run wrote no report"; return 1; }
}
stage "serve native" "$OUT/serve_native.log" serve native
stage "serve GRACE" "$OUT/serve_grace.log" serve grace
began=$SECONDS
python -m grace_ds.examples.report --native "$OUT/native.json" --grace "$OUT/grace.json" --profile "$OUT/profile.safetensors" \
  --plan "$OUT/plan_grace.json" --ds-config configs/ds_demo.json --out "$OUT" 2> "$OUT/report.log" \
  || { cat "$OUT/report.log" >&2; exit 1; }
printf '%-14s%s\n' "report" "$((SECONDS - began)) s (table above; plots and report.md in outputs/)"
echo "main job: $((SECONDS - BEGAN)) s"
