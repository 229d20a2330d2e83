#!/usr/bin/env bash
# On the GPU test machine, in one call: install the carried wheels (.whl, see docs/gpu-runs.md), then run the
# exactness tests over NCCL, one GPU a rank, logical nodes told apart by NCCL_HOSTID, and the
# deepspeed-launcher run with emulated nodes (arguments: test files to run instead of all of them). Writes
# the pytest log under $OUT when set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export DS_ACCELERATOR=cuda GRACE_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$ROOT" PATH="/tmp/site/bin:$PATH"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
case "$GPUS" in
  1) export GRACE_TEST_LAYOUTS="1x1" ;;
  2|3) export GRACE_TEST_LAYOUTS="1x1,1x2,2x1" GRACE_TEST_LAUNCH_GPUS_PER_NODE=1 ;;
  *) export GRACE_TEST_LAYOUTS="1x1,1x2,1x4,2x2" GRACE_TEST_LAUNCH_GPUS_PER_NODE=2 ;;
esac
echo "GPUs: $GPUS, layouts (nodes x GPUs per node): $GRACE_TEST_LAYOUTS"
python3 -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
tests=(tests/test_runtime_exactness.py tests/test_megatron.py tests/test_online_replanning.py tests/test_export.py
       tests/test_checkpoint_one_rank.py tests/test_transformers_trainer.py
       tests/test_megatron_one_rank.py)
[ "$GPUS" -ge 2 ] && tests+=(tests/test_launch.py)
[ "$GPUS" -ge 4 ] && tests+=(tests/test_training.py tests/test_checkpoint_layout.py)  # 4 ranks as 2 x 2, fixed
[ $# -gt 0 ] && tests=("$@")  # a subset, e.g. one test file
set -o pipefail
python3 -m pytest -p no:cacheprovider -v "${tests[@]}" 2>&1 | tee "${OUT:-/tmp}/gpu_exactness.log"
