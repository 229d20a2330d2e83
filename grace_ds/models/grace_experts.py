"""GraceExperts: the drop-in for the `experts` module of a transformers 5.x sparse MoE block.

Same call as the block's own experts (hidden [N, H], top_k_index [N, k], top_k_weights [N, k] ->
[N, H]); the block's gate, shared experts and reshapes stay untouched, so outputs equal the unmodified
model's up to summation order. It holds only this rank's slots (replicas included).
"""
from __future__ import annotations

import torch
from torch import nn

from grace_ds.runtime import GraceRuntime


class GraceExperts(nn.Module):
    def __init__(self, runtime: GraceRuntime, layer: int, slots: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.slots = slots
        self._runtime = runtime  # shared, not a submodule: nothing of it is a parameter
        runtime.slot_modules[layer] = slots

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._runtime.route_and_compute(self.layer, hidden_states, top_k_index, top_k_weights, self.slots)

    def extra_repr(self) -> str:
        held = self._runtime.local_slots(self.layer)
        return f"layer={self.layer}, rank={self._runtime.rank}, slots={held[held >= 0].tolist()}"
