"""RoutingProfile: per MoE layer, how many tokens each expert got and which experts fire together."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from grace_ds.errors import GraceInputError
from grace_ds.files import load_tensors, read_json, save_tensors

PROFILE_FORMAT = "grace_ds.routing_profile"
PROFILE_VERSION = 1
# Token routings kept verbatim so a planner can score candidate plans on real top-k sets.
DEFAULT_SAMPLE_TOKENS = 8192


@dataclass
class RoutingProfile:
    """Routing statistics of L MoE layers with E experts each.

    expert_load [L, E] float64: (token, expert) pairs routed to each expert.
    coactivation [L, E, E] float64 or None: tokens whose top-k holds both experts; symmetric, zero diagonal.
    num_tokens [L] int64: tokens seen per layer.
    sample_topk_ids [S, L, k] int64 or None: a sample of whole top-k sets (first S tokens seen).
    """

    expert_load: torch.Tensor
    coactivation: torch.Tensor | None
    num_tokens: torch.Tensor
    top_k: int
    model_name: str = "unknown"
    layer_names: list[str] = field(default_factory=list)
    sample_topk_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.layer_names:
            self.layer_names = [f"layer_{i}" for i in range(self.expert_load.shape[0])]
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.expert_load.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.expert_load.shape[1])

    def validate(self, source: str = "routing profile") -> None:
        load = self.expert_load
        if load.dim() != 2 or load.shape[0] < 1 or load.shape[1] < 1:
            raise GraceInputError(f"{source}: expert_load must be [layers, experts], got {tuple(load.shape)}")
        num_layers, num_experts = load.shape
        if not torch.isfinite(load).all() or (load < 0).any():
            raise GraceInputError(f"{source}: expert_load has NaN, infinite or negative entries")
        empty = (load.sum(1) <= 0).nonzero().flatten().tolist()
        if empty:
            names = [self.layer_names[i] if i < len(self.layer_names) else str(i) for i in empty]
            raise GraceInputError(f"{source}: expert_load is all zero in layers {names}")
        if not 1 <= self.top_k <= num_experts:
            raise GraceInputError(f"{source}: top_k={self.top_k} must lie in [1, {num_experts}]")
        if tuple(self.num_tokens.shape) != (num_layers,) or (self.num_tokens < 1).any():
            raise GraceInputError(f"{source}: num_tokens must be [{num_layers}] positive counts")
        # A token picks an expert at most once and at most top_k experts in all.
        tokens = self.num_tokens.to(torch.float64)
        if (load.max(1).values > tokens * (1 + 1e-9)).any() or (load.sum(1) > tokens * self.top_k * (1 + 1e-9)).any():
            raise GraceInputError(f"{source}: expert_load exceeds what num_tokens x top_k allows")
        if len(self.layer_names) != num_layers:
            raise GraceInputError(f"{source}: {len(self.layer_names)} layer names for {num_layers} layers")
        if self.coactivation is not None:
            co = self.coactivation
            if tuple(co.shape) != (num_layers, num_experts, num_experts):
                raise GraceInputError(
                    f"{source}: coactivation must be [{num_layers}, {num_experts}, {num_experts}], got {tuple(co.shape)}")
            if not torch.isfinite(co).all() or (co < 0).any():
                raise GraceInputError(f"{source}: coactivation has NaN, infinite or negative entries")
            if not torch.allclose(co, co.transpose(1, 2)) or torch.diagonal(co, dim1=1, dim2=2).abs().sum() > 0:
                raise GraceInputError(f"{source}: coactivation must be symmetric with a zero diagonal")
        if self.sample_topk_ids is not None:
            sample = self.sample_topk_ids
            if sample.dim() != 3 or sample.shape[1:] != (num_layers, self.top_k):
                raise GraceInputError(
                    f"{source}: sample_topk_ids must be [S, {num_layers}, {self.top_k}], got {tuple(sample.shape)}")
            if sample.numel() and (sample.min() < 0 or sample.max() >= num_experts):
                raise GraceInputError(f"{source}: sample_topk_ids holds expert ids outside [0, {num_experts})")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_topk_ids(cls, topk_ids: torch.Tensor, num_experts: int, model_name: str = "unknown",
                      layer_names: list[str] | None = None, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
                      chunk_tokens: int = 16384) -> "RoutingProfile":
        """Profile from a per-token trace topk_ids [T, L, k] of logical expert ids."""
        if topk_ids.dim() != 3 or topk_ids.shape[0] < 1:
            raise GraceInputError(f"trace: topk_ids must be [tokens, layers, k] with tokens >= 1, got {tuple(topk_ids.shape)}")
        ids = topk_ids.long()
        if ids.min() < 0 or ids.max() >= num_experts:
            raise GraceInputError(f"trace: expert ids must lie in [0, {num_experts})")
        num_tokens, num_layers, top_k = ids.shape
        if top_k > 1:
            picked_twice = (ids.sort(-1).values.diff(dim=-1) == 0).any()
            if picked_twice:
                raise GraceInputError("trace: a token lists the same expert twice in one layer's top-k")
        load = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        coactivation = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64)
        for start in range(0, num_tokens, chunk_tokens):
            chunk = ids[start:start + chunk_tokens]
            for layer in range(num_layers):
                hits = torch.zeros(chunk.shape[0], num_experts, dtype=torch.float32)
                hits.scatter_(1, chunk[:, layer], 1.0)
                load[layer] += hits.sum(0).double()
                coactivation[layer] += (hits.T @ hits).double()
        coactivation.diagonal(dim1=1, dim2=2).zero_()
        return cls(load, coactivation, torch.full((num_layers,), num_tokens, dtype=torch.int64), top_k,
                   model_name, list(layer_names or []), ids[:sample_tokens].clone())

    @classmethod
    def from_logical_counts(cls, path: str | Path, top_k: int, model_name: str | None = None) -> "RoutingProfile":
        """Load-only profile from a JSON {"logical_count": [layers][experts]} (SGLang/DeepSeek EPLB dump).

        All-zero layers (dense layers in DeepSeek-V3's dump) are left out; layer names keep their index.
        """
        data = read_json(path, "expert-load")
        counts = data.get("logical_count") if isinstance(data, dict) else None
        if not isinstance(counts, list) or not counts or not all(isinstance(row, list) for row in counts):
            raise GraceInputError(f"{path}: needs 'logical_count' as a list of per-layer lists")
        widths = {len(row) for row in counts}
        if len(widths) != 1:
            raise GraceInputError(f"{path}: logical_count rows have different lengths {sorted(widths)}")
        try:
            load = torch.tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError) as error:
            raise GraceInputError(f"{path}: logical_count holds non-numbers ({error})") from None
        if not torch.isfinite(load).all() or (load < 0).any():
            raise GraceInputError(f"{path}: logical_count has NaN, infinite or negative entries")
        keep = (load.sum(1) > 0).nonzero().flatten()
        if keep.numel() == 0:
            raise GraceInputError(f"{path}: logical_count is all zero")
        load = load[keep]
        num_tokens = torch.ceil(torch.maximum(load.sum(1) / top_k, load.max(1).values)).long()
        return cls(load, None, num_tokens, top_k, model_name or Path(path).stem,
                   [f"layer_{int(i)}" for i in keep])

    def select_layers(self, layers: list[int]) -> "RoutingProfile":
        return replace(self, expert_load=self.expert_load[layers],
                       coactivation=None if self.coactivation is None else self.coactivation[layers],
                       num_tokens=self.num_tokens[layers], layer_names=[self.layer_names[i] for i in layers],
                       sample_topk_ids=None if self.sample_topk_ids is None else self.sample_topk_ids[:, layers])

    # ---- merging and files -------------------------------------------------------------------
    def merge(self, other: "RoutingProfile", sample_tokens: int = DEFAULT_SAMPLE_TOKENS) -> "RoutingProfile":
        """Sum of two profiles of the same model (other files, other ranks)."""
        if (other.num_layers, other.num_experts, other.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise GraceInputError(
                f"cannot merge profiles of shape (layers, experts, top_k) {(self.num_layers, self.num_experts, self.top_k)}"
                f" and {(other.num_layers, other.num_experts, other.top_k)}")
        coactivation = None
        if self.coactivation is not None and other.coactivation is not None:
            coactivation = self.coactivation + other.coactivation
        samples = [s for s in (self.sample_topk_ids, other.sample_topk_ids) if s is not None]
        sample = torch.cat(samples)[:sample_tokens] if samples else None
        return RoutingProfile(self.expert_load + other.expert_load, coactivation, self.num_tokens + other.num_tokens,
                              self.top_k, self.model_name, list(self.layer_names), sample)

    def save(self, path: str | Path) -> None:
        tensors = {"expert_load": self.expert_load, "num_tokens": self.num_tokens}
        if self.coactivation is not None:
            tensors["coactivation"] = self.coactivation
        if self.sample_topk_ids is not None:
            tensors["sample_topk_ids"] = self.sample_topk_ids.to(torch.int32)
        save_tensors(path, tensors, {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "top_k": self.top_k,
                                     "model_name": self.model_name, "layer_names": self.layer_names})

    @classmethod
    def load(cls, path: str | Path) -> "RoutingProfile":
        tensors, meta = load_tensors(path, "routing profile")
        if meta.get("format") != PROFILE_FORMAT:
            raise GraceInputError(f"{path}: not a grace_ds routing profile (format={meta.get('format')!r})")
        if meta.get("version") != PROFILE_VERSION:
            raise GraceInputError(f"{path}: profile version {meta.get('version')!r} is not supported "
                                  f"(this grace_ds reads version {PROFILE_VERSION})")
        for name in ("expert_load", "num_tokens"):
            if name not in tensors:
                raise GraceInputError(f"{path}: tensor {name!r} is missing")
        if not isinstance(meta.get("top_k"), int) or not isinstance(meta.get("layer_names"), list):
            raise GraceInputError(f"{path}: metadata needs integer 'top_k' and list 'layer_names'")
        sample = tensors.get("sample_topk_ids")
        try:
            return cls(tensors["expert_load"].double(), tensors["coactivation"].double() if "coactivation" in tensors else None,
                       tensors["num_tokens"].long(), meta["top_k"], str(meta.get("model_name", "unknown")),
                       [str(n) for n in meta["layer_names"]], None if sample is None else sample.long())
        except GraceInputError as error:
            raise GraceInputError(f"{path}: {error}") from None
