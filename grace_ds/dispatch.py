"""Token exchange for expert parallelism: flat, or hierarchical across nodes.

Every exchange is a `Hop`: rows (token hidden states) go to ranks, each row at most once per rank
however many of its (token, expert) pairs that rank serves; pairs travel beside the rows as small
integer records. Results come back the same way, pre-reduced per row on the receiving rank.

flat          one hop: each row goes straight to the GPU holding the chosen copy.
hierarchical  hop 1 sends a row once per remote node, to the peer GPU with the same local index (and
              directly to GPUs of its own node); hop 2 fans it out inside that node (over the node's own
              process group when given one, grace_ds.node_groups). The combine runs backwards and sums a
              token's partial outputs on the node before they cross back.
Each hop costs one all-to-all of split sizes, then one of rows and one of pair records; the combine one
more of rows. The host waits for the split sizes alone, once per exchange: hierarchical sends hop 2's
with hop 1's, so the host queues both hops, the experts and the combine while hop 1's rows cross. A
rank's rows for itself skip the all-to-all and its experts compute them while the other rows cross
(hierarchical: hop 1's arrivals for this GPU while hop 2 fans out). Works on gloo (CPU) and NCCL (GPU).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from grace_ds.faults import guarded
from grace_ds.node_groups import NodeGroup
from grace_ds.topology import Topology

COMM_MODES = ("flat", "hierarchical", "gather", "auto")  # gather: grace_ds.dispatch_gather
# Pair record columns (int32: half the bytes of int64 on every hop): row index within the sender's chunk
# for this rank, final GPU, local slot, routing weight (float32 bits).
_ROW, _TARGET, _SLOT, _WEIGHT = range(4)
_RECORD_BYTES = 4 * torch.int32.itemsize
_WEIGHT_BYTES = torch.float32.itemsize  # a pair's differentiable weight, sent beside its record in training


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single with split sizes whose gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, phase: str) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.phase = send_splits, recv_splits, group, phase
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        guarded(phase, group, dist.all_to_all_single, out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        guarded(f"backward of {ctx.phase}", ctx.group, dist.all_to_all_single, back, grad.contiguous(),
                ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None, None


def all_to_all_rows(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                    phase: str = "dispatch") -> torch.Tensor:
    return _AllToAllRows.apply(rows, send_splits, recv_splits, group, phase)


@dataclass
class KnownCounts:
    """A hop's split sizes, known before it starts: recv_counts [world, 3] (rows, pairs, pairs ending
    there, from each rank) on the device; on the host (send rows, send pairs, recv rows, recv pairs,
    recv pairs ending here), each a list over ranks."""

    recv_counts: torch.Tensor
    host: tuple[list[int], list[int], list[int], list[int], list[int]]


@dataclass
class Hop:
    """One exchange. After `Hop.send`, `rows` [M, H] and `pairs` [Q, 4] are what this rank received from
    the other ranks; pairs[:, _ROW] indexes `rows`, and pairs come sorted by it (so do own_pairs and both
    halves of split_final) when the sent pairs were sorted by row, as a layer's are. A rank's share for
    itself never enters the all-to-all: `own_rows` and `own_pairs` hold it, and `own_results` what
    `overlap` computed while the rows were in flight (on them, or, for a hop that keeps nothing for
    itself, other work). `return_rows` sends per-received-row results back and gives the sender its
    per-row sums, own results included unless told otherwise."""

    rows: torch.Tensor
    pairs: torch.Tensor
    sent_row_source: torch.Tensor  # [R_sent]: sender's row index of each row sent to another rank
    send_row_splits: list[int]
    recv_row_splits: list[int]
    send_pair_splits: list[int]  # pair records sent to each rank
    group: object
    own_row_source: torch.Tensor  # [R_own]: this rank's row index of each row it keeps for itself
    own_rows: torch.Tensor  # [R_own, H]
    own_pairs: torch.Tensor  # [Q_own, 4], _ROW indexing own_rows
    own_results: torch.Tensor | None = None  # what `overlap` returned, when given
    num_final_pairs: int = 0  # received pairs whose final GPU is this rank
    where: str = ""  # names the layer in fault messages
    # Extra count columns the senders sent with the split sizes (`extra` of Hop.send): [world, X] on the
    # device, and on the host as X lists over senders.
    extra_received: torch.Tensor | None = None
    extra_received_host: list[list[int]] | None = None
    # Under autograd the routing weights travel as a float tensor of their own ([Q] and [Q_own], aligned
    # with pairs and own_pairs), so the gate's gradient flows back through the exchange; the copies in the
    # records' weight column are bits, outside autograd.
    pair_weights: torch.Tensor | None = None
    own_pair_weights: torch.Tensor | None = None

    def split_final(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pairs computed here, their weights, pairs to forward, their weights), without a host
        synchronisation."""
        onward = self.pairs[:, _TARGET] != rank
        order = torch.argsort(onward.to(torch.uint8), stable=True)
        final, forward = order[:self.num_final_pairs], order[self.num_final_pairs:]
        weights = self.weights
        return self.pairs[final], weights[final], self.pairs[forward], weights[forward]

    @classmethod
    def send(cls, rows: torch.Tensor, pair_row: torch.Tensor, pair_next: torch.Tensor, pair_target: torch.Tensor,
             pair_slot: torch.Tensor, pair_weight: torch.Tensor, world: int, rank: int, group, where: str = "",
             overlap: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             extra: torch.Tensor | None = None, known: "KnownCounts | None" = None) -> "Hop":
        """rows [R, H]; per pair: the row it belongs to, the rank it goes to next, its final GPU, the
        local slot there and its routing weight. Every size is computed on the device and crosses to
        the host once, with the split-size exchange: on a GPU nothing else waits for the stream.
        `overlap(own_rows, own_pairs, own_weights)`, when given, runs while the other ranks' rows are in
        flight (without autograd; with it, after they arrived) and its result becomes `own_results`.
        Under autograd (rows or weights need a gradient) rows and weights cross by differentiable
        all-to-alls, whose backward is the reverse exchange.
        `extra` [world, X]: more counts for each rank, sent with the split sizes (`extra_received`).
        `known`: the split sizes already on both sides (sent ahead with an earlier hop's): no exchange."""
        device = rows.device
        stride = max(rows.shape[0], 1)
        pair_row, pair_next = pair_row.long(), pair_next.long()  # keys past int32, and scatter's index type
        # One sent row per distinct (next rank, row); sorting the keys groups them by next rank, and the
        # stable sort keeps each row's pairs in their order: the records go out in this order.
        key = pair_next * stride + pair_row
        key_order = torch.argsort(key, stable=True)
        sorted_key = key[key_order]
        sorted_next = sorted_key // stride
        is_first = torch.ones_like(sorted_key, dtype=torch.bool)
        is_first[1:] = sorted_key[1:] != sorted_key[:-1]
        sent_of_sorted = torch.cumsum(is_first, 0) - 1
        zeros = torch.zeros(world, dtype=torch.long, device=device)
        row_counts = zeros.scatter_add(0, sorted_next, is_first.long())
        pair_counts = zeros.scatter_add(0, pair_next, torch.ones_like(pair_next))
        final_counts = zeros.scatter_add(0, pair_next, (pair_target == pair_next).long())
        chunk_start = torch.cumsum(row_counts, 0) - row_counts
        columns = torch.stack([pair_target.int(), pair_slot.int(), pair_weight.float().view(torch.int32)], 1)
        records = torch.cat([(sent_of_sorted - chunk_start[sorted_next]).int().unsqueeze(1), columns[key_order]], 1)
        phase = f"dispatch{where}"
        extra_received = extra_host = None
        if known is None:
            counts = torch.stack([row_counts, pair_counts, final_counts], 1)
            if extra is not None:
                counts = torch.cat([counts, extra], 1)
            recv_counts = torch.empty_like(counts)
            guarded(phase, group, dist.all_to_all_single, recv_counts, counts, group=group)
            both = torch.cat([counts, recv_counts], 1).T.tolist()  # the one host synchronisation of this hop
            columns = counts.shape[1]
            send_rows, send_pairs = both[0], both[1]
            recv_rows, recv_pairs, recv_finals = both[columns:columns + 3]
            extra_received, extra_host = recv_counts[:, 3:], both[columns + 3:]
            recv_counts = recv_counts[:, :3].clone()
        else:
            recv_counts = known.recv_counts
            send_rows, send_pairs, recv_rows, recv_pairs, recv_finals = (list(x) for x in known.host)
        num_sent = sum(send_rows)
        # Source row of each sent row, scattered into place; pairs that repeat a row write a spare entry.
        sent_source = rows.new_empty(num_sent + 1, dtype=torch.long)
        sent_source.scatter_(0, torch.where(is_first, sent_of_sorted, num_sent), sorted_key % stride)
        sent_source = sent_source[:num_sent]
        # This rank's own chunk stays here: out of the all-to-all, computed beside it.
        own_from, own_pairs_from = sum(send_rows[:rank]), sum(send_pairs[:rank])
        own_to, own_pairs_to = own_from + send_rows[rank], own_pairs_from + send_pairs[rank]
        own_source = sent_source[own_from:own_to]
        own_pairs = records[own_pairs_from:own_pairs_to]
        sent_source = torch.cat([sent_source[:own_from], sent_source[own_to:]])
        records = torch.cat([records[:own_pairs_from], records[own_pairs_to:]])
        send_rows[rank] = send_pairs[rank] = recv_rows[rank] = recv_pairs[rank] = 0
        recv_counts[rank] = 0
        received_pairs = records.new_empty((sum(recv_pairs), 4))
        own_rows, own_results = rows[own_source], None
        received_weights = own_weights = None
        if torch.is_grad_enabled() and (rows.requires_grad or pair_weight.requires_grad):
            # Training: the autograd exchange, then own work.
            received_rows = all_to_all_rows(rows[sent_source], send_rows, recv_rows, group, phase)
            guarded(phase, group, dist.all_to_all_single, received_pairs, records.contiguous(), recv_pairs, send_pairs,
                    group=group)
            sorted_weights = pair_weight.float()[key_order]
            own_weights = sorted_weights[own_pairs_from:own_pairs_to]
            received_weights = all_to_all_rows(
                torch.cat([sorted_weights[:own_pairs_from], sorted_weights[own_pairs_to:]]), send_pairs, recv_pairs,
                group, phase)
            if overlap is not None:
                own_results = overlap(own_rows, own_pairs, own_weights)
        else:
            received_rows = rows.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
            works = [guarded(phase, group, dist.all_to_all_single, received_rows, rows[sent_source].contiguous(),
                             recv_rows, send_rows, group=group, async_op=True),
                     guarded(phase, group, dist.all_to_all_single, received_pairs, records.contiguous(), recv_pairs,
                             send_pairs, group=group, async_op=True)]
            if overlap is not None:
                own_results = overlap(own_rows, own_pairs, _weights_of(own_pairs))
            for work in works:
                guarded(phase, group, work.wait)
        # Row index within the source's chunk -> index into received_rows.
        row_offset = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        source = torch.repeat_interleave(torch.arange(world, device=device), recv_counts[:, 1],
                                         output_size=received_pairs.shape[0])
        received_pairs[:, _ROW] += row_offset[source]
        return cls(received_rows, received_pairs, sent_source, send_rows, recv_rows, send_pairs, group, own_source,
                   own_rows, own_pairs, own_results, sum(recv_finals) - recv_finals[rank], where, extra_received,
                   extra_host, received_weights, own_weights)

    @property
    def weights(self) -> torch.Tensor:
        """[Q] routing weight of each received pair (an autograd tensor when the hop ran under autograd)."""
        return self.pair_weights if self.pair_weights is not None else _weights_of(self.pairs)

    def return_rows(self, results: torch.Tensor, num_source_rows: int, add_own: bool = True) -> torch.Tensor:
        """results [M, H] per received row -> [num_source_rows, H] summed per sender row, this rank's own
        results (own_results [R_own, H]) added when `add_own`."""
        back = all_to_all_rows(results, self.recv_row_splits, self.send_row_splits, self.group, f"combine{self.where}")
        out = back.new_zeros((num_source_rows,) + tuple(back.shape[1:]))
        out = out.index_add(0, self.sent_row_source, back)
        if add_own and self.own_results is not None:
            out = out.index_add(0, self.own_row_source, self.own_results.to(out.dtype))
        return out


def _weights_of(pairs: torch.Tensor) -> torch.Tensor:
    return pairs[:, _WEIGHT].view(torch.float32)


# (rows [M, H], local slot [M]) -> [M, H]; SlotExperts adds weighted_sum, which the exchanges prefer.
ExpertCompute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Traffic:
    """What this rank sent (dispatch and combine) and computed; filled by exchange_and_compute."""

    cross_node_bytes: int = 0
    intra_node_bytes: int = 0
    pairs_computed: int = 0

    def add_hop(self, hop: "Hop", rank: int, node_of_gpu: list[int], row_bytes: int) -> None:
        # Rows and their pair records out (under autograd, the float weights beside them), and results
        # back for the rows received.
        pair_bytes = _RECORD_BYTES + (_WEIGHT_BYTES if hop.pair_weights is not None else 0)
        self.add_sent([(sent + returned) * row_bytes + records * pair_bytes
                       for sent, returned, records in zip(hop.send_row_splits, hop.recv_row_splits,
                                                          hop.send_pair_splits)],
                      rank, node_of_gpu)

    def add_sent(self, bytes_to: list[int], rank: int, node_of_gpu: list[int]) -> None:
        """bytes_to[g]: what this rank sent to rank g; counted as intra- or cross-node, itself left out."""
        for other, moved in enumerate(bytes_to):
            if other == rank:
                continue
            if node_of_gpu[other] == node_of_gpu[rank]:
                self.intra_node_bytes += moved
            else:
                self.cross_node_bytes += moved


def _compute_pairs(rows: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, compute: ExpertCompute) -> torch.Tensor:
    """Weighted expert outputs of `pairs`, summed per row of `rows`. Expert modules with `weighted_sum`
    (SlotExperts) gather and sum by index maps; any other callable gets the pairs' rows and slots."""
    if pairs.shape[0] == 0:
        # Keeps the graph connected on idle ranks: every exchange's backward is a collective all ranks join.
        return rows.new_zeros(rows.shape) + 0.0 * rows.sum() + 0.0 * weights.sum().to(rows.dtype)
    row, slot = pairs[:, _ROW].long(), pairs[:, _SLOT].long()
    fused = getattr(compute, "weighted_sum", None)
    if fused is not None:
        return fused(rows, row, slot, weights, pairs_by_row=True)  # Hop delivers pairs by row
    expert_out = compute(rows[row], slot)
    out = rows.new_zeros(rows.shape)
    return out.index_add(0, row, (expert_out * weights.unsqueeze(-1).to(expert_out.dtype)).to(out.dtype))


@functools.lru_cache(maxsize=16)
def _device_tables(topology: Topology, device: torch.device) -> tuple[torch.Tensor, ...]:
    """node of each GPU, first GPU of each node, GPUs per node, local index of each GPU, on `device`;
    copied once, since a copy from host memory to a GPU waits for its stream."""
    return (topology.node_of_gpu.to(device), topology.first_gpu_of_node.to(device),
            torch.tensor(topology.gpus_per_node, device=device), topology.local_index_of_gpu.to(device))


def exchange_and_compute(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                         slots_per_gpu: int, topology: Topology, rank: int, compute: ExpertCompute,
                         mode: str = "flat", group=None, traffic: Traffic | None = None, where: str = "",
                         node_group: NodeGroup | None = None) -> torch.Tensor:
    """hidden [N, H] this rank's tokens; slot_ids [N, k] physical slots chosen by the replica router;
    topk_weights [N, k] the gate's weights. Returns sum_k weight * expert(hidden) per token, [N, H].
    `traffic`, when given, accumulates this rank's bytes sent and pairs computed; `where` (" of layer 3")
    goes into fault messages; `node_group`, when given, carries hierarchical hop 2 (inside the node)."""
    world = topology.num_gpus
    device = hidden.device
    num_tokens, top_k = slot_ids.shape
    pair_row = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    flat_slots = slot_ids.reshape(-1)
    target = flat_slots // slots_per_gpu
    local_slot = flat_slots % slots_per_gpu
    weight = topk_weights.reshape(-1)
    node_of_gpu, first_gpu, per_node, _ = _device_tables(topology, device)
    row_bytes = hidden.shape[1] * hidden.element_size()

    def own_work(rows: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return _compute_pairs(rows, pairs, weights, compute)

    if mode == "flat" or topology.num_nodes == 1:
        hop = Hop.send(hidden, pair_row, target, target, local_slot, weight, world, rank, group, where, own_work)
        if traffic is not None:
            traffic.add_hop(hop, rank, topology.node_of_gpu.tolist(), row_bytes)
            traffic.pairs_computed += hop.pairs.shape[0] + hop.own_pairs.shape[0]
        results = _compute_pairs(hop.rows, hop.pairs, hop.weights, compute)
        return hop.return_rows(results, num_tokens)
    if mode != "hierarchical":
        raise ValueError(f"communication mode must be flat or hierarchical here, got {mode!r}")
    # Hop 1: same-node targets directly, other nodes through the peer with this rank's local index; this
    # rank's own pairs are computed while the rows cross.
    my_local = int(topology.local_index_of_gpu[rank])
    target_node = node_of_gpu[target]
    peer = first_gpu[target_node] + my_local % per_node[target_node]
    next_rank = torch.where(target_node == node_of_gpu[rank], target, peer)
    hop1 = Hop.send(hidden, pair_row, next_rank, target, local_slot, weight, world, rank, group, where, own_work,
                    extra=_onward_counts(pair_row, next_rank, target, num_tokens, world))
    final, final_weights, onward, onward_weights = hop1.split_final(rank)
    known = _fan_out_counts(hop1, rank, topology, node_group)
    # Hop 2: fan the rows that came across out to their GPUs inside this node; the pairs that ended
    # here are computed while they travel (hop 2 keeps no rows for itself: its own work is those pairs).
    def final_work(*own_share: torch.Tensor) -> torch.Tensor:
        return _compute_pairs(hop1.rows, final, final_weights, compute)

    fan_out = f"{where}, fan-out in the node"
    if node_group is None:
        hop2 = Hop.send(hop1.rows, onward[:, _ROW], onward[:, _TARGET], onward[:, _TARGET], onward[:, _SLOT],
                        onward_weights, world, rank, group, fan_out, final_work, known=known)
    else:  # the same hop numbered within the node's group
        inside = node_group.to_local(onward[:, _TARGET])
        hop2 = Hop.send(hop1.rows, onward[:, _ROW], inside, inside, onward[:, _SLOT], onward_weights,
                        node_group.size, node_group.local, node_group.group, fan_out, final_work, known=known)
    results2 = _compute_pairs(hop2.rows, hop2.pairs, hop2.weights, compute)
    if traffic is not None:
        traffic.add_hop(hop1, rank, topology.node_of_gpu.tolist(), row_bytes)
        if node_group is None:
            traffic.add_hop(hop2, rank, topology.node_of_gpu.tolist(), row_bytes)
        else:
            traffic.add_hop(hop2, node_group.local, [0] * node_group.size, row_bytes)
        traffic.pairs_computed += hop1.own_pairs.shape[0] + final.shape[0] + hop2.pairs.shape[0]
    # Pre-reduce on this node: fan-out results join this rank's own before crossing back.
    results = hop2.own_results + hop2.return_rows(results2, hop1.rows.shape[0], add_own=False)
    return hop1.return_rows(results, num_tokens)


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
    peer_of_sender = [first + local % size for local in topology.local_index_of_gpu.tolist()]
    send_rows = [sum(host[g]) for g in range(world)]
    send_pairs = [sum(host[world + g]) for g in range(world)]
    recv_rows, recv_pairs = [0] * world, [0] * world
    for sender, peer in enumerate(peer_of_sender):
        recv_rows[peer] += host[2 * world][sender]
        recv_pairs[peer] += host[2 * world + 1][sender]
    _, first_gpu, per_node, local_of_gpu = _device_tables(topology, hop1.rows.device)
    peer_tensor = first_gpu[node] + local_of_gpu % per_node[node]
    received = hop1.extra_received[:, 2 * world:]  # [senders, 2]: rows, pairs
    recv = torch.zeros_like(received).index_add_(0, peer_tensor, received)
    recv_counts = torch.cat([recv, recv[:, 1:]], 1)  # every hop-2 pair ends where it arrives
    lists = (send_rows, send_pairs, recv_rows, recv_pairs, recv_pairs)
    if node_group is not None:  # numbered within the node's group
        recv_counts = recv_counts[first:first + size]
        lists = tuple(x[first:first + size] for x in lists)
    return KnownCounts(recv_counts.contiguous(), lists)


def choose_mode(mode: str, topology: Topology, modeled_us: dict[str, float] | None = None) -> str:
    """`auto`: the mode with the lower modeled layer time (the simulator's cost model on the profile's
    sampled routings, stored in the plan by `grace-ds plan`); without those figures, hierarchical when
    there is more than one node and more than one GPU per node, where it never sends more cross-node
    copies than flat, and flat otherwise, where it would only add a hop. Under `auto` the runtime still
    goes flat or gather for calls with few tokens (GraceRuntime.mode_for)."""
    if mode not in COMM_MODES:
        raise ValueError(f"communication mode must be one of {COMM_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if modeled_us and {"flat", "hierarchical"} <= set(modeled_us):
        return min(("flat", "hierarchical"), key=lambda m: modeled_us[m])
    return "hierarchical" if topology.num_nodes > 1 and max(topology.gpus_per_node) > 1 else "flat"
