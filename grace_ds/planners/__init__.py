"""Planners: pure functions (profile, topology, replica slot budget) -> PlacementPlan."""
from __future__ import annotations

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners.affinity import plan_uniform_affinity
from grace_ds.planners.contiguous import plan_contiguous
from grace_ds.planners.eplb import plan_eplb
from grace_ds.planners.grace import GraceSettings, plan_grace
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology

POLICIES = ("grace", "contiguous", "eplb", "eplb-hierarchical", "uniform-affinity")


def make_plan(policy: str, profile: RoutingProfile, topology: Topology, replica_slots: int = 1,
              **options) -> PlacementPlan:
    """Dispatch by policy name. Policies that never replicate (contiguous, uniform-affinity) leave the
    replica slots empty."""
    if policy == "grace":
        return plan_grace(profile, topology, replica_slots, **options)
    if policy == "contiguous":
        return plan_contiguous(profile, topology, replica_slots)
    if policy in ("eplb", "eplb-hierarchical"):
        return plan_eplb(profile, topology, replica_slots, hierarchical=policy == "eplb-hierarchical", **options)
    if policy == "uniform-affinity":
        return plan_uniform_affinity(profile, topology, replica_slots, **options)
    raise GraceInputError(f"policy must be one of {POLICIES}, got {policy!r}")


__all__ = ["POLICIES", "GraceSettings", "make_plan", "plan_contiguous", "plan_eplb", "plan_grace",
           "plan_uniform_affinity"]
