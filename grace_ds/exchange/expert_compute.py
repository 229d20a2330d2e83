"""What the exchanges ask of this rank's experts: weighted sums over (row, slot) pairs.

Every exchange calls `weighted_sum` alone. SlotExperts (grace_ds.experts) computes it fused; any plain
`(rows [M, H], slot [M]) -> [M, H]` callable is wrapped by `as_expert_compute` into PairwiseExperts,
which runs the callable on the pairs this rank serves.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from grace_ds.exchange.hop import ROW, SLOT


@runtime_checkable
class ExpertCompute(Protocol):
    """rows [R, H]; per (token, expert) pair its row, local slot (-1: another rank computes it) and routing
    weight; returns sum over pairs of weight * expert(row) per row, [R, H] in rows' dtype. pairs_by_row:
    the pairs come sorted by row (every exchange delivers them so)."""

    capturable: bool  # may run inside a CUDA graph (the graphed gather)

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor: ...

    def slot_tensors(self) -> list[torch.Tensor]: ...  # the parameters it trains ([]: none)


def pairwise_weighted_sum(expert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: torch.Tensor,
                          pair_row: torch.Tensor, pair_slot: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """weighted_sum for an arbitrary `expert(rows, slot)`: it gets the pairs this rank serves (finding them
    waits for the device), their outputs summed per row in float32."""
    pick = (pair_slot >= 0).nonzero().flatten()
    expert_out = expert(rows[pair_row[pick]], pair_slot[pick])
    out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    weighted = expert_out.float() * pair_weight[pick].float().unsqueeze(-1)
    return out.index_add(0, pair_row[pick], weighted).to(rows.dtype)


class PairwiseExperts:
    """A plain expert callable as an ExpertCompute (trains nothing the runtime ties, never captured)."""

    capturable = False

    def __init__(self, expert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.expert = expert

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor:
        return pairwise_weighted_sum(self.expert, rows, pair_row, pair_slot, pair_weight)

    def slot_tensors(self) -> list[torch.Tensor]:
        return []


# Per class: whether its instances are ExpertCompute. A protocol isinstance check takes ~11 us, and this
# runs in every MoE call of a forward.
_CONFORMS: dict[type, bool] = {}


def as_expert_compute(experts) -> ExpertCompute:
    """`experts` itself when it is one, else a plain callable wrapped."""
    conforms = _CONFORMS.get(type(experts))
    if conforms is None:
        conforms = _CONFORMS[type(experts)] = isinstance(experts, ExpertCompute)
    if conforms:
        return experts
    if hasattr(experts, "weighted_sum"):
        raise TypeError(f"{type(experts).__name__} has weighted_sum but not the rest of ExpertCompute "
                        f"(capturable, slot_tensors)")
    if not callable(experts):
        raise TypeError(f"experts must have weighted_sum or be callable (rows, slot) -> rows, got {type(experts).__name__}")
    return PairwiseExperts(experts)


def trains(experts: ExpertCompute) -> bool:
    """Whether the experts read parameters that want a gradient."""
    return any(t.requires_grad for t in experts.slot_tensors())


def compute_pairs(experts: ExpertCompute, rows: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs of a hop's `pairs` ([Q, 4] records, weights [Q]) summed per row of `rows`."""
    if pairs.shape[0] == 0:
        # Keeps the graph connected on idle ranks: every exchange's backward is a collective all ranks join.
        return rows.new_zeros(rows.shape) + 0.0 * rows.sum() + 0.0 * weights.sum().to(rows.dtype)
    return experts.weighted_sum(rows, pairs[:, ROW].long(), pairs[:, SLOT].long(), weights, pairs_by_row=True)
