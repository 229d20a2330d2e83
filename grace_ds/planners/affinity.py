"""uniform-affinity (the Occult / C2R family): equal-size co-activation groups, nodes then GPUs,
no replication."""
from __future__ import annotations

from grace_ds.plan import PlacementPlan
from grace_ds.planners.assemble import assemble_plan, base_slots
from grace_ds.planners.hierarchy import group_hierarchically
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology


def plan_uniform_affinity(profile: RoutingProfile, topology: Topology, replica_slots: int = 0,
                          seed: int = 0) -> PlacementPlan:
    layers = []
    for li in range(profile.num_layers):
        affinity = profile.coactivation[li] if profile.coactivation is not None else None
        gpu_experts = group_hierarchically(affinity, profile.expert_load[li], topology,
                                           base_slots(profile.num_experts, topology), "uniform", "uniform", seed=seed)
        layers.append((gpu_experts, [[True] * len(g) for g in gpu_experts]))
    return assemble_plan(layers, profile, topology, "uniform-affinity", replica_slots, {"seed": seed})
