"""One exchange hop: rows to ranks, each row at most once per rank, pair records beside them.

A row (a token's hidden state) goes to a rank once however many of its (token, expert) pairs that rank
serves; pairs travel beside the rows as small integer records. Results come back the same way,
pre-reduced per row on the receiving rank (`return_rows`). A hop costs one all-to-all of split sizes
(the host waits for it, once), then one of rows and one of pair records; the combine one more of rows.
A rank's share for itself never enters the all-to-all: `Hop.start` posts the others and returns, the
caller computes the own share while they cross (the exchange's overlap step), then `wait`s.
Works on gloo (CPU) and NCCL (GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from grace_ds.faults import guarded

# Pair record columns (int32: half the bytes of int64 on every hop; grace_ds.cost.PAIR_RECORD_BYTES): row
# index within the sender's chunk for this rank, final GPU, local slot, routing weight (float32 bits).
ROW, TARGET, SLOT, WEIGHT = range(4)


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
    """One exchange. After `wait`, `rows` [M, H] and `pairs` [Q, 4] are what this rank received from the
    other ranks; pairs[:, ROW] indexes `rows`, and pairs come sorted by it (so do own_pairs and both
    halves of split_final) when the sent pairs were sorted by row, as a layer's are. A rank's share for
    itself never enters the all-to-all: `own_rows`, `own_pairs` and `own_weights` hold it from `start`
    on. `return_rows` sends per-received-row results back and gives the sender its per-row sums."""

    rows: torch.Tensor
    pairs: torch.Tensor
    sent_row_source: torch.Tensor  # [R_sent]: sender's row index of each row sent to another rank
    send_row_splits: list[int]
    recv_row_splits: list[int]
    send_pair_splits: list[int]  # pair records sent to each rank
    group: object
    own_row_source: torch.Tensor  # [R_own]: this rank's row index of each row it keeps for itself
    own_rows: torch.Tensor  # [R_own, H]
    own_pairs: torch.Tensor  # [Q_own, 4], ROW indexing own_rows
    own_weights: torch.Tensor  # [Q_own] their routing weights (autograd tensors under autograd)
    num_final_pairs: int = 0  # received pairs whose final GPU is this rank
    where: str = ""  # names the layer in fault messages
    # Extra count columns the senders sent with the split sizes (`extra` of Hop.start): [world, X] on the
    # device, and on the host as X lists over senders.
    extra_received: torch.Tensor | None = None
    extra_received_host: list[list[int]] | None = None
    # Under autograd the routing weights travel as a float tensor of their own ([Q], aligned with pairs),
    # so the gate's gradient flows back through the exchange; the copies in the records' weight column
    # are bits, outside autograd.
    pair_weights: torch.Tensor | None = None
    _pending: tuple = ()  # (async works, per-sender counts [world, 3]) until `wait`

    def split_final(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pairs computed here, their weights, pairs to forward, their weights), without a host
        synchronisation."""
        onward = self.pairs[:, TARGET] != rank
        order = torch.argsort(onward.to(torch.uint8), stable=True)
        final, forward = order[:self.num_final_pairs], order[self.num_final_pairs:]
        weights = self.weights
        return self.pairs[final], weights[final], self.pairs[forward], weights[forward]

    @classmethod
    def start(cls, rows: torch.Tensor, pair_row: torch.Tensor, pair_next: torch.Tensor, pair_target: torch.Tensor,
              pair_slot: torch.Tensor, pair_weight: torch.Tensor, world: int, rank: int, group, where: str = "",
              extra: torch.Tensor | None = None, known: "KnownCounts | None" = None) -> "Hop":
        """rows [R, H]; per pair: the row it belongs to, the rank it goes to next, its final GPU, the
        local slot there and its routing weight. Every size is computed on the device and crosses to
        the host once, with the split-size exchange: on a GPU nothing else waits for the stream. Returns
        with the rows and records in flight (without autograd; under autograd, where rows or weights
        need a gradient, they cross by differentiable all-to-alls, whose backward is the reverse
        exchange, and have arrived): compute the own share, then `wait`.
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
        received_weights, works = None, []
        if torch.is_grad_enabled() and (rows.requires_grad or pair_weight.requires_grad):
            received_rows = all_to_all_rows(rows[sent_source], send_rows, recv_rows, group, phase)
            guarded(phase, group, dist.all_to_all_single, received_pairs, records.contiguous(), recv_pairs, send_pairs,
                    group=group)
            sorted_weights = pair_weight.float()[key_order]
            own_weights = sorted_weights[own_pairs_from:own_pairs_to]
            received_weights = all_to_all_rows(
                torch.cat([sorted_weights[:own_pairs_from], sorted_weights[own_pairs_to:]]), send_pairs, recv_pairs,
                group, phase)
        else:
            received_rows = rows.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
            works = [guarded(phase, group, dist.all_to_all_single, received_rows, rows[sent_source].contiguous(),
                             recv_rows, send_rows, group=group, async_op=True),
                     guarded(phase, group, dist.all_to_all_single, received_pairs, records.contiguous(), recv_pairs,
                             send_pairs, group=group, async_op=True)]
            own_weights = weights_of(own_pairs)
        return cls(received_rows, received_pairs, sent_source, send_rows, recv_rows, send_pairs, group, own_source,
                   rows[own_source], own_pairs, own_weights, sum(recv_finals) - recv_finals[rank], where,
                   extra_received, extra_host, received_weights, (works, recv_counts))

    def wait(self) -> "Hop":
        """Waits for the rows and records (once), then numbers the received pairs' rows into `rows`."""
        if not self._pending:
            return self
        works, recv_counts = self._pending
        self._pending = ()
        for work in works:
            guarded(f"dispatch{self.where}", self.group, work.wait)
        # Row index within the source's chunk -> index into rows.
        world = recv_counts.shape[0]
        row_offset = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        source = torch.repeat_interleave(torch.arange(world, device=recv_counts.device), recv_counts[:, 1],
                                         output_size=self.pairs.shape[0])
        self.pairs[:, ROW] += row_offset[source]
        return self

    @property
    def weights(self) -> torch.Tensor:
        """[Q] routing weight of each received pair (an autograd tensor when the hop ran under autograd)."""
        return self.pair_weights if self.pair_weights is not None else weights_of(self.pairs)

    def return_rows(self, results: torch.Tensor, num_source_rows: int,
                    own_results: torch.Tensor | None = None) -> torch.Tensor:
        """results [M, H] per received row -> [num_source_rows, H] summed per sender row, with this rank's
        own results ([R_own, H], per own row) added when given."""
        back = all_to_all_rows(results, self.recv_row_splits, self.send_row_splits, self.group, f"combine{self.where}")
        out = back.new_zeros((num_source_rows,) + tuple(back.shape[1:]))
        out = out.index_add(0, self.sent_row_source, back)
        if own_results is not None:
            out = out.index_add(0, self.own_row_source, own_results.to(out.dtype))
        return out


def weights_of(pairs: torch.Tensor) -> torch.Tensor:
    """[Q] routing weights kept as float32 bits in the records' last column."""
    return pairs[:, WEIGHT].view(torch.float32)
