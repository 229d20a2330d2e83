# Environment shared by the main job and the tests (sourced, not run).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1
# DeepSpeed's CPU accelerator where there is no GPU (it would otherwise guess, with a warning).
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed JIT-builds a small C++ op at its first init_distributed: keep the build in the project.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
