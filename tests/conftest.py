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


@pytest.fixture(scope="session", autouse=True)
def _remove_leftover_deepspeed_buffers():
    """DeepSpeed's CPU all-reduce leaves its shared-memory buffers in /dev/shm when its ranks end; a suite
    run leaves dozens, which fill the machine's memory over repeated runs. Removed at the end: those made
    during the session, whose ranks have all exited by then."""
    import time

    started = time.time()
    yield
    for buffer in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if buffer.stat().st_mtime >= started - 1:
                buffer.unlink()
        except OSError:  # another job's, gone or not ours to remove
            pass


# Subprocess timeouts in the tests only stop a hung run, never judge speed: on this 2-core machine a
# loaded host ran 30x slower than a quiet one (the main job's profiling stage: 6 s quiet, 177 s at a load
# average of 11), so the guard is far beyond any run that is merely slow, yet one hang still leaves CI
# (90 min for the whole suite) time to report it.
HANG_GUARD_S = 1500
