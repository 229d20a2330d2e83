"""grace_ds: GRACE-MoE (expert grouping, replication and locality-aware routing) for DeepSpeed."""
from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import LinkModel, Topology

__version__ = "0.1.0"
__all__ = ["GraceInputError", "LinkModel", "PlacementPlan", "RoutingProfile", "Topology", "__version__"]
