"""What every planner shares: the per-GPU slot capacity, and turning per-GPU expert lists into a plan
with copy weights and predicted loads (same prediction for every policy, so plans compare fairly)."""
from __future__ import annotations

import math

import numpy as np
import torch

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing import LayerCopies, expected_copy_loads
from grace_ds.topology import Topology

# One layer's placement: per GPU, its experts in slot order, and whether each is the primary copy.
GpuExperts = list[list[int]]
GpuPrimary = list[list[bool]]


def base_slots(num_experts: int, topology: Topology) -> int:
    """Slots a GPU needs to hold its share of the experts once: ceil(E / P)."""
    return math.ceil(num_experts / topology.num_gpus)


def slot_capacity(num_experts: int, topology: Topology, replica_slots: int) -> int:
    """Copies a GPU may hold per layer: its share of the experts plus the replica budget."""
    if replica_slots < 0:
        raise GraceInputError(f"replica slots per GPU must be >= 0, got {replica_slots}")
    return base_slots(num_experts, topology) + replica_slots


def _slot_tensors(gpu_experts: GpuExperts, gpu_values: list[list[float]], slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-GPU lists -> slot_expert [P, S] (-1 pad) and a same-shaped float tensor of per-copy values."""
    slot_expert = np.full((len(gpu_experts), slots), -1, dtype=np.int64)
    values = np.zeros((len(gpu_experts), slots), dtype=np.float64)
    for gpu, (experts, vals) in enumerate(zip(gpu_experts, gpu_values)):
        slot_expert[gpu, : len(experts)] = experts
        values[gpu, : len(experts)] = vals
    return torch.from_numpy(slot_expert), torch.from_numpy(values)


def predict_loads(expert_load: torch.Tensor, gpu_experts: GpuExperts, topology: Topology,
                  router_policy: str = "tar", iterations: int = 4, copy_loads: list[list[float]] | None = None,
                  start_gpu_load: torch.Tensor | None = None) -> tuple[list[list[float]], torch.Tensor]:
    """Copy weights and predicted GPU loads [P] for one layer (and per-copy loads into `copy_loads`).

    Tokens arrive evenly from every GPU (data parallel). Each copy's weight is the inverse of the
    predicted load of its GPU (the method page); the router's locality tiers decide which copies a
    source may use, so prediction and weights are iterated to a fixed point, starting from
    `start_gpu_load` when given (a search that changes a plan a little converges in one step).
    With no locality this is the paper's formula: a hot load split evenly over its copies."""
    num_experts = expert_load.shape[0]
    slots = max(max(len(g) for g in gpu_experts), 1)
    slot_expert, _ = _slot_tensors(gpu_experts, [[1.0] * len(g) for g in gpu_experts], slots)
    copies = LayerCopies.from_slots(slot_expert, (slot_expert >= 0).double(),
                                    torch.zeros_like(slot_expert, dtype=torch.bool), num_experts)
    valid = copies.copy_gpu >= 0
    gpu_weight = torch.ones(topology.num_gpus, dtype=torch.float64)
    if start_gpu_load is not None:
        gpu_weight = 1.0 / start_gpu_load.clamp(min=max(float(start_gpu_load.mean()) * 1e-3, 1e-12))
    for _ in range(iterations):
        copies.copy_weight = torch.where(valid, gpu_weight[copies.copy_gpu.clamp(min=0)], 0.0)
        per_copy, load = expected_copy_loads(copies, expert_load, router_policy, topology.node_of_gpu)
        gpu_weight = 1.0 / load.clamp(min=max(float(load.mean()) * 1e-3, 1e-12))
    weights = [[float(gpu_weight[gpu])] * len(g) for gpu, g in enumerate(gpu_experts)]
    if copy_loads is not None:  # filled with each copy's predicted load, GPU by GPU in slot order
        per_slot = torch.zeros(len(gpu_experts) * slots, dtype=torch.float64)
        per_slot[copies.copy_slot[valid]] = per_copy[valid]
        copy_loads[:] = [per_slot[g * slots: g * slots + len(experts)].tolist() for g, experts in enumerate(gpu_experts)]
    return weights, load


def layer_slot_tensors(gpu_experts: GpuExperts, gpu_primary: GpuPrimary, weights: list[list[float]],
                       capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's per-GPU lists -> slot_expert [P, capacity], slot_is_primary, slot_weight."""
    for gpu, experts in enumerate(gpu_experts):
        if len(experts) > capacity:
            raise AssertionError(f"planner put {len(experts)} copies on GPU {gpu}, capacity {capacity}")
    slot_expert, slot_weight = _slot_tensors(gpu_experts, weights, capacity)
    flags = [[float(f) for f in flags] for flags in gpu_primary]
    return slot_expert, _slot_tensors(gpu_experts, flags, capacity)[1].bool(), slot_weight


def assemble_plan(layers: list[tuple[GpuExperts, GpuPrimary]], profile: RoutingProfile, topology: Topology,
                  policy: str, replica_slots: int, options: dict) -> PlacementPlan:
    """Plan from per-layer (experts per GPU, primary flags), with weights and predicted loads filled in."""
    capacity = slot_capacity(profile.num_experts, topology, replica_slots)
    filled = []
    for li, (gpu_experts, gpu_primary) in enumerate(layers):
        weights, load = predict_loads(profile.expert_load[li], gpu_experts, topology)
        filled.append((*layer_slot_tensors(gpu_experts, gpu_primary, weights, capacity), load))
    slot_expert, slot_primary, slot_weight, predicted = (torch.stack(parts) for parts in zip(*filled))
    return PlacementPlan(slot_expert, slot_primary, slot_weight, predicted, topology, profile.num_experts,
                         profile.top_k, policy, list(profile.layer_names), profile.model_name,
                         {"replica_slots": replica_slots, **options})
