"""Per-token routing traces: topk_ids [T, L, k] as recorded from a model (or published statistics)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grace_ds.errors import GraceInputError
from grace_ds.files import load_tensors, save_tensors


@dataclass
class RoutingTrace:
    """topk_ids [T, L, k] int64 logical expert ids; layer_names [L]."""

    topk_ids: torch.Tensor
    num_experts: int
    layer_names: list[str]
    model_name: str = "unknown"

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    def tokens(self, token_range: slice) -> "RoutingTrace":
        picked = self.topk_ids[token_range]
        if picked.shape[0] == 0:
            raise GraceInputError(f"token range {token_range.start}:{token_range.stop} selects no token "
                                  f"of a {self.num_tokens}-token trace")
        return RoutingTrace(picked, self.num_experts, self.layer_names, self.model_name)

    def save(self, path: str | Path) -> None:
        save_tensors(path, {"topk_ids": self.topk_ids.to(torch.int16 if self.num_experts < 2**15 else torch.int32)},
                     {"format": "grace_ds.routing_trace", "version": 1, "num_experts": self.num_experts,
                      "layer_names": self.layer_names, "model_name": self.model_name})

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        """Reads our traces and the shared-data layout (string metadata num_experts, layers)."""
        tensors, meta = load_tensors(path, "routing trace")
        if "topk_ids" not in tensors:
            raise GraceInputError(f"{path}: tensor 'topk_ids' is missing")
        topk_ids = tensors["topk_ids"]
        if topk_ids.dim() != 3 or topk_ids.is_floating_point() or topk_ids.shape[0] < 1:
            raise GraceInputError(f"{path}: topk_ids must be an integer [tokens, layers, k] tensor, "
                                  f"got {tuple(topk_ids.shape)} {topk_ids.dtype}")
        topk_ids = topk_ids.long()
        foreign = meta.get("_foreign")
        if foreign is not None:  # shared-data traces: plain string metadata
            try:
                num_experts = int(foreign.get("num_experts", int(topk_ids.max()) + 1))
            except ValueError:
                raise GraceInputError(f"{path}: metadata num_experts is not an integer") from None
            layer_ids = tensors.get("layer_ids")
            names = ([f"layer_{int(i)}" for i in layer_ids] if layer_ids is not None
                     else [f"layer_{i}" for i in range(topk_ids.shape[1])])
            model = Path(path).stem
        else:
            num_experts, names, model = meta.get("num_experts"), meta.get("layer_names"), meta.get("model_name", "unknown")
            if not isinstance(num_experts, int) or not isinstance(names, list):
                raise GraceInputError(f"{path}: metadata needs integer 'num_experts' and list 'layer_names'")
        if len(names) != topk_ids.shape[1]:
            raise GraceInputError(f"{path}: {len(names)} layer names for {topk_ids.shape[1]} layers")
        if topk_ids.min() < 0 or topk_ids.max() >= num_experts:
            raise GraceInputError(f"{path}: topk_ids holds expert ids outside [0, {num_experts})")
        return cls(topk_ids, num_experts, [str(n) for n in names], str(model))


def parse_token_range(text: str | None) -> slice:
    """'A:B' token range (either side may be empty, as in Python slicing) -> slice."""
    if text is None:
        return slice(None)
    parts = text.split(":")
    if len(parts) != 2:
        raise GraceInputError(f"--tokens must look like A:B, got {text!r}")
    try:
        bounds = [int(p) if p else None for p in parts]
    except ValueError:
        raise GraceInputError(f"--tokens must look like A:B with integers, got {text!r}") from None
    return slice(*bounds)
