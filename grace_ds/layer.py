"""The GRACE expert-parallel MoE computation: logical picks -> physical copies -> exchange -> experts.

`GraceExperts` is a drop-in for the `experts` module of a transformers 5.x sparse MoE block (same call:
hidden [N, H], top_k_index [N, k], top_k_weights [N, k] -> [N, H]); the block's own gate, shared
experts and reshapes stay untouched, so outputs equal the unmodified model's up to summation order.
The DeepSpeed layer (grace_ds.deepspeed_moe) reuses `route_and_compute`.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from grace_ds import faults
from grace_ds.dispatch import ExpertCompute, Traffic, choose_mode, exchange_and_compute
from grace_ds.decode_graphs import GatherGraphs, capturable, token_bucket
from grace_ds.dispatch_gather import NodeLayout, gather_and_compute
from grace_ds.node_groups import make_node_group
from grace_ds.errors import GraceInputError
from grace_ds.exchange.config import DEFAULT_GATHER_MAX_TOKENS, CommunicationConfig
from grace_ds.plan import PlacementPlan
from grace_ds.replica_sync import ReplicaSync
from grace_ds.routing import ReplicaRouter

# (plan layer, top_k_index [N, k], the slots the router gave them [N, k], None in a graphed call) -> None
RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor | None], None]
# With `gather` chosen outright every call takes it: its CUDA graphs then cover calls up to this many
# tokens per rank (decode-512 on 2 GPUs is 256 a rank), larger ones run eagerly.
GATHER_GRAPH_MAX_TOKENS = 512


def gather_graph_tokens(comm_mode: str, gather_max_tokens: int) -> int:
    """Tokens per rank up to which gather calls replay CUDA graphs: what `auto` sends to gather, or with
    `gather` chosen outright (every call) GATHER_GRAPH_MAX_TOKENS."""
    return max(gather_max_tokens, DEFAULT_GATHER_MAX_TOKENS, GATHER_GRAPH_MAX_TOKENS if comm_mode == "gather" else 0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _expert_parallel_rank(plan: PlacementPlan, rank: int | None, group) -> int:
    """This process's GPU in the plan: `rank` when given, else its rank in `group` (the job: modulo the
    plan's GPUs, as DeepSpeed numbers expert-parallel groups consecutively). Every process shows its
    rank to the others (one tiny all-gather), so a wrong one stops all of them with one message
    instead of failing on some while the others wait in their next collective."""
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        resolved = 0 if rank is None else rank
        if not 0 <= resolved < plan.num_gpus:
            raise GraceInputError(f"rank {resolved} is outside the plan's {plan.num_gpus} GPUs")
        return resolved
    world = dist.get_world_size(group)
    position = dist.get_rank(group)
    resolved = position % plan.num_gpus if rank is None else rank
    ranks = faults.all_gather_tensor(torch.tensor([resolved], device=_collective_device(group)),
                                     "runtime set-up (exchanging ranks)", group).flatten().tolist()
    expected = [p % plan.num_gpus for p in range(world)]
    if world % plan.num_gpus or ranks != expected:
        raise GraceInputError(
            f"GraceRuntime ranks {ranks} on {world} processes do not fit the plan's {plan.num_gpus} GPUs: "
            f"each process passes its rank within its expert-parallel group (DeepSpeed's are consecutive "
            f"blocks of ep_size ranks: dist.get_rank() % {plan.num_gpus}), or rank=None"
            + ("" if world % plan.num_gpus == 0 else f"; {world} processes are no whole number of such groups"))
    return resolved


def _collective_device(group) -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
            else torch.device("cpu"))


class GraceRuntime:
    """What every GRACE layer of one model shares: the plan, this rank, its router and process group.

    rank: this process's GPU in the plan (None: its rank in `group`, or in the job modulo the plan's GPUs,
    i.e. within its expert-parallel group when the job is expert x data parallel)."""

    def __init__(self, plan: PlacementPlan, *, rank: int | None = None, group=None, router: str = "tar",
                 router_sampling: str = "swrr", communication: CommunicationConfig | str = "auto",
                 device: torch.device | str = "cpu") -> None:
        comm = CommunicationConfig.of(communication)
        comm_mode, hierarchical_min_tokens, gather_max_tokens = comm.mode.value, comm.hierarchical_min_tokens, comm.gather_max_tokens
        cuda_graphs, hierarchical_gather, node_groups = comm.cuda_graphs, comm.hierarchical_gather, comm.node_groups
        router_policy = router
        self.communication = comm
        rank = _expert_parallel_rank(plan, rank, group)
        self.plan, self.rank, self.group = plan, rank, group
        self.comm_mode = choose_mode(comm_mode, plan.topology, plan.options.get("modeled_layer_time_us"))
        # Under `auto`, by the largest rank's token count in the call: at most gather_max_tokens -> gather
        # (no split-size exchange, two collectives); below hierarchical_min_tokens -> flat (a second hop's
        # fixed cost outweighs what it saves on small batches). Ranks agree through one tiny all-gather of
        # token counts per forward.
        self.hierarchical_min_tokens = hierarchical_min_tokens if comm_mode == "auto" else 0
        self.gather_max_tokens = gather_max_tokens if comm_mode == "auto" and plan.num_gpus > 1 else 0
        self.mode_calls = {"flat": 0, "hierarchical": 0, "gather": 0}
        # The gather exchange crosses equal nodes once per token and node (None: NCCL's ring collectives).
        sizes = plan.topology.gpus_per_node
        self.gather_layout = (NodeLayout.of(rank, plan.topology.node_of_gpu.tolist())
                              if hierarchical_gather and len(sizes) > 1 and len(set(sizes)) == 1 else None)
        # Exchanges inside a node (hop 2, the gather's in-node stages) over a group of the node's ranks:
        # created here, so every rank builds its runtime alike (collective).
        topology = plan.topology
        self.node_group = (make_node_group(topology, rank, group) if node_groups and dist.is_available()
                           and dist.is_initialized() and topology.num_nodes > 1 and max(topology.gpus_per_node) > 1
                           else None)
        self._counts: list[int] | None = None  # every rank's tokens in this forward's calls
        self._counts_layer = -1
        self.router_policy, self.router_sampling, self.device = router_policy, router_sampling, torch.device(device)
        self.router = ReplicaRouter(plan, router_policy, source_gpus=[rank], sampling=router_sampling,
                                    device=device)
        self.replicas = ReplicaSync(plan, rank)  # training: copies of an expert as one expert
        self.observers: list[RoutingObserver] = []
        # Plan layer -> this rank's slot weights, registered by the layers that hold them (online re-planning
        # rewrites them when the plan changes).
        self.slot_modules: dict[int, nn.Module] = {}
        # Per plan layer: bytes this rank sent and pairs it computed, and seconds in the MoE layer.
        self.traffic = [Traffic() for _ in range(plan.num_layers)]
        self.seconds = [0.0] * plan.num_layers
        self.measure = False  # timing synchronises the device: off unless asked for
        # Gather calls on a GPU replay CUDA graphs (decode is launch-bound); None: always eager.
        self.gather_graphs = (GatherGraphs(self, True, gather_graph_tokens(self.comm_mode, self.gather_max_tokens))
                              if cuda_graphs and self.device.type == "cuda" else None)

    def switch_plan(self, plan: PlacementPlan, arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Serve `plan` from the next forward on: every changed layer's slots take their new experts'
        weights from `arrived` (layer -> slot -> (gate_up, down)), and the routing tables are rebuilt.
        Called between forwards on every rank at the same step, so no forward sees a half-changed plan."""
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
        if self.gather_graphs is not None:
            self.gather_graphs.clear()  # they hold the old weights and routing tables

    def token_counts(self, num_tokens: int, device: torch.device, layer: int) -> list[int]:
        """Every rank's token count in this call. Exchanged (one tiny all-gather) at a forward's first MoE
        call, i.e. when the layer index does not grow, which every rank sees alike; the later layers of a
        forward hold the same tokens and reuse it."""
        if not (dist.is_available() and dist.is_initialized()):
            return [num_tokens]
        if self._counts is None or layer <= self._counts_layer:
            counts = faults.all_gather_tensor(torch.tensor([num_tokens], device=device),
                                              f"dispatch of layer {layer} (exchanging token counts)", self.group)
            self._counts = [int(c) for c in counts.flatten().tolist()]
        elif self._counts[self.rank] != num_tokens:
            raise RuntimeError(f"layer {layer} got {num_tokens} tokens on rank {self.rank}, the forward's earlier "
                               f"MoE layers {self._counts[self.rank]}: every MoE layer of a forward must see the same tokens")
        self._counts_layer = layer
        return self._counts

    def mode_for(self, num_tokens: int, device: torch.device, layer: int, needs_grad: bool = False) -> tuple[str, int]:
        """(exchange, tokens to pad to) for a call with num_tokens here: the resolved mode, or under `auto`
        gather or flat by the largest rank's count (gather only without autograd: with it, flat). The padding, every
        rank's largest count, matters to gather alone (0 when no other mode needed the counts)."""
        use_gather = self.gather_max_tokens > 0 and not needs_grad
        use_flat = self.comm_mode == "hierarchical" and self.hierarchical_min_tokens > 0
        if self.comm_mode == "gather":  # inference only: no backward, so calls under autograd go flat
            return ("flat", 0) if needs_grad else ("gather", max(self.token_counts(num_tokens, device, layer)))
        if not (use_gather or use_flat):
            return self.comm_mode, 0
        largest = max(self.token_counts(num_tokens, device, layer))
        if use_gather and largest <= self.gather_max_tokens:
            return "gather", largest
        return ("flat" if use_flat and largest < self.hierarchical_min_tokens else self.comm_mode), largest

    def modes_used(self) -> str:
        """The exchange this runtime ran: one mode's name, or how many calls went each way under `auto`."""
        used = {mode: calls for mode, calls in self.mode_calls.items() if calls}
        if len(used) <= 1:
            return next(iter(used), self.comm_mode)
        return "auto: " + ", ".join(f"{calls} {mode}" for mode, calls in used.items())

    def local_slots(self, layer: int) -> torch.Tensor:
        """[S] logical expert held in each of this rank's slots of `layer` (-1: empty)."""
        return self.plan.slot_expert[layer, self.rank]

    def sync_replica_weights(self) -> None:
        """Copy every primary expert's weights into its replicas: call after each optimizer step
        (grace_ds.deepspeed.initialize does it for DeepSpeed engines)."""
        self.replicas.sync_weights(self._holders(), self.group)

    def max_replica_difference(self) -> float:
        """Largest difference between two copies of one expert over every layer (0.0: in sync)."""
        return self.replicas.max_copy_difference(self._holders(), self.group)

    def _holders(self) -> dict[int, nn.Module]:
        missing = [layer for layer in self.replicas.num_rows if layer not in self.slot_modules]
        if missing:
            raise GraceInputError(f"plan layers {missing} have replicated experts but no layer registered its slots")
        return self.slot_modules

    def route_and_compute(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, compute: ExpertCompute) -> torch.Tensor:
        if self.measure:
            _synchronize(hidden.device)
            start = time.perf_counter()
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad
                                                  or _trains(compute))
        if needs_grad and self.replicas.replicated(layer):
            if not hasattr(compute, "slot_tensors"):
                raise GraceInputError(f"layer {layer} trains replicated experts through {type(compute).__name__}, "
                                      f"which cannot tie their copies (SlotExperts or GraceMoE slots can)")
            hidden, compute = self.replicas.tie(layer, hidden, compute, self.group)
        mode, largest = self.mode_for(hidden.shape[0], hidden.device, layer, needs_grad)
        self.mode_calls[mode] += 1
        traffic = self.traffic[layer] if self.measure else None
        graphs = self.gather_graphs
        bucket = None
        if (mode == "gather" and graphs is not None and traffic is None and not needs_grad
                and hasattr(compute, "weighted_sum") and (capturable(compute) or not graphs.capture)):
            bucket = token_bucket(largest, graphs.max_tokens)
        # Routed once, here (a graphed call routes inside its capture); observers see where the pairs go.
        slots = None if bucket is not None else self.router.route(layer, top_k_index, self.rank)
        for observe in self.observers:
            observe(layer, top_k_index, slots)
        if bucket is not None:
            out = graphs(layer, hidden, top_k_index, top_k_weights, bucket, compute)
        elif mode == "gather":
            topology = self.plan.topology
            out = gather_and_compute(hidden, slots, top_k_weights, self.plan.slots_per_gpu, self.rank,
                                     topology.num_gpus, largest, compute, self.group, traffic,
                                     topology.node_of_gpu.tolist(), f" of layer {layer}", self.gather_layout,
                                     self.node_group)
        else:
            out = exchange_and_compute(hidden, slots, top_k_weights, self.plan.slots_per_gpu, self.plan.topology,
                                       self.rank, compute, mode, self.group, traffic, f" of layer {layer}",
                                       self.node_group)
        if self.measure:
            _synchronize(hidden.device)
            self.seconds[layer] += time.perf_counter() - start
        return out


def _trains(compute) -> bool:
    """Whether the expert computation reads parameters that want a gradient."""
    tensors = getattr(compute, "slot_tensors", None)
    return tensors is not None and any(t.requires_grad for t in tensors())


class GraceExperts(nn.Module):
    """Replaces a transformers MoE block's `experts`; holds only this rank's slots (replicas included)."""

    def __init__(self, runtime: GraceRuntime, layer: int, slots: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.slots = slots
        self._runtime = runtime  # shared, not a submodule: nothing of it is a parameter
        runtime.slot_modules[layer] = slots

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._runtime.route_and_compute(self.layer, hidden_states, top_k_index, top_k_weights, self.slots)

    def extra_repr(self) -> str:
        held = self._runtime.local_slots(self.layer)
        return f"layer={self.layer}, rank={self._runtime.rank}, slots={held[held >= 0].tolist()}"
