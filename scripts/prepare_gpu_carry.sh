#!/usr/bin/env bash
# Here (CPU), before a GPU call: fills the two git-ignored folders a GPU run carries.
#   .whl/         wheels the GPU image lacks (deepspeed is built here: it has no wheel on the registry)
#   .bench_data/  the routing traces to replay: ../shared/data/routing's OLMoE traces (the device gets
#                 only the repository) and the embedded model's routing on held-out text
# Then: device run `bash scripts/bench_gpu.sh` (or scripts/gpu_exactness.sh) with carry [".whl", ".bench_data"].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
for d in .whl .bench_data; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
mkdir -p .whl .bench_data
if [ ! -f .whl/deepspeed-0.19.8-py3-none-any.whl ]; then
  DS_BUILD_OPS=0 python -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
fi
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  hjson==3.1.0 kneed==0.9.0 transformers==5.24.0 tokenizers==0.23.3 megatron-core==0.19.2 accelerate==1.15.0
cp ../shared/data/routing/olmoe_*.safetensors .bench_data/
python -c "from grace_ds.examples.corpus import write_heldout_text; write_heldout_text('.bench_data/heldout.txt')"
grace-ds profile --model grace_ds/examples/default_model --data .bench_data/heldout.txt --max-tokens 65536 \
  --out .bench_data/embedded_profile.safetensors --trace-out .bench_data/embedded_heldout.safetensors
rm .bench_data/heldout.txt .bench_data/embedded_profile.safetensors
du -sh .whl .bench_data
