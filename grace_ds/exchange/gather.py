"""Token exchange for small batches (decode): all-gather the tokens, reduce-scatter the outputs.

With a few tokens per GPU an all-to-all's cost is its fixed part: a split-size exchange the host waits
for, then rows, pair records and the combine, each a collective. Here every rank instead sends its
tokens, each with its k chosen slots and routing weights packed beside it in one byte row, to every
rank in one all-gather (padded to the largest rank's count, known per forward); each rank computes the
pairs routed to its own slots in fixed shapes; one reduce-scatter sums every token's partial outputs
onto its own rank. Two collectives, no host synchronisation. A token reaches every GPU, which costs
little more than the all-to-all when its top-k covers most GPUs anyway, and the replica router's
choices (which GPU computes each pair) are the same as under the all-to-all exchanges. Inference only.

Across nodes (with a `NodeLayout`) the rows cross a node boundary once per token and remote node, as in
GRACE's hierarchical all-to-all: first to the GPU with the same local index on every other node, then
inside each node over NVLink; partial outputs come back the reverse way, summed on the node before they
cross. NCCL's ring all-gather instead walks every chunk through every GPU, over the node boundary more
often; at decode sizes on 2 x 2 the two measured alike (docs/benchmarks.md), the difference is bytes, which
grow with GPUs per node. Both take fixed split sizes: no host synchronisation either way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grace_ds.faults import guarded
from grace_ds import cost
from grace_ds.exchange.base import Exchange
from grace_ds.exchange.config import CommMode
from grace_ds.exchange.expert_compute import ExpertCompute
from grace_ds.exchange.node_groups import NodeGroup
from grace_ds.exchange.traffic import Traffic
from grace_ds.topology import Topology

# Newer torch names them *_single; 2.11 (the GPU machine's) only has the older names.
_all_gather_rows = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_rows = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _pack(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor, padded_tokens: int) -> torch.Tensor:
    """[padded_tokens, H * dtype bytes + 8k] uint8: each token's hidden state, then its k slots (int32,
    -1 on padding rows, so no rank computes them), then its k weights (float32)."""
    num_tokens, top_k = slot_ids.shape
    hidden_bytes = hidden.contiguous().view(torch.uint8)
    packed = hidden_bytes.new_zeros((padded_tokens, hidden_bytes.shape[1] + 8 * top_k))
    end_hidden, end_slots = hidden_bytes.shape[1], hidden_bytes.shape[1] + 4 * top_k
    packed[:num_tokens, :end_hidden] = hidden_bytes
    packed[:num_tokens, end_hidden:end_slots] = slot_ids.to(torch.int32).contiguous().view(torch.uint8)
    packed[num_tokens:, end_hidden:end_slots] = 255  # int32 -1
    packed[:num_tokens, end_slots:] = topk_weights.to(torch.float32).contiguous().view(torch.uint8)
    return packed


def _unpack(packed: torch.Tensor, dtype: torch.dtype, hidden_size: int, top_k: int):
    """(hidden [M, H], slots [M, k] int32, weights [M, k] float32) of packed rows [M, B]."""
    end_hidden = hidden_size * torch.finfo(dtype).bits // 8
    end_slots = end_hidden + 4 * top_k
    return (packed[:, :end_hidden].contiguous().view(dtype), packed[:, end_hidden:end_slots].contiguous().view(torch.int32),
            packed[:, end_slots:].contiguous().view(torch.float32))


@dataclass(frozen=True)
class NodeLayout:
    """Ranks numbered node by node, `per_node` a node: this rank's peers (same local index) on the other
    nodes and its node-mates, each list in rank order."""

    rank: int
    nodes: int
    per_node: int

    @classmethod
    def of(cls, rank: int, node_of_gpu: list[int]) -> "NodeLayout":
        sizes = [node_of_gpu.count(n) for n in sorted(set(node_of_gpu))]
        if len(set(sizes)) != 1 or node_of_gpu != sorted(node_of_gpu):
            raise ValueError(f"the hierarchical gather needs equal nodes numbered node by node, got {node_of_gpu}")
        return cls(rank, len(sizes), sizes[0])

    @property
    def node(self) -> int:
        return self.rank // self.per_node

    @property
    def local(self) -> int:
        return self.rank % self.per_node

    @functools.cached_property  # read every call: worked out once
    def peers(self) -> list[int]:
        topology = Topology.uniform(self.nodes, self.per_node)
        return [topology.peer_of(self.rank, n) for n in range(self.nodes) if n != self.node]

    @property
    def mates(self) -> list[int]:
        return [self.node * self.per_node + g for g in range(self.per_node) if g != self.local]


def _swap(chunks: torch.Tensor, ranks: list[int], world: int, group, phase: str) -> torch.Tensor:
    """chunks [len(ranks) * n, C]: the i-th n rows go to ranks[i], which sends as many back; returns
    what arrived, [len(ranks) * n, C] in the same order. One all-to-all with fixed split sizes."""
    rows = chunks.shape[0] // max(len(ranks), 1)
    splits = [rows if r in ranks else 0 for r in range(world)]
    out = torch.empty_like(chunks)
    guarded(phase, group, dist.all_to_all_single, out, chunks.contiguous(), splits, splits, group=group)
    return out


def _in_node(layout: NodeLayout, world: int, group, node_group: NodeGroup | None) -> tuple[list[int], int, object]:
    """(this rank's node-mates, ranks, group) for a swap inside the node: over the job's group, or
    numbered within the node's own group."""
    if node_group is None:
        return layout.mates, world, group
    return [node_group.to_local(m) for m in layout.mates], node_group.size, node_group.group


def _gather_by_node(packed: torch.Tensor, layout: NodeLayout, world: int, group, where: str,
                    node_group: NodeGroup | None = None) -> torch.Tensor:
    """Every rank's packed rows [P, B] -> [per_node, nodes, P, B] flattened to rows: across nodes, then in the node."""
    rows = packed.shape[0]
    column = packed  # rows of every rank with this local index, node by node
    if layout.nodes > 1:
        arrived = list(_swap(packed.repeat(layout.nodes - 1, 1), layout.peers, world, group,
                             f"dispatch{where} (gather across nodes)").split(rows))
        column = torch.cat(arrived[:layout.node] + [packed] + arrived[layout.node:])
    if layout.per_node == 1:
        return column
    arrived = list(_swap(column.repeat(layout.per_node - 1, 1), *_in_node(layout, world, group, node_group),
                         f"dispatch{where} (gather in node)").split(column.shape[0]))
    return torch.cat(arrived[:layout.local] + [column] + arrived[layout.local:])


def _sum_by_node(partial: torch.Tensor, layout: NodeLayout, world: int, group, where: str,
                 node_group: NodeGroup | None = None) -> torch.Tensor:
    """Partials [per_node * nodes * P, H] in _gather_by_node's order -> this rank's P rows summed over
    every rank: inside the node first (float32 sums), then across nodes, each node's sum crossing once."""
    parts = partial.view(layout.per_node, -1, partial.shape[1])
    column = parts[layout.local].float()
    if layout.per_node > 1:
        others = torch.cat([parts[g] for g in range(layout.per_node) if g != layout.local])
        arrived = _swap(others, *_in_node(layout, world, group, node_group), f"combine{where} (sum in node)")
        column = column + arrived.view(layout.per_node - 1, *column.shape).float().sum(0)
    column = column.view(layout.nodes, -1, partial.shape[1])
    mine = column[layout.node]
    if layout.nodes > 1:
        others = torch.cat([column[n] for n in range(layout.nodes) if n != layout.node]).to(partial.dtype)
        arrived = _swap(others, layout.peers, world, group, f"combine{where} (sum across nodes)")
        mine = mine + arrived.view(layout.nodes - 1, *mine.shape).float().sum(0)
    return mine.to(partial.dtype)


@dataclass
class _Sent:
    num_tokens: int
    padded_tokens: int
    rows: torch.Tensor  # [world * P, H] every rank's rows
    pair_row: torch.Tensor  # [world * P * k]
    local_slot: torch.Tensor  # [world * P * k] slot here, -1 where another rank computes the pair
    weights: torch.Tensor  # [world * P * k]
    mine: torch.Tensor  # [world * P * k] bool: computed here
    top_k: int
    where: str
    partial_bytes: int = 0


class GatherExchange(Exchange):
    """Inference only. padded_tokens (set per call, `for_call`) >= every rank's token count. `layout`
    (NodeLayout.of this rank): across nodes then inside them, the in-node stages over `node_group` when
    given; None: one all-gather and one reduce-scatter over all ranks."""

    name = CommMode.GATHER.value

    def __init__(self, topology: Topology, rank: int, slots_per_gpu: int, group=None, layout: NodeLayout | None = None,
                 node_group: NodeGroup | None = None) -> None:
        self.topology, self.rank, self.slots_per_gpu, self.group = topology, rank, slots_per_gpu, group
        self.layout, self.node_group = layout, node_group
        self.padded_tokens = 0

    def for_call(self, padded_tokens: int) -> "GatherExchange":
        """This exchange with every rank's rows padded to `padded_tokens` (the largest rank's count)."""
        self.padded_tokens = padded_tokens
        return self

    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, where: str) -> _Sent:
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise RuntimeError("the gather exchange is for inference; run under torch.no_grad() or use flat/hierarchical")
        num_tokens, top_k = slot_ids.shape
        padded, world = self.padded_tokens, self.topology.num_gpus
        if padded < num_tokens:
            raise ValueError(f"padded_tokens {padded} < this rank's {num_tokens} tokens")
        packed = _pack(hidden, slot_ids, weights, padded)
        if self.layout is not None:
            gathered = _gather_by_node(packed, self.layout, world, self.group, where, self.node_group)
        else:
            gathered = packed.new_empty((world * padded, packed.shape[1]))
            guarded(f"dispatch{where} (gather)", self.group, _all_gather_rows, gathered, packed, group=self.group)
        rows, slots, pair_weights = _unpack(gathered, hidden.dtype, hidden.shape[1], top_k)
        flat_slot = slots.reshape(-1).long()
        mine = (flat_slot >= 0) & (flat_slot // self.slots_per_gpu == self.rank)
        return _Sent(num_tokens, padded, rows,
                     torch.arange(rows.shape[0], device=rows.device).repeat_interleave(top_k),
                     torch.where(mine, flat_slot % self.slots_per_gpu, -1), pair_weights.reshape(-1), mine, top_k, where)

    def compute(self, sent: _Sent, experts: ExpertCompute) -> torch.Tensor:
        """Every gathered pair, slot -1 where another rank computes it (SlotExperts skips those on the
        device: no host synchronisation)."""
        return experts.weighted_sum(sent.rows, sent.pair_row, sent.local_slot, sent.weights, pairs_by_row=True)

    def combine(self, sent: _Sent, own: torch.Tensor | None, arrived: torch.Tensor) -> torch.Tensor:
        where = sent.where
        sent.partial_bytes = arrived.shape[1] * arrived.element_size()
        if self.layout is not None:
            out = _sum_by_node(arrived, self.layout, self.topology.num_gpus, self.group, where, self.node_group)
        else:
            out = arrived.new_empty((sent.padded_tokens, arrived.shape[1]))
            guarded(f"combine{where} (reduce-scatter)", self.group, _reduce_scatter_rows, out, arrived, group=self.group)
        return out[:sent.num_tokens]

    def count(self, sent: _Sent, traffic: Traffic) -> None:
        bytes_to = cost.gather_bytes_per_link(self.topology, sent.padded_tokens, sent.top_k, sent.partial_bytes,
                                              self.layout is not None)[self.rank]
        traffic.add_sent([int(b) for b in bytes_to.tolist()], self.rank, self.topology.node_of_gpu.tolist())
        traffic.pairs_computed += int(sent.mine.sum())
