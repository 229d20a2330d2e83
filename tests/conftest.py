from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; the evaluation tests need ../shared/data")
    return SHARED_DATA


def tiny_trace(tokens: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2, seed: int = 0) -> torch.Tensor:
    """[T, L, k] distinct experts per token, skewed towards low ids."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, experts + 1).float()
    out = torch.empty(tokens, layers, top_k, dtype=torch.int64)
    for layer in range(layers):
        out[:, layer] = torch.multinomial(weights.expand(tokens, -1), top_k, generator=gen)
    return out

# Same defaults as scripts/env.sh, for a bare `pytest` too; spawned ranks inherit them.
import os  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
