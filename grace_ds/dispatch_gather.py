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
from grace_ds.node_groups import NodeGroup
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


def gather_and_compute(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor, slots_per_gpu: int,
                       rank: int, world: int, padded_tokens: int, compute, group=None, traffic=None,
                       node_of_gpu: list[int] | None = None, where: str = "", layout: NodeLayout | None = None,
                       node_group: NodeGroup | None = None) -> torch.Tensor:
    """hidden [N, H] this rank's tokens; slot_ids [N, k] physical slots from the replica router; topk_weights
    [N, k]; padded_tokens >= every rank's N. Returns sum_k weight * expert(hidden) per token, [N, H].
    Expert modules with `weighted_sum` (SlotExperts) get every gathered pair, slot -1 where another rank
    computes it (no host synchronisation); a plain `compute(rows, slot)` gets only this rank's pairs.
    layout (NodeLayout.of this rank): across nodes then inside them, the in-node stages over `node_group`
    when given; None: one all-gather and one reduce-scatter over all ranks."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise RuntimeError("the gather exchange is for inference; run under torch.no_grad() or use flat/hierarchical")
    num_tokens, top_k = slot_ids.shape
    if padded_tokens < num_tokens:
        raise ValueError(f"padded_tokens {padded_tokens} < this rank's {num_tokens} tokens")
    node_of_gpu = node_of_gpu or [0] * world
    packed = _pack(hidden, slot_ids, topk_weights, padded_tokens)
    if layout is not None:
        gathered = _gather_by_node(packed, layout, world, group, where, node_group)
    else:
        gathered = packed.new_empty((world * padded_tokens, packed.shape[1]))
        guarded(f"dispatch{where} (gather)", group, _all_gather_rows, gathered, packed, group=group)
    rows, slots, weights = _unpack(gathered, hidden.dtype, hidden.shape[1], top_k)
    flat_slot = slots.reshape(-1).long()
    mine = (flat_slot >= 0) & (flat_slot // slots_per_gpu == rank)
    local_slot = torch.where(mine, flat_slot % slots_per_gpu, -1)
    pair_row = torch.arange(rows.shape[0], device=rows.device).repeat_interleave(top_k)
    fused = getattr(compute, "weighted_sum", None)
    if fused is not None:  # skips slot -1 on the device: no host synchronisation
        partial = fused(rows, pair_row, local_slot, weights.reshape(-1), pairs_by_row=True)
    else:  # arbitrary expert modules: compute this rank's pairs alone (finding them waits for the device)
        pick = mine.nonzero().flatten()
        expert_out = compute(rows[pair_row[pick]], local_slot[pick])
        partial = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        partial = partial.index_add(0, pair_row[pick], expert_out.float() * weights.reshape(-1)[pick].unsqueeze(-1))
        partial = partial.to(hidden.dtype)
    if layout is not None:
        out = _sum_by_node(partial, layout, world, group, where, node_group)
    else:
        out = partial.new_empty((padded_tokens, partial.shape[1]))
        guarded(f"combine{where} (reduce-scatter)", group, _reduce_scatter_rows, out, partial, group=group)
    if traffic is not None:
        traffic.add_sent(_bytes_to(layout, world, padded_tokens, packed.shape[1], partial.shape[1] * partial.element_size()),
                         rank, node_of_gpu)
        traffic.pairs_computed += int(mine.sum())
    return out[:num_tokens]


def _bytes_to(layout: NodeLayout | None, world: int, padded_tokens: int, packed_bytes: int, partial_bytes: int) -> list[int]:
    """Bytes this rank sends each rank: rows out and partial outputs back. Ring: logically its own rows to
    everyone (NCCL relays them). Hierarchical: its rows and a partial per peer; its node's column to each mate."""
    per_row = packed_bytes + partial_bytes
    if layout is None:
        return [padded_tokens * per_row] * world
    sent = [0] * world
    for peer in layout.peers:
        sent[peer] = padded_tokens * per_row
    for mate in layout.mates:
        sent[mate] = layout.nodes * padded_tokens * per_row
    return sent
