"""The flat exchange: one hop, each row straight to the GPU holding the chosen copy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from grace_ds.exchange.base import Exchange
from grace_ds.exchange.config import CommMode
from grace_ds.exchange.expert_compute import ExpertCompute, compute_pairs
from grace_ds.exchange.hop import Hop
from grace_ds.exchange.traffic import Traffic
from grace_ds.topology import Topology


@dataclass
class PairsOfRows:
    """A layer call's (token, expert) pairs, flattened: row, target GPU, local slot and weight per pair."""

    num_rows: int
    row: torch.Tensor  # [N * k]
    target: torch.Tensor  # [N * k] GPU holding the chosen copy
    slot: torch.Tensor  # [N * k] local slot there
    weight: torch.Tensor  # [N * k]
    row_bytes: int

    @classmethod
    def of(cls, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, slots_per_gpu: int) -> "PairsOfRows":
        num_tokens, top_k = slot_ids.shape
        flat_slots = slot_ids.reshape(-1)
        return cls(num_tokens, torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k),
                   flat_slots // slots_per_gpu, flat_slots % slots_per_gpu, weights.reshape(-1),
                   hidden.shape[1] * hidden.element_size())


@dataclass
class _Sent:
    pairs: PairsOfRows
    hop: Hop


class FlatExchange(Exchange):
    name = CommMode.FLAT.value

    def __init__(self, topology: Topology, rank: int, slots_per_gpu: int, group=None) -> None:
        self.topology, self.rank, self.slots_per_gpu, self.group = topology, rank, slots_per_gpu, group

    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, where: str) -> _Sent:
        pairs = PairsOfRows.of(hidden, slot_ids, weights, self.slots_per_gpu)
        hop = Hop.start(hidden, pairs.row, pairs.target, pairs.target, pairs.slot, pairs.weight,
                        self.topology.num_gpus, self.rank, self.group, where)
        return _Sent(pairs, hop)

    def overlap(self, sent: _Sent, experts: ExpertCompute) -> torch.Tensor:
        hop = sent.hop
        return compute_pairs(experts, hop.own_rows, hop.own_pairs, hop.own_weights)

    def compute(self, sent: _Sent, experts: ExpertCompute) -> torch.Tensor:
        hop = sent.hop.wait()
        return compute_pairs(experts, hop.rows, hop.pairs, hop.weights)

    def combine(self, sent: _Sent, own: torch.Tensor | None, arrived: torch.Tensor) -> torch.Tensor:
        return sent.hop.return_rows(arrived, sent.pairs.num_rows, own)

    def count(self, sent: _Sent, traffic: Traffic) -> None:
        hop = sent.hop
        traffic.add_hop(hop, self.rank, self.topology.node_of_gpu.tolist(), sent.pairs.row_bytes)
        traffic.pairs_computed += hop.pairs.shape[0] + hop.own_pairs.shape[0]
