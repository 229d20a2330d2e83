"""Text every machine with Python has: the standard library's own sources. Files are split into a
training part and a held-out part (every tenth file) so profiles and perplexity use unseen text."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def stdlib_bytes(part: str) -> torch.Tensor:
    """[N] uint8 -> int64 byte ids of the 'train' or 'heldout' part."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    chosen = [f for i, f in enumerate(stdlib_files()) if (i % 10 == 0) == (part == "heldout")]
    data = b"\n".join(f.read_bytes() for f in chosen)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def write_heldout_text(path: str | Path) -> Path:
    """The held-out part as a text file (for `grace-ds profile --data`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(stdlib_bytes("heldout").to(torch.uint8).tolist()))
    return path
