"""GraceRuntime: what every GRACE layer of one model shares, and the one call each layer makes.

route_and_compute(layer, hidden, top_k_index, top_k_weights, experts): the router picks each pair's
physical copy (grace_ds.served_plan), observers see the picks (routing statistics, online re-planning),
the chosen exchange (grace_ds.exchange) carries the pairs to their GPUs and the weighted expert outputs
back. The layers are adapters: grace_ds.models.grace_experts (transformers), grace_ds.deepspeed_moe
(DeepSpeed MoE), grace_ds.megatron (megatron-core).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.exchange import CommunicationConfig
from grace_ds.exchange.choice import ChosenExchange
from grace_ds.exchange.expert_compute import as_expert_compute, trains
from grace_ds.exchange.traffic import Traffic
from grace_ds.plan import PlacementPlan
from grace_ds.replica_sync import SlotHolder
from grace_ds.served_plan import ServedPlan

# (plan layer, top_k_index [N, k], the slots the router gave them [N, k], None in a graphed call) -> None
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor | None], None]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _expert_parallel_rank(plan: PlacementPlan, rank: int | None, group) -> int:
    """This process's GPU in the plan: `rank` when given, else its rank in `group` (the job: modulo the
    plan's GPUs, as DeepSpeed numbers expert-parallel groups consecutively). Every process shows its
    rank to the others (one tiny all-gather), so a wrong one stops all of them with one message
    instead of failing on some while the others wait in their next collective."""
    distributed = faults.distributed()
    if not distributed:
        resolved = 0 if rank is None else rank
        if not 0 <= resolved < plan.num_gpus:
            raise GraceInputError(f"rank {resolved} is outside the plan's {plan.num_gpus} GPUs")
        return resolved
    world = dist.get_world_size(group)
    position = dist.get_rank(group)
    resolved = position % plan.num_gpus if rank is None else rank
    ranks = faults.all_gather_tensor(torch.tensor([resolved], device=faults.collective_device(group)),
                                     "runtime set-up (exchanging ranks)", group).flatten().tolist()
    expected = [p % plan.num_gpus for p in range(world)]
    if world % plan.num_gpus or ranks != expected:
        raise GraceInputError(
            f"GraceRuntime ranks {ranks} on {world} processes do not fit the plan's {plan.num_gpus} GPUs: "
            f"each process passes its rank within its expert-parallel group (DeepSpeed's are consecutive "
            f"blocks of ep_size ranks: dist.get_rank() % {plan.num_gpus}), or rank=None"
            + ("" if world % plan.num_gpus == 0 else f"; {world} processes are no whole number of such groups"))
    return resolved


class GraceRuntime:
    """The served plan (plan, router, slots), the exchange, the observers, and per-layer measurements.

    rank: this process's GPU in the plan (None: its rank in `group`, or in the job modulo the plan's GPUs,
    i.e. within its expert-parallel group when the job is expert x data parallel). communication: a
    CommunicationConfig or a mode name."""

    def __init__(self, plan: PlacementPlan, *, rank: int | None = None, group=None, router: str = "tar",
                 router_sampling: str = "swrr", communication: CommunicationConfig | str = "auto",
                 device: torch.device | str = "cpu") -> None:
        rank = _expert_parallel_rank(plan, rank, group)
        self._group, self.device = group, torch.device(device)
        self.served = ServedPlan(plan, rank=rank, router=router, router_sampling=router_sampling, device=device)
        self.exchange = ChosenExchange(CommunicationConfig.of(communication), self.served, group, device)
        self.observers: list[RoutingObserver] = []
        # Per plan layer: bytes this rank sent and pairs it computed, and seconds in the MoE layer.
        self.traffic = [Traffic() for _ in range(plan.num_layers)]
        self.seconds = [0.0] * plan.num_layers
        self.measure = False  # timing synchronises the device: off unless asked for
        self.count_traffic = False  # bytes and pairs alone (from split sizes on the host): no synchronisation

    @property
    def group(self):
        """The process group of the plan's GPUs (None: the job's)."""
        return self._group

    @group.setter
    def group(self, group) -> None:
        # DeepSpeed hands MoE layers their expert-parallel group after they are built (MoE._set_ep_group):
        # the exchanges are built again on it.
        self._group = group
        self.exchange = ChosenExchange(self.exchange.config, self.served, group, self.device)

    @property
    def plan(self) -> PlacementPlan:
        return self.served.plan

    @property
    def rank(self) -> int:
        return self.served.rank

    @property
    def slot_modules(self) -> dict[int, nn.Module]:
        return self.served.slot_modules

    @property
    def comm_mode(self) -> str:
        """The mode resolved for this plan (per call `auto` may still go flat or gather)."""
        return self.exchange.choice.mode

    def modes_used(self) -> str:
        return self.exchange.choice.modes_used()

    def local_slots(self, layer: int) -> torch.Tensor:
        return self.served.local_slots(layer)

    def switch_plan(self, plan: PlacementPlan, arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Serve `plan` from the next forward on (ServedPlan.switch_plan). Called between forwards on every
        rank at the same step, so no forward sees a half-changed plan."""
        self.served.switch_plan(plan, arrived)
        self.exchange.clear_graphs()  # they hold the old weights and routing tables

    def sync_replica_weights(self) -> None:
        """Copy every primary expert's weights into its replicas: call after each optimizer step
        (grace_ds.deepspeed.initialize does it for DeepSpeed engines)."""
        self.served.replicas.sync_weights(self.served.holders(), self.group)

    def max_replica_difference(self) -> float:
        """Largest difference between two copies of one expert over every layer (0.0: in sync)."""
        return self.served.replicas.max_copy_difference(self.served.holders(), self.group)

    def route_and_compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, experts) -> torch.Tensor:
        """hidden [N, H], top_k_index / top_k_weights [N, k] (logical experts, the gate's weights) ->
        sum_k weight * expert(hidden) per token [N, H]. experts: an ExpertCompute (SlotExperts) or a
        plain (rows, slot) -> rows callable."""
        if self.measure:
            _synchronize(hidden.device)
            start = time.perf_counter()
        experts = as_expert_compute(experts)
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad
                                                  or trains(experts))
        replicas = self.served.replicas
        if needs_grad and replicas.replicated(layer):
            if not isinstance(experts, SlotHolder):
                raise GraceInputError(f"layer {layer} trains replicated experts through {type(experts).__name__}, "
                                      f"which cannot tie their copies (SlotExperts or GraceMoE slots can)")
            hidden, experts = replicas.tie(layer, hidden, experts, self.group)
        traffic = self.traffic[layer] if self.measure or self.count_traffic else None
        call, bucket = self.exchange.for_call(hidden.shape[0], hidden.device, layer, needs_grad, experts,
                                              traffic is not None)
        # Routed once, here (a graphed call routes inside its capture); observers see where the pairs go.
        slots = None if bucket is not None else self.served.route(layer, top_k_index)
        for observe in self.observers:
            observe(layer, top_k_index, slots)
        out = self.exchange.run(call, bucket, layer, hidden, slots, top_k_index, top_k_weights, experts, traffic)
        if self.measure:
            _synchronize(hidden.device)
            self.seconds[layer] += time.perf_counter() - start
        return out
