"""Replay a routing trace under (plan, router, topology): traffic, balance and a modeled MoE-layer time
(grace_ds.cost's model of each layer's routing).

Tokens are spread over the GPUs in contiguous blocks (data parallel), as in serving. A token is sent to
a GPU once however many of its experts live there. Hierarchical communication sends it across to a
node once (to the peer GPU with the same local index), then fans it out inside the node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from grace_ds.cost import (CostSettings, bytes_per_link, flat_hops, hierarchical_hops, layer_times_us,
                           node_split_per_gpu, pairs_per_gpu)
from grace_ds.plan import PlacementPlan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing import LayerCopies, ReplicaRouter, expected_copy_loads
from grace_ds.topology import Topology


@dataclass
class LayerMetrics:
    layer: str
    gpu_copies_per_token: float
    cross_node_copies_per_token: float
    cross_node_copies_per_token_flat: float
    max_over_mean_gpu_load: float
    cross_node_bytes: float
    cross_node_bytes_flat: float
    intra_node_bytes: float
    intra_node_bytes_flat: float
    modeled_layer_time_us: float
    modeled_layer_time_us_flat: float
    modeled_layer_time_us_gather: float
    modeled_compute_us: float


def layer_traffic(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology,
                  cost: CostSettings) -> dict[str, float]:
    """dest_gpu [T, k] GPU serving each pair; token_gpu [T] GPU holding each token. Bytes are hidden
    states (dispatch and combine), without the pair records the runtime's counter adds."""
    num_tokens = dest_gpu.shape[0]
    flat = flat_hops(dest_gpu, token_gpu, topology.num_gpus)
    hierarchical = hierarchical_hops(dest_gpu, token_gpu, topology)
    row_bytes = float(cost.row_bytes)
    intra_flat, cross_flat = node_split_per_gpu(bytes_per_link(flat, row_bytes, pair_bytes=0), topology)
    intra_h, cross_h = node_split_per_gpu(bytes_per_link(hierarchical, row_bytes, pair_bytes=0), topology)
    node = topology.node_of_gpu
    crosses = node.view(-1, 1) != node.view(1, -1)
    pairs = pairs_per_gpu(dest_gpu, topology.num_gpus)
    times = layer_times_us(dest_gpu, token_gpu, topology, cost, flat, hierarchical)
    return {
        "gpu_copies_per_token": float(flat[0].rows_per_link.sum()) / num_tokens,
        "cross_node_copies_per_token": float((hierarchical[0].rows_per_link * crosses).sum()) / num_tokens,
        "cross_node_copies_per_token_flat": float((flat[0].rows_per_link * crosses).sum()) / num_tokens,
        "max_over_mean_gpu_load": float(pairs.max() / pairs.mean()),
        "cross_node_bytes": float(cross_h.sum()),
        "cross_node_bytes_flat": float(cross_flat.sum()),
        "intra_node_bytes": float(intra_h.sum()),
        "intra_node_bytes_flat": float(intra_flat.sum()),
        "modeled_layer_time_us": times["hierarchical"],
        "modeled_layer_time_us_flat": times["flat"],
        "modeled_layer_time_us_gather": times["gather"],
        "modeled_compute_us": times["compute"],
    }


def token_gpus(num_tokens: int, num_gpus: int) -> torch.Tensor:
    """[T]: GPU holding each token when T tokens are split into contiguous blocks."""
    return torch.arange(num_tokens) * num_gpus // num_tokens


def simulate_trace(plan: PlacementPlan, topk_ids: torch.Tensor, router_policy: str = "tar",
                   cost: CostSettings | None = None, sampling: str = "swrr", seed: int = 0) -> list[LayerMetrics]:
    """topk_ids [T, L, k] with L = plan.num_layers; one LayerMetrics per layer."""
    cost = cost or CostSettings()
    router = ReplicaRouter(plan, router_policy, sampling=sampling, seed=seed)
    sources = token_gpus(topk_ids.shape[0], plan.num_gpus)
    results = []
    for layer in range(plan.num_layers):
        slots = router.route(layer, topk_ids[:, layer], sources)
        metrics = layer_traffic(slots // plan.slots_per_gpu, sources, plan.topology, cost)
        results.append(LayerMetrics(layer=plan.layer_names[layer], **metrics))
    return results


def expected_gpu_load(plan: PlacementPlan, layer: int, expert_load: torch.Tensor, router_policy: str = "tar") -> torch.Tensor:
    """[P] pairs each GPU computes in expectation when expert_load [E] arrives evenly from all GPUs."""
    copies = LayerCopies.from_plan(plan, layer)
    return expected_copy_loads(copies, expert_load, router_policy, plan.topology.node_of_gpu)[1]


def simulate_loads(plan: PlacementPlan, profile: RoutingProfile, router_policy: str = "tar") -> list[dict]:
    """Balance alone, for load-only data: max/mean expected GPU load per layer."""
    out = []
    for layer in range(plan.num_layers):
        load = expected_gpu_load(plan, layer, profile.expert_load[layer], router_policy)
        out.append({"layer": plan.layer_names[layer], "max_over_mean_gpu_load": float(load.max() / load.mean())})
    return out


def summarize(layers: list[LayerMetrics]) -> dict[str, float]:
    """Every figure averaged over layers (bytes and times are per layer, per forward of the trace)."""
    rows = [asdict(m) for m in layers]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "layer"}


MODE_SAMPLE_TOKENS = 2048  # enough sampled tokens to tell two communication modes apart


def modeled_times_by_mode(plan: PlacementPlan, topk_ids: torch.Tensor, router_policy: str = "tar",
                          cost: CostSettings | None = None) -> dict[str, float]:
    """Mean modeled layer time of each communication mode on sampled routings topk_ids [S, L, k]; the
    runtime's `auto` mode picks the faster one from these (stored in plan.options)."""
    # Seeded sampling by the same weights: the same traffic in expectation, without building schedules.
    summary = summarize(simulate_trace(plan, topk_ids, router_policy, cost, sampling="random"))
    return {"flat": summary["modeled_layer_time_us_flat"], "hierarchical": summary["modeled_layer_time_us"]}
