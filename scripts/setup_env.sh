#!/usr/bin/env bash
# Creates (or reuses) the project-local virtual environment .venv with the pinned, tested set.
# Usage: source scripts/setup_env.sh   (or bash it; it is idempotent)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.grace_ds_installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ] || [ "${BASH_SOURCE[0]}" -nt "$STAMP" ]; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
  DS_BUILD_OPS=0 "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
    | grep -v "is ignored" || true
  # Test-only: megatron-core 0.19.x declares Python >= 3.12; here (3.11) it goes in without its declared
  # dependencies, with triton (which `import megatron.core` needs; it imports fine without a GPU).
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python \
    triton==3.6.0 megatron-core==0.19.2 2>&1 | grep -v "is ignored" || true
  "$ROOT/.venv/bin/python" -c "import grace_ds, torch, deepspeed, transformers, sklearn, kneed, hypothesis, megatron.core" \
    || { echo "setup_env: installation failed" >&2; exit 1; }
  touch "$STAMP"
fi
