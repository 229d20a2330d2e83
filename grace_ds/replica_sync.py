"""Replicated experts train as one expert: one gradient per logical expert, every copy equal after a step.

A plan may hold several copies of a logical expert (its primary and replicas, on different GPUs). Each
copy's gradient covers only the (token, expert) pairs routed to it; the logical expert's gradient is
their sum. `ReplicaSync` makes the copies one trainable expert:
- backward: `tie` puts an identity on a layer's input and slot tensors; its backward adds every copy's
  gradient into its primary's and zeroes the replicas' (one all-reduce over the expert-parallel group
  per layer with replicas, a row per replicated expert). Optimizers, ZeRO partitions, gradient clipping
  and every norm then see one gradient per logical expert, wherever it lives;
- after each optimizer step: `sync_weights` copies every primary's weights into its replicas (one
  all-reduce per layer), so whatever an optimizer did to a replica (weight decay, stale moments) is undone
  and every copy serves the same expert in the next forward.
The tie sits on the layer's input, so its backward runs on every rank of the group at the same point
(after the whole backward of the layer's exchange and experts, before the layers below), whether or not
a rank computed any pair.

Expert holders (SlotExperts, GraceMoE's per-slot modules) provide `slot_tensors()` (the parameters the
computation reads), `copy_views(tensors, slot)` (the part of those tensors, or of their gradients, that
belongs to one slot's copy) and `bind(tensors)` (the same computation reading other tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.faults import guarded
from grace_ds.plan import PlacementPlan


@runtime_checkable
class SlotHolder(Protocol):
    def slot_tensors(self) -> list[torch.Tensor]: ...

    def copy_views(self, tensors: list[torch.Tensor], slot: int) -> list[torch.Tensor]: ...

    def bind(self, params: list[torch.Tensor]): ...


@dataclass(frozen=True)
class _Copy:
    row: int  # the copy's expert among the layer's replicated experts (its row of the layer's buffer)
    slot: int  # local slot on this rank
    primary: bool


def _distributed(group) -> bool:
    return faults.distributed() and dist.get_world_size(group) > 1


class ReplicaSync:
    """What this rank holds of every replicated expert of the plan: per layer with replicas, its copies."""

    def __init__(self, plan: PlacementPlan, rank: int) -> None:
        copies_per_expert = plan.copies_per_expert()
        self.num_rows: dict[int, int] = {}  # plan layer -> replicated experts in it (the same on every rank)
        self.copies: dict[int, list[_Copy]] = {}  # plan layer -> this rank's copies of them
        # plan layer -> one occupied local slot (every expert of a layer has the same size), or None when
        # some GPU holds no expert in the layer: then every rank learns the size from the others.
        self.sizing_slot: dict[int, int | None] = {}
        for layer in range(plan.num_layers):
            replicated = (copies_per_expert[layer] > 1).nonzero().flatten().tolist()
            if not replicated:
                continue
            row_of = {expert: row for row, expert in enumerate(replicated)}
            held = plan.slot_expert[layer, rank].tolist()
            primary = plan.slot_is_primary[layer, rank].tolist()
            self.num_rows[layer] = len(replicated)
            self.copies[layer] = [_Copy(row_of[e], slot, bool(primary[slot])) for slot, e in enumerate(held) if e in row_of]
            every_gpu_holds_one = bool((plan.slot_expert[layer] >= 0).any(1).all())
            self.sizing_slot[layer] = next(slot for slot, e in enumerate(held) if e >= 0) if every_gpu_holds_one else None

    def replicated(self, layer: int) -> bool:
        return layer in self.num_rows

    def tie(self, layer: int, hidden: torch.Tensor, holder: SlotHolder, group=None):
        """(hidden, computation) to run the layer with: identities whose backward sums the copies'
        gradients into the primaries (see the module's docstring)."""
        tensors = holder.slot_tensors()
        tied = _TieReplicas.apply(self, layer, holder, group, hidden, *tensors)
        return tied[0], holder.bind(list(tied[1:]))

    def _buffer(self, layer: int, holder: SlotHolder, tensors: list[torch.Tensor], dtype: torch.dtype, fill: float,
                group, primaries_only: bool = False) -> torch.Tensor:
        """[replicated experts, values per copy]: this rank's copies of `tensors` (shaped as
        slot_tensors()) in their experts' rows, `fill` elsewhere."""
        slot = self.sizing_slot[layer]
        if slot is not None:
            width = sum(view.numel() for view in holder.copy_views(tensors, slot))
        else:
            local = torch.tensor([max((sum(v.numel() for v in holder.copy_views(tensors, c.slot))
                                       for c in self.copies[layer]), default=0)], device=tensors[0].device)
            if _distributed(group):
                guarded(f"replica sizes of layer {layer}", group, dist.all_reduce, local, op=dist.ReduceOp.MAX,
                        group=group)
            width = int(local)
        buffer = torch.full((self.num_rows[layer], width), fill, dtype=dtype, device=tensors[0].device)
        for copy in self.copies[layer]:
            if copy.primary or not primaries_only:
                buffer[copy.row] = torch.cat([view.reshape(-1).to(dtype) for view in holder.copy_views(tensors, copy.slot)])
        return buffer

    def sum_into_primaries(self, layer: int, holder: SlotHolder, grads: list[torch.Tensor], group=None) -> list[torch.Tensor]:
        """Gradients shaped as slot_tensors(): each primary's copy gets the sum over all copies of its
        expert, each replica's zero (float32 sums, one all-reduce)."""
        buffer = self._buffer(layer, holder, grads, torch.float32, 0.0, group)
        if _distributed(group):
            guarded(f"backward of layer {layer} (summing replica gradients)", group, dist.all_reduce, buffer, group=group)
        out = [grad.clone() for grad in grads]
        for copy in self.copies[layer]:
            views = holder.copy_views(out, copy.slot)
            for view, values in zip(views, _split(buffer[copy.row], views)):
                view.copy_(values if copy.primary else torch.zeros_like(values))
        return out

    @torch.no_grad()
    def sync_weights(self, holders: dict[int, SlotHolder], group=None) -> None:
        """Copy every primary's weights into its replicas (after each optimizer step)."""
        for layer in self.num_rows:
            holder = holders[layer]
            tensors = holder.slot_tensors()
            buffer = self._buffer(layer, holder, tensors, _common_dtype(tensors), 0.0, group, primaries_only=True)
            if _distributed(group):
                guarded(f"replica weights of layer {layer}", group, dist.all_reduce, buffer, group=group)
            for copy in self.copies[layer]:
                if not copy.primary:
                    views = holder.copy_views(tensors, copy.slot)
                    for view, values in zip(views, _split(buffer[copy.row], views)):
                        view.copy_(values)

    @torch.no_grad()
    def max_copy_difference(self, holders: dict[int, SlotHolder], group=None) -> float:
        """Largest absolute difference between two copies of one expert, over every layer (0.0: in sync)."""
        worst = 0.0
        for layer in self.num_rows:
            holder = holders[layer]
            tensors = holder.slot_tensors()
            high = self._buffer(layer, holder, tensors, torch.float64, -torch.inf, group)
            low = self._buffer(layer, holder, [-t for t in tensors], torch.float64, -torch.inf, group)
            if _distributed(group):
                for buffer in (high, low):
                    guarded(f"replica check of layer {layer}", group, dist.all_reduce, buffer, op=dist.ReduceOp.MAX,
                            group=group)
            worst = max(worst, float((high + low).max()))
        return worst


class _TieReplicas(torch.autograd.Function):
    """Identity on (hidden, *slot tensors); backward sums the copies' gradients into the primaries."""

    @staticmethod
    def forward(ctx, sync: ReplicaSync, layer: int, holder: SlotHolder, group, hidden: torch.Tensor,
                *tensors: torch.Tensor):
        ctx.sync, ctx.layer, ctx.holder, ctx.group = sync, layer, holder, group
        return (hidden.view_as(hidden), *(tensor.view_as(tensor) for tensor in tensors))

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor, *grads: torch.Tensor):
        summed = ctx.sync.sum_into_primaries(ctx.layer, ctx.holder, list(grads), ctx.group)
        return (None, None, None, None, grad_hidden, *summed)


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _split(values: torch.Tensor, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """values [sum of the views' sizes] -> pieces shaped and typed as `views`."""
    pieces = torch.split(values, [view.numel() for view in views])
    return [piece.view(view.shape).to(view.dtype) for piece, view in zip(pieces, views)]
