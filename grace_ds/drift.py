"""Drift: how far the traffic being served has moved from what the plan was built for.

Per layer, the GPU loads the plan expects (`predicted_gpu_load`, set when the plan was made) are
compared with the loads the router actually produced (pairs per GPU of its physical picks, counted by
grace_ds.routing_stats): the growth of max/mean GPU load (what a straggler GPU costs every forward) and
the total-variation distance between the two load shares. Only counts are read: no device work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from grace_ds.plan import PlacementPlan


@dataclass
class LayerDrift:
    layer: int
    predicted_imbalance: float  # max/mean GPU load the plan expected
    observed_imbalance: float  # max/mean GPU load the router produced
    load_shift: float  # total-variation distance between predicted and observed GPU-load shares, in [0, 1]

    @property
    def imbalance_growth(self) -> float:
        return self.observed_imbalance / max(self.predicted_imbalance, 1.0) - 1.0


def _imbalance(gpu_load: torch.Tensor) -> float:
    mean = float(gpu_load.mean())
    return float(gpu_load.max()) / mean if mean > 0 else 1.0


def measure_drift(plan: PlacementPlan, gpu_load: torch.Tensor) -> list[LayerDrift]:
    """gpu_load [L, P] pairs each GPU computed under `plan` -> one LayerDrift per plan layer."""
    out = []
    for layer in range(plan.num_layers):
        observed = gpu_load[layer].double()
        predicted = plan.predicted_gpu_load[layer]
        shift = 0.5 * float((observed / observed.sum().clamp(min=1e-12)
                             - predicted / predicted.sum().clamp(min=1e-12)).abs().sum())
        out.append(LayerDrift(layer, _imbalance(predicted), _imbalance(observed), shift))
    return out


def drift_signal(drifts: list[LayerDrift]) -> float:
    """The worst layer's growth of max/mean GPU load over what its plan expected (0: as planned)."""
    return max((d.imbalance_growth for d in drifts), default=0.0)
