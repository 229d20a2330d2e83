"""The hierarchical exchange: across nodes once per token and node, then inside the node.

Hop 1 sends a row once per remote node, to the peer GPU with the same local index (Topology.peer_of),
and directly to GPUs of its own node; hop 2 fans it out inside that node (over the node's own process
group when given one, grace_ds.exchange.node_groups). The combine runs backwards and sums a token's
partial outputs on the node before they cross back. The host waits for split sizes once: hop 2's
travel with hop 1's, so the host queues both hops, the experts and the combine while hop 1's rows
cross. Overlap: this rank's own pairs while hop 1's rows cross, then the pairs that ended here while
hop 2 fans out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from grace_ds.exchange.base import Exchange
from grace_ds.exchange.config import CommMode
from grace_ds.exchange.expert_compute import ExpertCompute, compute_pairs
from grace_ds.exchange.flat import PairsOfRows
from grace_ds.exchange.hop import ROW, SLOT, TARGET, Hop, KnownCounts
from grace_ds.exchange.node_groups import NodeGroup
from grace_ds.exchange.traffic import Traffic
from grace_ds.topology import Topology


@functools.lru_cache(maxsize=16)
def peer_table(topology: Topology, device: torch.device) -> torch.Tensor:
    """[G, N] Topology.peer_of(gpu, node) for every pair, on `device` (copied once: a copy from host
    memory to a GPU waits for its stream)."""
    return topology.peer_table.to(device)


@functools.lru_cache(maxsize=16)
def _node_of_gpu(topology: Topology, device: torch.device) -> torch.Tensor:
    return topology.node_of_gpu.to(device)


@dataclass
class _Sent:
    pairs: PairsOfRows
    hop1: Hop
    hop2: Hop | None = None
    final_results: torch.Tensor | None = None  # pairs that ended here after hop 1, per hop-1 row
    num_final: int = 0


class HierarchicalExchange(Exchange):
    name = CommMode.HIERARCHICAL.value

    def __init__(self, topology: Topology, rank: int, slots_per_gpu: int, group=None,
                 node_group: NodeGroup | None = None) -> None:
        if topology.num_nodes == 1:
            raise ValueError("the hierarchical exchange needs more than one node (one node: flat)")
        self.topology, self.rank, self.slots_per_gpu = topology, rank, slots_per_gpu
        self.group, self.node_group = group, node_group

    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, where: str) -> _Sent:
        # Hop 1: same-node targets directly, other nodes through the peer with this rank's local index.
        pairs = PairsOfRows.of(hidden, slot_ids, weights, self.slots_per_gpu)
        world, rank = self.topology.num_gpus, self.rank
        node_of_gpu = _node_of_gpu(self.topology, hidden.device)
        target_node = node_of_gpu[pairs.target]
        peer = peer_table(self.topology, hidden.device)[rank][target_node]
        next_rank = torch.where(target_node == node_of_gpu[rank], pairs.target, peer)
        hop1 = Hop.start(hidden, pairs.row, next_rank, pairs.target, pairs.slot, pairs.weight, world, rank, self.group,
                         where, extra=_onward_counts(pairs.row, next_rank, pairs.target, pairs.num_rows, world))
        return _Sent(pairs, hop1)

    def overlap(self, sent: _Sent, experts: ExpertCompute) -> torch.Tensor:
        hop1 = sent.hop1
        return compute_pairs(experts, hop1.own_rows, hop1.own_pairs, hop1.own_weights)

    def compute(self, sent: _Sent, experts: ExpertCompute) -> torch.Tensor:
        """Hop 1's arrivals: the pairs that end here are computed while hop 2 fans the others out inside
        the node (hop 2 keeps no rows for itself); returns hop 2's arrivals' results, per hop-2 row."""
        hop1 = sent.hop1.wait()
        final, final_weights, onward, onward_weights = hop1.split_final(self.rank)
        known = _fan_out_counts(hop1, self.rank, self.topology, self.node_group)
        fan_out = f"{hop1.where}, fan-out in the node"
        node_group = self.node_group
        if node_group is None:
            hop2 = Hop.start(hop1.rows, onward[:, ROW], onward[:, TARGET], onward[:, TARGET], onward[:, SLOT],
                             onward_weights, self.topology.num_gpus, self.rank, self.group, fan_out, known=known)
        else:  # the same hop numbered within the node's group
            inside = node_group.to_local(onward[:, TARGET])
            hop2 = Hop.start(hop1.rows, onward[:, ROW], inside, inside, onward[:, SLOT], onward_weights,
                             node_group.size, node_group.local, node_group.group, fan_out, known=known)
        sent.final_results = compute_pairs(experts, hop1.rows, final, final_weights)
        sent.hop2, sent.num_final = hop2.wait(), final.shape[0]
        return compute_pairs(experts, hop2.rows, hop2.pairs, hop2.weights)

    def combine(self, sent: _Sent, own: torch.Tensor | None, arrived: torch.Tensor) -> torch.Tensor:
        # Pre-reduce on this node: fan-out results join the pairs that ended here before crossing back.
        per_hop1_row = sent.final_results + sent.hop2.return_rows(arrived, sent.hop1.rows.shape[0])
        return sent.hop1.return_rows(per_hop1_row, sent.pairs.num_rows, own)

    def count(self, sent: _Sent, traffic: Traffic) -> None:
        node_of_gpu = self.topology.node_of_gpu.tolist()
        traffic.add_hop(sent.hop1, self.rank, node_of_gpu, sent.pairs.row_bytes)
        if self.node_group is None:
            traffic.add_hop(sent.hop2, self.rank, node_of_gpu, sent.pairs.row_bytes)
        else:
            traffic.add_hop(sent.hop2, self.node_group.local, [0] * self.node_group.size, sent.pairs.row_bytes)
        traffic.pairs_computed += sent.hop1.own_pairs.shape[0] + sent.num_final + sent.hop2.pairs.shape[0]


def _onward_counts(pair_row: torch.Tensor, next_rank: torch.Tensor, target: torch.Tensor, num_rows: int,
                   world: int) -> torch.Tensor:
    """[world, 2 * world + 2] counts this rank sends each rank r with hop 1's split sizes: the rows and
    pairs r will forward in hop 2 to each GPU g on this rank's behalf (a row once per g), then the rows
    and pairs this rank routes to r through another GPU. With them every rank knows hop 2's split sizes
    when hop 1's arrive: the hierarchical exchange waits for the device once, before any row moves."""
    stride = max(num_rows, 1)
    onward = (target != next_rank).long()
    route = next_rank * world + target
    sorted_key, order = torch.sort(route * stride + pair_row)
    is_first = torch.ones_like(sorted_key, dtype=torch.bool)
    is_first[1:] = sorted_key[1:] != sorted_key[:-1]
    zeros = torch.zeros(world * world, dtype=torch.long, device=pair_row.device)
    rows = zeros.scatter_add(0, sorted_key // stride, is_first.long() * onward[order]).view(world, world)
    pairs = zeros.scatter_add(0, route, onward).view(world, world)
    return torch.cat([rows, pairs, rows.sum(0).unsqueeze(1), pairs.sum(0).unsqueeze(1)], 1)


def _fan_out_counts(hop1: Hop, rank: int, topology: Topology, node_group: NodeGroup | None) -> KnownCounts:
    """Hop 2's split sizes from the counts every sender sent with hop 1's (_onward_counts): this rank
    forwards what the senders whose peer it is asked for; it receives from each node-mate m what the
    senders whose peer is m route to it."""
    world = topology.num_gpus
    host = hop1.extra_received_host  # 2 * world + 2 lists over senders
    node = int(topology.node_of_gpu[rank])
    first, size = int(topology.first_gpu_of_node[node]), topology.gpus_per_node[node]
    peer_of_sender = peer_table(topology, hop1.rows.device)[:, node]  # where each sender's rows for this node land
    send_rows = [sum(host[g]) for g in range(world)]
    send_pairs = [sum(host[world + g]) for g in range(world)]
    recv_rows, recv_pairs = [0] * world, [0] * world
    for sender, peer in enumerate(topology.peer_of(torch.arange(world), node).tolist()):
        recv_rows[peer] += host[2 * world][sender]
        recv_pairs[peer] += host[2 * world + 1][sender]
    received = hop1.extra_received[:, 2 * world:]  # [senders, 2]: rows, pairs
    recv = torch.zeros_like(received).index_add_(0, peer_of_sender, received)
    recv_counts = torch.cat([recv, recv[:, 1:]], 1)  # every hop-2 pair ends where it arrives
    lists = (send_rows, send_pairs, recv_rows, recv_pairs, recv_pairs)
    if node_group is not None:  # numbered within the node's group
        recv_counts = recv_counts[first:first + size]
        lists = tuple(x[first:first + size] for x in lists)
    return KnownCounts(recv_counts.contiguous(), lists)
