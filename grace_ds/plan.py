"""PlacementPlan: per MoE layer, which logical expert each physical slot of each GPU holds.

The plan file (versioned JSON) is the one seam between the offline planner and the runtime.
Physical slot id = gpu * slots_per_gpu + slot; empty slots hold expert -1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grace_ds.errors import GraceInputError
from grace_ds.files import atomic_write_text, read_json
from grace_ds.topology import Topology

PLAN_FORMAT = "grace_ds.placement_plan"
PLAN_VERSION = 1


@dataclass
class PlacementPlan:
    """slot_expert [L, P, S] int64 (-1 empty); slot_is_primary [L, P, S] bool; slot_weight [L, P, S] float64
    (relative routing weight of a copy among the copies of its expert); predicted_gpu_load [L, P] float64
    ((token, expert) pairs each GPU is expected to compute)."""

    slot_expert: torch.Tensor
    slot_is_primary: torch.Tensor
    slot_weight: torch.Tensor
    predicted_gpu_load: torch.Tensor
    topology: Topology
    num_experts: int
    top_k: int
    policy: str
    layer_names: list[str]
    model_name: str = "unknown"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return int(self.slot_expert.shape[0])

    @property
    def num_gpus(self) -> int:
        return int(self.slot_expert.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return int(self.slot_expert.shape[2])

    def copies_per_expert(self) -> torch.Tensor:
        """[L, E] int64: number of physical copies of each logical expert."""
        flat = self.slot_expert.reshape(self.num_layers, -1)
        counts = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.int64)
        counts.scatter_add_(1, flat + 1, torch.ones_like(flat))
        return counts[:, 1:]

    def gpu_of_expert_primary(self) -> torch.Tensor:
        """[L, E] int64: the GPU holding each expert's primary copy."""
        layer, gpu, _ = torch.nonzero(self.slot_is_primary, as_tuple=True)
        experts = self.slot_expert[self.slot_is_primary]
        out = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.int64)
        out[layer, experts] = gpu
        return out

    def validate(self, source: str = "placement plan") -> None:
        shape = tuple(self.slot_expert.shape)
        if len(shape) != 3:
            raise GraceInputError(f"{source}: slot_expert must be [layers, gpus, slots], got {shape}")
        num_layers, num_gpus, _ = shape
        for name in ("slot_is_primary", "slot_weight"):
            if tuple(getattr(self, name).shape) != shape:
                raise GraceInputError(f"{source}: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if tuple(self.predicted_gpu_load.shape) != (num_layers, num_gpus):
            raise GraceInputError(f"{source}: predicted_gpu_load must be [{num_layers}, {num_gpus}]")
        if num_gpus != self.topology.num_gpus:
            raise GraceInputError(f"{source}: {num_gpus} GPUs in slots but topology has {self.topology.num_gpus}")
        if len(self.layer_names) != num_layers:
            raise GraceInputError(f"{source}: {len(self.layer_names)} layer names for {num_layers} layers")
        if not 1 <= self.top_k <= self.num_experts:
            raise GraceInputError(f"{source}: top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        experts = self.slot_expert
        if experts.min() < -1 or experts.max() >= self.num_experts:
            raise GraceInputError(f"{source}: slot experts must lie in [-1, {self.num_experts})")
        occupied = experts >= 0
        if (self.slot_is_primary & ~occupied).any():
            raise GraceInputError(f"{source}: an empty slot is marked primary")
        weights = self.slot_weight
        if not torch.isfinite(weights).all() or (weights < 0).any() or (weights[occupied] <= 0).any():
            raise GraceInputError(f"{source}: copy weights must be finite and > 0 for occupied slots")
        if not torch.isfinite(self.predicted_gpu_load).all() or (self.predicted_gpu_load < 0).any():
            raise GraceInputError(f"{source}: predicted_gpu_load must be finite and >= 0")
        copies = self.copies_per_expert()
        if (copies < 1).any():
            layer, expert = (copies < 1).nonzero()[0].tolist()
            raise GraceInputError(f"{source}: expert {expert} has no copy in layer {self.layer_names[layer]}")
        primaries = torch.zeros_like(copies)
        layer_idx = torch.arange(num_layers).view(-1, 1, 1).expand(shape)
        primaries.index_put_((layer_idx[self.slot_is_primary], experts[self.slot_is_primary]),
                             torch.ones(int(self.slot_is_primary.sum()), dtype=torch.int64), accumulate=True)
        if (primaries != 1).any():
            layer, expert = (primaries != 1).nonzero()[0].tolist()
            raise GraceInputError(f"{source}: expert {expert} in layer {self.layer_names[layer]} needs exactly one "
                                  f"primary copy, has {int(primaries[layer, expert])}")
        # Copies of one expert on distinct GPUs: a GPU never gains from holding an expert twice.
        per_gpu = torch.zeros(num_layers, num_gpus, self.num_experts + 1, dtype=torch.int64)
        per_gpu.scatter_add_(2, experts + 1, torch.ones_like(experts))
        if (per_gpu[:, :, 1:] > 1).any():
            layer, gpu, expert = (per_gpu[:, :, 1:] > 1).nonzero()[0].tolist()
            raise GraceInputError(f"{source}: GPU {gpu} holds expert {expert} twice in layer {self.layer_names[layer]}")

    def check_matches(self, num_experts: int, num_layers: int, top_k: int | None, topology: Topology | None,
                      source: str = "placement plan") -> None:
        """Refuse a plan made for another model or another job."""
        if self.num_experts != num_experts:
            raise GraceInputError(f"{source}: plan is for {self.num_experts} experts, the model has {num_experts}")
        if self.num_layers != num_layers:
            raise GraceInputError(f"{source}: plan has {self.num_layers} MoE layers, the model has {num_layers}")
        if top_k is not None and self.top_k != top_k:
            raise GraceInputError(f"{source}: plan is for top_k={self.top_k}, the model routes top_k={top_k}")
        if topology is not None and topology.gpus_per_node != self.topology.gpus_per_node:
            raise GraceInputError(f"{source}: plan is for {self.topology.describe()}, the job runs "
                                  f"{topology.describe()}")

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        layers = []
        for layer in range(self.num_layers):
            gpus = []
            for gpu in range(self.num_gpus):
                used = self.slot_expert[layer, gpu] >= 0
                gpus.append({"experts": self.slot_expert[layer, gpu][used].tolist(),
                             "primary": self.slot_is_primary[layer, gpu][used].tolist(),
                             "weights": [round(w, 9) for w in self.slot_weight[layer, gpu][used].tolist()]})
            layers.append({"name": self.layer_names[layer], "gpus": gpus,
                           "predicted_gpu_load": [round(x, 6) for x in self.predicted_gpu_load[layer].tolist()]})
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "policy": self.policy, "model_name": self.model_name,
                "num_experts": self.num_experts, "top_k": self.top_k, "slots_per_gpu": self.slots_per_gpu,
                "topology": self.topology.to_dict(), "options": self.options, "layers": layers}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: object, source: str = "placement plan") -> "PlacementPlan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise GraceInputError(f"{source}: not a grace_ds placement plan")
        if data.get("version") != PLAN_VERSION:
            raise GraceInputError(f"{source}: plan version {data.get('version')!r} is not supported "
                                  f"(this grace_ds reads version {PLAN_VERSION})")
        try:
            topology = Topology.from_dict(data["topology"], f"{source}: topology")
            num_experts, top_k, slots = int(data["num_experts"]), int(data["top_k"]), int(data["slots_per_gpu"])
            layers = data["layers"]
            if not isinstance(layers, list) or not layers:
                raise GraceInputError(f"{source}: 'layers' must be a non-empty list")
            shape = (len(layers), topology.num_gpus, slots)
            slot_expert = torch.full(shape, -1, dtype=torch.int64)
            primary = torch.zeros(shape, dtype=torch.bool)
            weight = torch.zeros(shape, dtype=torch.float64)
            load = torch.zeros(shape[:2], dtype=torch.float64)
            for li, layer in enumerate(layers):
                if len(layer["gpus"]) != topology.num_gpus:
                    raise GraceInputError(f"{source}: layer {li} lists {len(layer['gpus'])} GPUs, "
                                          f"topology has {topology.num_gpus}")
                for gi, gpu in enumerate(layer["gpus"]):
                    n = len(gpu["experts"])
                    if n > slots or len(gpu["primary"]) != n or len(gpu["weights"]) != n:
                        raise GraceInputError(f"{source}: layer {li} GPU {gi}: experts/primary/weights lengths "
                                              f"differ or exceed slots_per_gpu={slots}")
                    slot_expert[li, gi, :n] = torch.tensor(gpu["experts"], dtype=torch.int64)
                    primary[li, gi, :n] = torch.tensor(gpu["primary"], dtype=torch.bool)
                    weight[li, gi, :n] = torch.tensor(gpu["weights"], dtype=torch.float64)
                load[li] = torch.tensor(layer["predicted_gpu_load"], dtype=torch.float64)
            return cls(slot_expert, primary, weight, load, topology, num_experts, top_k, str(data["policy"]),
                       [str(layer["name"]) for layer in layers], str(data.get("model_name", "unknown")),
                       dict(data.get("options", {})))
        except GraceInputError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise GraceInputError(f"{source}: malformed plan ({type(error).__name__}: {error})") from None

    @classmethod
    def load(cls, path: str | Path) -> "PlacementPlan":
        data = read_json(path, "placement plan")
        try:
            return cls.from_dict(data, str(path))
        except GraceInputError as error:
            message = str(error)
            raise GraceInputError(message if message.startswith(str(path)) else f"{path}: {message}") from None
