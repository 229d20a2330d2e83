#!/usr/bin/env bash
# On the GPU test machine, in one call: install the carried wheels (.whl), then run the GPU benchmark
# on every GPU as 2 logical nodes (NCCL_HOSTID) with the traces carried in .bench_data (see
# docs/benchmarks.md for how both are prepared), then one GPU's expert work alone (fused permute/unpermute
# against the per-row path). Results land in $OUT (or bench-out/); arguments go to bench_gpu.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$ROOT" PATH="/tmp/site/bin:$PATH"
mkdir -p "${OUT:-bench-out}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 scripts/bench_gpu.py --traces .bench_data --out "${OUT:-bench-out}" "$@" 2>&1 | tee "${OUT:-bench-out}/bench_gpu.log"
python3 scripts/bench_expert_compute.py --traces .bench_data --out "${OUT:-bench-out}" 2>&1 \
  | tee "${OUT:-bench-out}/expert_compute.log"
