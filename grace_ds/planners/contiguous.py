"""DeepSpeed's layout: expert e on GPU e // (E / P), no replicas."""
from __future__ import annotations

import torch

from grace_ds.plan import PlacementPlan
from grace_ds.planners.assemble import assemble_plan, slot_capacity
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology


def contiguous_gpu_experts(num_experts: int, num_gpus: int) -> list[list[int]]:
    """Experts split into P contiguous runs; the first E % P GPUs get one more."""
    return [chunk.tolist() for chunk in torch.arange(num_experts).tensor_split(num_gpus)]


def plan_contiguous(profile: RoutingProfile, topology: Topology, replica_slots: int = 0) -> PlacementPlan:
    slot_capacity(profile.num_experts, topology, replica_slots)
    gpu_experts = contiguous_gpu_experts(profile.num_experts, topology.num_gpus)
    layer = (gpu_experts, [[True] * len(g) for g in gpu_experts])
    return assemble_plan([layer] * profile.num_layers, profile, topology, "contiguous", replica_slots, {})
