"""Safetensors + JSON-metadata files, written atomically, read with one clear error per problem."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grace_ds.errors import GraceInputError

METADATA_KEY = "grace_ds"


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and our JSON metadata from a safetensors file; GraceInputError names the file."""
    path = Path(path)
    if not path.is_file():
        raise GraceInputError(f"{path}: no such {what} file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise GraceInputError(f"{path}: not a readable safetensors {what} file ({error})") from None
    text = raw.get(METADATA_KEY)
    if text is None:
        return tensors, {"_foreign": raw}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise GraceInputError(f"{path}: metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise GraceInputError(f"{path}: metadata must be a JSON object")
    return tensors, meta


def read_json(path: str | os.PathLike, what: str) -> object:
    path = Path(path)
    if not path.is_file():
        raise GraceInputError(f"{path}: no such {what} file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GraceInputError(f"{path}: not valid JSON ({error})") from None
