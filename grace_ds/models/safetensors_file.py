"""Reading single tensors, or rows of one, from a safetensors file by plain reads at their offsets.

safetensors' own reader maps the whole file: every page a read touches then counts in the process's resident
memory until the file is closed, beside the copy made of it, so a rank reading its share of a checkpoint
would peak near twice that share. Here each read copies just its bytes into a fresh tensor (the kernel's page
cache, which is not the process's, holds the rest). The format: 8 bytes of little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}} (offsets past the header), then the data.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from grace_ds.errors import GraceInputError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER_BYTES = 100 * 2 ** 20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file: dtype, shape, and its first byte (from the file's start)."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dimension."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class SafetensorsFile:
    """One safetensors file, opened for reading: `entries` from its header; `read(name)` and
    `read_rows(name, start, stop)` return new CPU tensors holding just those bytes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._handle = open(self.path, "rb")
        except OSError as error:
            raise GraceInputError(f"{self.path}: cannot open ({error.strerror})") from None
        try:
            self.entries = self._read_header()
        except BaseException:
            self._handle.close()
            raise

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def _read_header(self) -> dict[str, TensorEntry]:
        size = os.fstat(self._handle.fileno()).st_size
        head = self._handle.read(8)
        if len(head) < 8:
            raise GraceInputError(f"{self.path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise GraceInputError(f"{self.path}: not a safetensors file (header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(self._handle.read(length))
            entries = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = (int(x) for x in info["data_offsets"])
                if info["dtype"] not in DTYPES:
                    raise GraceInputError(f"{self.path}: tensor {name} has dtype {info['dtype']}, which is not read")
                entry = TensorEntry(DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"]), 8 + length + begin)
                if end - begin != entry.nbytes or entry.offset + entry.nbytes > size:
                    raise GraceInputError(f"{self.path}: tensor {name}'s bytes do not fit its shape or the file")
                entries[name] = entry
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise GraceInputError(f"{self.path}: broken safetensors header ({error.__class__.__name__}: {error})") from None
        return entries

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return self._read_at(entry.offset, entry.nbytes, entry.dtype, entry.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 along the first dimension (contiguous in the file)."""
        entry = self.entries[name]
        if not 0 <= start <= stop <= entry.shape[0]:
            raise GraceInputError(f"{self.path}: rows {start}:{stop} of {name} {list(entry.shape)}")
        return self._read_at(entry.offset + start * entry.row_bytes, (stop - start) * entry.row_bytes, entry.dtype,
                             (stop - start, *entry.shape[1:]))

    def _read_at(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        buffer = out.view(-1).view(torch.uint8).numpy() if nbytes else b""
        done = 0
        while done < nbytes:  # os.preadv may return short reads (large ones, signals)
            try:
                got = os.preadv(self._handle.fileno(), [memoryview(buffer)[done:]], offset + done)
            except OSError as error:
                raise GraceInputError(f"{self.path}: cannot read ({error.strerror})") from None
            if got <= 0:
                raise GraceInputError(f"{self.path}: ended {nbytes - done} bytes early")
            done += got
        return out
