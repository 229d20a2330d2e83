"""Replay a routing trace under (plan, router, topology): traffic, balance and a modeled MoE-layer time.

Tokens are spread over the GPUs in contiguous blocks (data parallel), as in serving. A token is sent to
a GPU once however many of its experts live there. Hierarchical communication sends it across to a
node once (to the peer GPU with the same local index), then fans it out inside the node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from grace_ds.plan import PlacementPlan
from grace_ds.profile import RoutingProfile
from grace_ds.routing import LayerCopies, ReplicaRouter, expected_copy_loads
from grace_ds.topology import LinkModel, Topology

COST_MODEL_EXPLANATION = """\
Modeled MoE-layer time (per layer, microseconds), alpha-beta links + expert GEMM rate:
  bytes_per_copy   = hidden * dtype_bytes                 (one token's hidden state)
  flops_per_pair   = 6 * hidden * ffn_hidden               (gate, up and down projections)
  intra(g)         = max(bytes sent, bytes received by GPU g inside its node) / intra_node_bandwidth
  inter(n)         = max(bytes leaving, bytes entering node n) / inter_node_bandwidth  (one NIC per node)
  flat dispatch    = max over GPUs g of max(intra(g) + alpha_intra, inter(node(g)) + alpha_inter)
  hier dispatch    = max_g max(inter(node(g)) + alpha_inter, intra_local(g) + alpha_intra)
                     + max_g intra_fanout(g) + alpha_intra  (cross-node stage overlaps same-node sends;
                     fan-out on the destination node follows, at fanout_bandwidth when the runtime gives
                     it a process group of the node, as it does the gather's in-node stages)
  compute          = max over GPUs of pairs(g) * flops_per_pair / expert_tflops
  combine          = dispatch (partial outputs return the way tokens came; the hierarchical combine
                     pre-reduces a token's outputs on the destination node, so it crosses once too)
  layer time       = dispatch + compute + combine + layer_overhead (+ hop_overhead, hierarchical):
                     the fixed cost measured with a few tokens (every expert one pair from every GPU),
                     0 unless calibrated; it holds every collective's start-up, so once calibrated the
                     alpha terms are left out
  host overlap     = the host time after the layer's last wait for the device (tail, measured with the
                     fixed cost: *_host_tail_us) is launches, which the device's work after that wait
                     hides or is hidden by:
                     time = (fixed - tail) + waited + max(tail, rest), waited + rest = the work above;
                     waited = 0: the one wait, for split sizes, comes before rows move (hierarchical
                     too: hop 2's split sizes travel with hop 1's); tail = 0 (uncalibrated) gives the sum
  gather exchange  = every GPU's tokens, padded to the largest GPU's count P, reach every GPU once
                     (all-gather, hidden state + 8k bytes of slots and weights), partial outputs
                     return summed (reduce-scatter):
  by node (equal nodes of G GPUs, the runtime's default across nodes): P rows to the peer on every other
  node, then the node's N * P rows to every other GPU of the node; the combine the reverse way:
  gather dispatch  = G * P * (nodes - 1) rows / inter_bw + alpha_inter + (G - 1) * nodes * P rows / fanout_bw
                     + alpha_intra
  ring (one node, or unequal nodes): one all-gather and one reduce-scatter over all GPUs:
  gather dispatch  = max(max_n inter_gather(n) + alpha_inter, (GPUs - 1) * P rows / intra_bw + alpha_intra)
                     inter_gather(n) = max(P * GPUs off n, P * GPUs of n * (nodes - 1)) rows
  gather time      = gather dispatch + compute + gather combine + gather_overhead (else layer_overhead):
                     no host overlap, the exchange is one CUDA graph launched when the host's work ends
"""


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


@dataclass
class CostSettings:
    hidden: int = 2048
    ffn_hidden: int = 1024
    dtype_bytes: int = 2
    # The runtime before 2026-11-29: hop 2's split sizes waited for hop 1's rows (modeling its runs again).
    hierarchical_waits_for_first_stage: bool = False


def _start_ups(links: LinkModel, fixed_cost_us: float) -> tuple[float, float]:
    """(intra, inter) per-collective latency to add: none once a fixed cost is calibrated, as it already
    holds every collective's start-up."""
    return (0.0, 0.0) if fixed_cost_us > 0 else (links.intra_node_latency_us, links.inter_node_latency_us)


def with_host_overlap(fixed_us: float, tail_us: float, waited_us: float, rest_us: float) -> float:
    """Layer time from its fixed cost (a few tokens) and device work: the fixed cost up to the last
    host wait, the work that wait waits for, then the remaining work beside the host's remaining
    launches (`tail_us` of the fixed cost), whichever is longer."""
    tail = min(tail_us, fixed_us)
    return fixed_us - tail + waited_us + max(tail, rest_us)


def _fanout_bw(links: LinkModel) -> float:
    """Bytes per microsecond of the same-node stages that run alone (hop 2, the gather's in-node stages)."""
    return (links.fanout_bandwidth_GBps or links.intra_node_bandwidth_GBps) * 1e3


def _alpha_beta(bytes_: torch.Tensor, bandwidth_bytes_per_us: float, latency_us: float) -> torch.Tensor:
    return torch.where(bytes_ > 0, bytes_ / bandwidth_bytes_per_us + latency_us, torch.zeros_like(bytes_))


def layer_traffic(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology,
                  cost: CostSettings) -> dict[str, float]:
    """dest_gpu [T, k] GPU serving each pair; token_gpu [T] GPU holding each token."""
    num_gpus, num_nodes = topology.num_gpus, topology.num_nodes
    node_of_gpu = topology.node_of_gpu
    num_tokens = dest_gpu.shape[0]
    hits = torch.zeros(num_tokens, num_gpus, dtype=torch.bool)
    hits.scatter_(1, dest_gpu, True)
    own = torch.nn.functional.one_hot(token_gpu, num_gpus).bool()
    remote = hits & ~own  # [T, P] one copy per distinct remote GPU
    token_node = node_of_gpu[token_gpu]
    gpu_on_other_node = node_of_gpu.view(1, -1) != token_node.view(-1, 1)
    node_hits = torch.zeros(num_tokens, num_nodes, dtype=torch.bool)
    node_hits.scatter_(1, node_of_gpu[dest_gpu], True)
    remote_nodes = node_hits & (torch.arange(num_nodes).view(1, -1) != token_node.view(-1, 1))

    bytes_per_copy = float(cost.hidden * cost.dtype_bytes)
    links = topology.links
    intra_bw = links.intra_node_bandwidth_GBps * 1e3  # bytes per microsecond
    inter_bw = links.inter_node_bandwidth_Gbps * 1e3 / 8
    onehot_src = torch.nn.functional.one_hot(token_gpu, num_gpus).double()  # [T, P]
    # Flat: send matrix src -> dst in copies.
    flat = onehot_src.T @ remote.double()  # [P, P]
    same_node = node_of_gpu.view(-1, 1) == node_of_gpu.view(1, -1)
    intra_flat = flat * same_node
    inter_flat = flat * ~same_node
    node_onehot = torch.nn.functional.one_hot(node_of_gpu, num_nodes).double()  # [P, N]
    node_out_flat = node_onehot.T @ inter_flat.sum(1)
    node_in_flat = node_onehot.T @ inter_flat.sum(0)
    intra_g_flat = torch.maximum(intra_flat.sum(1), intra_flat.sum(0)) * bytes_per_copy
    inter_n_flat = torch.maximum(node_out_flat, node_in_flat) * bytes_per_copy
    alpha_intra, alpha_inter = _start_ups(links, links.layer_overhead_us)
    dispatch_flat = torch.maximum(_alpha_beta(intra_g_flat, intra_bw, alpha_intra),
                                  _alpha_beta(inter_n_flat, inter_bw, alpha_inter)[node_of_gpu]).max()

    # Hierarchical: cross once per (token, remote node) to the peer GPU, then fan out on that node.
    cross = onehot_src.T @ remote_nodes.double()  # [P, N] copies from GPU to node
    node_out_h = node_onehot.T @ cross.sum(1)
    node_in_h = cross.sum(0)
    inter_n_h = torch.maximum(node_out_h, node_in_h) * bytes_per_copy
    local_remote = remote & ~gpu_on_other_node  # same-node targets: sent directly
    local_matrix = onehot_src.T @ local_remote.double()
    intra_local = torch.maximum(local_matrix.sum(1), local_matrix.sum(0)) * bytes_per_copy
    peer_gpu_of_dest = topology.peer_of(token_gpu.view(-1, 1), node_of_gpu.view(1, -1))  # [T, P]
    fanout = hits & gpu_on_other_node & (torch.arange(num_gpus).view(1, -1) != peer_gpu_of_dest)
    fan_sent = torch.zeros(num_gpus, dtype=torch.float64).index_add_(0, peer_gpu_of_dest[fanout], torch.ones(int(fanout.sum()), dtype=torch.float64))
    fan_recv = fanout.double().sum(0)
    intra_fan = torch.maximum(fan_sent, fan_recv) * bytes_per_copy
    first_stage_h = torch.maximum(_alpha_beta(inter_n_h, inter_bw, alpha_inter)[node_of_gpu],
                                  _alpha_beta(intra_local, intra_bw, alpha_intra)).max()
    dispatch_h = first_stage_h + _alpha_beta(intra_fan, _fanout_bw(links), alpha_intra).max()
    waited_h = float(first_stage_h) if cost.hierarchical_waits_for_first_stage else 0.0

    pairs = torch.bincount(dest_gpu.reshape(-1), minlength=num_gpus).double()
    compute = (pairs.max() * 6.0 * cost.hidden * cost.ffn_hidden / (links.expert_tflops * 1e6))
    gather = _gather_exchange_us(int(torch.bincount(token_gpu, minlength=num_gpus).max()), dest_gpu.shape[1],
                                 topology, bytes_per_copy)
    return {
        "gpu_copies_per_token": float(remote.sum()) / num_tokens,
        "cross_node_copies_per_token": float(remote_nodes.sum()) / num_tokens,
        "cross_node_copies_per_token_flat": float((remote & gpu_on_other_node).sum()) / num_tokens,
        "max_over_mean_gpu_load": float(pairs.max() / pairs.mean()),
        # Dispatch and combine both count.
        "cross_node_bytes": 2 * float(cross.sum()) * bytes_per_copy,
        "cross_node_bytes_flat": 2 * float(inter_flat.sum()) * bytes_per_copy,
        "intra_node_bytes": 2 * float(local_matrix.sum() + fanout.sum()) * bytes_per_copy,
        "intra_node_bytes_flat": 2 * float(intra_flat.sum()) * bytes_per_copy,
        "modeled_layer_time_us": with_host_overlap(links.layer_overhead_us + links.hop_overhead_us,
                                                   links.hierarchical_host_tail_us, waited_h,
                                                   float(2 * dispatch_h + compute) - waited_h),
        "modeled_layer_time_us_flat": with_host_overlap(links.layer_overhead_us, links.layer_host_tail_us, 0.0,
                                                        float(2 * dispatch_flat + compute)),
        "modeled_layer_time_us_gather": float(gather + compute) + (links.gather_overhead_us or links.layer_overhead_us),
        "modeled_compute_us": float(compute),
    }


def _gather_exchange_us(padded_tokens: int, top_k: int, topology: Topology, bytes_per_copy: float) -> float:
    """Rows of padded_tokens from every GPU (hidden state + k slots and weights) to every GPU, then the
    hidden-size partials back summed: by node across equal nodes (as the runtime does), else ring."""
    links = topology.links
    alpha_intra, alpha_inter = _start_ups(links, links.gather_overhead_us or links.layer_overhead_us)
    intra_bw = links.intra_node_bandwidth_GBps * 1e3
    inter_bw = links.inter_node_bandwidth_Gbps * 1e3 / 8
    nodes, sizes = topology.num_nodes, set(topology.gpus_per_node)
    total = 0.0
    for row_bytes in (bytes_per_copy + 8 * top_k, bytes_per_copy):
        rows = padded_tokens * row_bytes
        if nodes > 1 and len(sizes) == 1:
            per_node = topology.gpus_per_node[0]
            total += per_node * rows * (nodes - 1) / inter_bw + alpha_inter
            if per_node > 1:
                total += (per_node - 1) * nodes * rows / _fanout_bw(links) + alpha_intra
            continue
        intra = rows * (topology.num_gpus - 1) / intra_bw + alpha_intra
        inter = 0.0
        if nodes > 1:
            inter = max(max(rows * (topology.num_gpus - g), rows * g * (nodes - 1))
                        for g in topology.gpus_per_node) / inter_bw + alpha_inter
        total += max(intra, inter)
    return total


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
