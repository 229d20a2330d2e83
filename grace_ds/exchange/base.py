"""The Exchange interface: dispatch -> overlap -> expert compute -> combine.

Each implementation (flat, hierarchical, gather) moves this rank's (token, expert) pairs to the GPUs
holding the chosen copies and brings the weighted expert outputs back, summed per token:

  dispatch(hidden, slot_ids, weights)  start moving rows; returns the in-flight state
  overlap(sent, experts)               this rank's own share, computed while the rows cross
  compute(sent, experts)               wait for the arrivals and compute them
  combine(sent, own, arrived)          results back to the tokens' ranks, summed per token
  count(sent, traffic)                 bytes sent per link kind, pairs computed (when measuring)
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from grace_ds.exchange.expert_compute import ExpertCompute
from grace_ds.exchange.traffic import Traffic


class Exchange(ABC):
    """One way to move pairs to experts and back. slot_ids [N, k] are physical slots (the router's
    picks), weights [N, k] the gate's; the result is sum_k weight * expert(hidden) per token, [N, H]."""

    name: str

    def __call__(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertCompute,
                 where: str = "", traffic: Traffic | None = None) -> torch.Tensor:
        sent = self.dispatch(hidden, slot_ids, weights, where)
        own = self.overlap(sent, experts)
        arrived = self.compute(sent, experts)
        out = self.combine(sent, own, arrived)
        if traffic is not None:
            self.count(sent, traffic)
        return out

    @abstractmethod
    def dispatch(self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, where: str) -> Any: ...

    def overlap(self, sent: Any, experts: ExpertCompute) -> torch.Tensor | None:
        """Work done while the dispatch is in flight (None: nothing to overlap)."""
        return None

    @abstractmethod
    def compute(self, sent: Any, experts: ExpertCompute) -> torch.Tensor: ...

    @abstractmethod
    def combine(self, sent: Any, own: torch.Tensor | None, arrived: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def count(self, sent: Any, traffic: Traffic) -> None: ...
