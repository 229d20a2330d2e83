"""The plan one rank serves: the plan, this rank's GPU in it, the replica router and the slot weights
the layers registered; `switch_plan` swaps all of them between forwards (online re-planning)."""
from __future__ import annotations

import torch
from torch import nn

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.replica_sync import ReplicaSync
from grace_ds.routing import ReplicaRouter


class ServedPlan:
    def __init__(self, plan: PlacementPlan, *, rank: int, router: str = "tar", router_sampling: str = "swrr",
                 device: torch.device | str = "cpu") -> None:
        self.plan, self.rank, self.device = plan, rank, torch.device(device)
        self.router_policy, self.router_sampling = router, router_sampling
        self.router = ReplicaRouter(plan, router, source_gpus=[rank], sampling=router_sampling, device=device)
        self.replicas = ReplicaSync(plan, rank)  # training: copies of an expert as one expert
        # Plan layer -> this rank's slot weights, registered by the layers that hold them (online re-planning
        # rewrites them when the plan changes).
        self.slot_modules: dict[int, nn.Module] = {}

    def route(self, layer: int, top_k_index: torch.Tensor) -> torch.Tensor:
        """[N, k] logical experts -> [N, k] physical slots (the copies this rank's pairs go to)."""
        return self.router.route(layer, top_k_index, self.rank)

    def local_slots(self, layer: int) -> torch.Tensor:
        """[S] logical expert held in each of this rank's slots of `layer` (-1: empty)."""
        return self.plan.slot_expert[layer, self.rank]

    def switch_plan(self, plan: PlacementPlan, arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Serve `plan`: every changed layer's slots take their new experts' weights from `arrived`
        (layer -> slot -> (gate_up, down)), and the routing tables are rebuilt."""
        if plan.slot_expert.shape != self.plan.slot_expert.shape:
            raise ValueError(f"new plan has slots {tuple(plan.slot_expert.shape)}, the served one "
                             f"{tuple(self.plan.slot_expert.shape)}")
        changed = (plan.slot_expert[:, self.rank] != self.plan.slot_expert[:, self.rank]).any(1).nonzero().flatten()
        unheld = [int(layer) for layer in changed if int(layer) not in self.slot_modules]
        if unheld:
            raise ValueError(f"layers {unheld} change their slots but registered no slot weights to rewrite")
        router = ReplicaRouter(plan, self.router_policy, source_gpus=[self.rank], sampling=self.router_sampling,
                               device=self.device)
        for layer in range(plan.num_layers):
            router.tables(layer)  # built now, not in the first forward after the switch
        for layer in changed.tolist():
            self.slot_modules[layer].refill(plan.slot_expert[layer, self.rank], arrived.get(layer, {}))
        self.plan, self.router, self.replicas = plan, router, ReplicaSync(plan, self.rank)

    def holders(self) -> dict[int, nn.Module]:
        """The registered slot weights, checked to cover every layer with replicated experts."""
        missing = [layer for layer in self.replicas.num_rows if layer not in self.slot_modules]
        if missing:
            raise GraceInputError(f"plan layers {missing} have replicated experts but no layer registered its slots")
        return self.slot_modules
