#!/usr/bin/env bash
# The main job: set up, then profile -> plan -> simulate on the shared OLMoE trace, and compare policies.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
source "$ROOT/scripts/env.sh"
DATA="${GRACE_SHARED:-$ROOT/../shared}/data/routing"
TRACE="${1:-$DATA/olmoe_arxiv.safetensors}"
OUT="$ROOT/outputs"
mkdir -p "$OUT"
echo "== profile the first half of $(basename "$TRACE")"
grace-ds profile-trace "$TRACE" --tokens :32768 --out "$OUT/profile.safetensors"
echo "== plan with grace for 2 nodes x 2 GPUs, one replica slot per GPU"
grace-ds plan --profile "$OUT/profile.safetensors" --nodes 2 --gpus-per-node 2 --policy grace --out "$OUT/plan.json"
echo "== replay the second half under the plan"
grace-ds simulate --plan "$OUT/plan.json" --trace "$TRACE" --tokens 32768: --router tar
echo "== every policy, plan on the first half, replay the second (ratios against DeepSpeed's contiguous layout)"
grace-ds evaluate --trace "$TRACE" --nodes-list 2 --gpus-list 2,4 --json-out "$OUT/evaluate.json"
