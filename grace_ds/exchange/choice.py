"""Which exchange carries a call: the mode resolved once per plan (`auto`: by the cost model's modeled
times), then per call by every rank's token count (`auto`: gather for decode-sized calls, flat below
the hierarchical crossover). The one place the choice is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.exchange.base import Exchange
from grace_ds.exchange.config import DEFAULT_GATHER_MAX_TOKENS, CommMode, CommunicationConfig
from grace_ds.exchange.expert_compute import ExpertCompute
from grace_ds.exchange.flat import FlatExchange
from grace_ds.exchange.gather import GatherExchange, NodeLayout
from grace_ds.exchange.graphed_gather import GraphedGather
from grace_ds.exchange.hierarchical import HierarchicalExchange
from grace_ds.exchange.node_groups import make_node_group
from grace_ds.exchange.traffic import Traffic
from grace_ds.served_plan import ServedPlan
from grace_ds.topology import Topology

# The exchange names as strings (mode_calls' keys, reports), from the one declaration.
FLAT, HIERARCHICAL, GATHER = CommMode.FLAT.value, CommMode.HIERARCHICAL.value, CommMode.GATHER.value
# With `gather` chosen outright every call takes it: its CUDA graphs then cover calls up to this many
# tokens per rank (decode-512 on 2 GPUs is 256 a rank), larger ones run eagerly.
GATHER_GRAPH_MAX_TOKENS = 512


def resolve_mode(mode: CommMode | str, topology: Topology, modeled_us: dict[str, float] | None = None) -> str:
    """`auto`: the mode with the lower modeled layer time (the simulator's cost model on the profile's
    sampled routings, stored in the plan by `grace-ds plan`); without those figures, hierarchical when
    there is more than one node and more than one GPU per node, where it never sends more cross-node
    copies than flat, and flat otherwise, where it would only add a hop. Under `auto` the runtime still
    goes flat or gather for calls with few tokens (ModeChoice.for_call)."""
    mode = CommMode(mode).value
    if mode != CommMode.AUTO.value:
        return mode
    if modeled_us and {FLAT, HIERARCHICAL} <= set(modeled_us):
        return min((FLAT, HIERARCHICAL), key=lambda m: modeled_us[m])
    return HIERARCHICAL if topology.num_nodes > 1 and max(topology.gpus_per_node) > 1 else FLAT


def gather_graph_tokens(comm_mode: str, gather_max_tokens: int) -> int:
    """Tokens per rank up to which gather calls replay CUDA graphs: what `auto` sends to gather, or with
    `gather` chosen outright (every call) GATHER_GRAPH_MAX_TOKENS."""
    return max(gather_max_tokens, DEFAULT_GATHER_MAX_TOKENS, GATHER_GRAPH_MAX_TOKENS if comm_mode == GATHER else 0)


@dataclass
class CallChoice:
    mode: str  # flat | hierarchical | gather
    largest: int  # every rank's largest token count (0 when no mode needed the counts)


class ModeChoice:
    """Per call: (exchange, tokens to pad to). Under `auto`, by the largest rank's token count in the call:
    at most gather_max_tokens -> gather (no split-size exchange, two collectives); below
    hierarchical_min_tokens -> flat (a second hop's fixed cost outweighs what it saves on small batches).
    Ranks agree through one tiny all-gather of token counts per forward."""

    def __init__(self, config: CommunicationConfig, topology: Topology, rank: int, group=None,
                 modeled_us: dict[str, float] | None = None) -> None:
        self.mode = resolve_mode(config.mode, topology, modeled_us)
        auto = config.mode == CommMode.AUTO
        self.hierarchical_min_tokens = config.hierarchical_min_tokens if auto else 0
        self.gather_max_tokens = config.gather_max_tokens if auto and topology.num_gpus > 1 else 0
        self.rank, self.group = rank, group
        self.mode_calls = {FLAT: 0, HIERARCHICAL: 0, GATHER: 0}
        self._counts: list[int] | None = None  # every rank's tokens in this forward's calls
        self._counts_layer = -1

    def token_counts(self, num_tokens: int, device: torch.device, layer: int) -> list[int]:
        """Every rank's token count in this call. Exchanged (one tiny all-gather) at a forward's first MoE
        call, i.e. when the layer index does not grow, which every rank sees alike; the later layers of a
        forward hold the same tokens and reuse it."""
        if not faults.distributed():
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

    def for_call(self, num_tokens: int, device: torch.device, layer: int, needs_grad: bool = False) -> CallChoice:
        """The resolved mode, or under `auto` gather or flat by the largest rank's count (gather only
        without autograd: with it, flat). The padding, every rank's largest count, matters to gather alone."""
        choice = self._choose(num_tokens, device, layer, needs_grad)
        self.mode_calls[choice.mode] += 1
        return choice

    def _choose(self, num_tokens: int, device: torch.device, layer: int, needs_grad: bool) -> CallChoice:
        use_gather = self.gather_max_tokens > 0 and not needs_grad
        use_flat = self.mode == HIERARCHICAL and self.hierarchical_min_tokens > 0
        if self.mode == GATHER:  # inference only: no backward, so calls under autograd go flat
            return CallChoice(FLAT, 0) if needs_grad else CallChoice(GATHER, max(self.token_counts(num_tokens, device, layer)))
        if not (use_gather or use_flat):
            return CallChoice(self.mode, 0)
        largest = max(self.token_counts(num_tokens, device, layer))
        if use_gather and largest <= self.gather_max_tokens:
            return CallChoice(GATHER, largest)
        return CallChoice(FLAT if use_flat and largest < self.hierarchical_min_tokens else self.mode, largest)

    def modes_used(self) -> str:
        """The exchange this runtime ran: one mode's name, or how many calls went each way under `auto`."""
        used = {mode: calls for mode, calls in self.mode_calls.items() if calls}
        if len(used) <= 1:
            return next(iter(used), self.mode)
        return "auto: " + ", ".join(f"{calls} {mode}" for mode, calls in used.items())


class ChosenExchange:
    """Every exchange a runtime may take, built once from one CommunicationConfig, and the choice between
    them per call (`for_call`, then `run`)."""

    def __init__(self, config: CommunicationConfig, served: ServedPlan, group=None,
                 device: torch.device | str = "cpu") -> None:
        plan, rank = served.plan, served.rank
        topology = plan.topology
        self.config = config
        self.choice = ModeChoice(config, topology, rank, group, plan.options.get("modeled_layer_time_us"))
        # Exchanges inside a node (hop 2, the gather's in-node stages) over a group of the node's ranks:
        # created here, so every rank builds its runtime alike (collective).
        self.node_group = (make_node_group(topology, rank, group) if config.node_groups and dist.is_available()
                           and dist.is_initialized() and topology.num_nodes > 1 and max(topology.gpus_per_node) > 1
                           else None)
        # The gather exchange crosses equal nodes once per token and node (None: NCCL's ring collectives).
        sizes = topology.gpus_per_node
        layout = (NodeLayout.of(rank, topology.node_of_gpu.tolist())
                  if config.hierarchical_gather and len(sizes) > 1 and len(set(sizes)) == 1 else None)
        flat = FlatExchange(topology, rank, plan.slots_per_gpu, group)
        self.exchanges: dict[str, Exchange] = {
            FLAT: flat,
            # one node: a second hop would only repeat the first
            HIERARCHICAL: (HierarchicalExchange(topology, rank, plan.slots_per_gpu, group, self.node_group)
                             if topology.num_nodes > 1 else flat),
            GATHER: GatherExchange(topology, rank, plan.slots_per_gpu, group, layout, self.node_group)}
        # Gather calls on a GPU replay CUDA graphs (decode is launch-bound); None: always eager.
        self.graphs = (GraphedGather(served, self.exchanges[GATHER], True,
                                     gather_graph_tokens(self.choice.mode, self.choice.gather_max_tokens))
                       if config.cuda_graphs and torch.device(device).type == "cuda" else None)

    def for_call(self, num_tokens: int, device: torch.device, layer: int, needs_grad: bool, experts: ExpertCompute,
                 measuring: bool) -> tuple[CallChoice, int | None]:
        """(the call's exchange, the CUDA-graph bucket it replays or None). Graphed calls route inside their
        graph; measured ones (byte counts) and calls under autograd run eagerly."""
        call = self.choice.for_call(num_tokens, device, layer, needs_grad)
        bucket = None
        if call.mode == GATHER and self.graphs is not None and not measuring and not needs_grad:
            bucket = self.graphs.bucket(call.largest, experts)
        return call, bucket

    def run(self, call: CallChoice, bucket: int | None, layer: int, hidden: torch.Tensor, slots: torch.Tensor | None,
            top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts: ExpertCompute,
            traffic: Traffic | None) -> torch.Tensor:
        if bucket is not None:
            return self.graphs(layer, hidden, top_k_index, top_k_weights, bucket, experts)
        exchange = self.exchanges[call.mode]
        if call.mode == GATHER:
            exchange = exchange.for_call(call.largest)
        return exchange(hidden, slots, top_k_weights, experts, f" of layer {layer}", traffic)

    def clear_graphs(self) -> None:
        """Drop captured graphs: they hold the old plan's weights and routing tables."""
        if self.graphs is not None:
            self.graphs.clear()
