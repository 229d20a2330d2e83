"""The one traffic and cost model: what each exchange sends over each link for a routing, and its time.

Traffic: from a routing (dest_gpu [T, k], the GPU serving each of T tokens' k pairs; token_gpu [T], the
GPU holding each token) every exchange is a list of hops, each a pair of [P, P] matrices: rows_per_link
(distinct token rows src -> dst) and pairs_per_link (pair records src -> dst), the diagonal 0 (a GPU's own
share never enters a collective). Flat: one hop, straight to each pair's GPU. Hierarchical: hop 1 goes
directly inside the node and once per remote node to the peer GPU with the sender's local index
(Topology.peer_of); hop 2 fans it out on that node. Bytes on a link src -> dst: the rows src sends, the
results it returns for the rows dst sent it, and the pair records (what the runtime's Traffic counts).

Time: alpha-beta links (topology.LinkModel) per all-to-all stage, the busiest GPU's expert FLOPs, the
measured fixed cost with host overlap; COST_MODEL_EXPLANATION spells it out. Counts are float64 tensors
(exact integers), bytes and microseconds floats.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grace_ds.topology import LinkModel, Topology

PAIR_RECORD_BYTES = 4 * torch.int32.itemsize  # a pair's record: row, final GPU, slot, weight bits (int32 each)
PAIR_WEIGHT_BYTES = torch.float32.itemsize  # under autograd a pair's weight also travels as a float
FLOPS_PER_PAIR_FACTOR = 6  # gate, up and down projections: 2 * 3 * hidden * ffn_hidden flop per pair
GATHER_SLOT_BYTES = 8  # per pair in a gathered row: its slot and weight (int32 + float32)

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
class CostSettings:
    hidden: int = 2048
    ffn_hidden: int = 1024
    dtype_bytes: int = 2
    # The runtime before 2026-11-29: hop 2's split sizes waited for hop 1's rows (modeling its runs again).
    hierarchical_waits_for_first_stage: bool = False

    @property
    def row_bytes(self) -> int:
        return self.hidden * self.dtype_bytes


@dataclass(frozen=True)
class HopTraffic:
    """One all-to-all of an exchange: rows_per_link [P, P] and pairs_per_link [P, P], src -> dst, float64."""

    rows_per_link: torch.Tensor
    pairs_per_link: torch.Tensor


# ---- traffic matrices ---------------------------------------------------------------------------------

def _per_link(src: torch.Tensor, dst: torch.Tensor, num_gpus: int, counted: torch.Tensor | None = None) -> torch.Tensor:
    """[P, P] float64: how many (src, dst) entries (where `counted`), self-sends left out."""
    keep = src != dst if counted is None else counted & (src != dst)
    # Weights, not a boolean mask: masked indexing is far slower on the CPU than a weighted bincount.
    return torch.bincount((src * num_gpus + dst).reshape(-1), weights=keep.reshape(-1).double(),
                          minlength=num_gpus * num_gpus).view(num_gpus, num_gpus)


def _distinct_per_link(src: torch.Tensor, dst: torch.Tensor, num_gpus: int,
                       counted: torch.Tensor | None = None) -> torch.Tensor:
    """[P, P]: distinct tokens per (src, dst) among the `counted` entries of src, dst [T, k] (row t: token
    t's pairs; a row travels once per GPU). A [T, P * P] flag per token and link, summed: cheaper than
    sorting T * k keys at the GPU counts served (measured: 0.14 vs 0.51 ms at 1024 x 8 on 4 GPUs, even at 16)."""
    links = num_gpus * num_gpus
    keep = src != dst if counted is None else counted & (src != dst)
    link = torch.where(keep, src * num_gpus + dst, links).reshape(src.shape[0], -1)  # spare column: not counted
    flags = torch.zeros(src.shape[0], links + 1, dtype=torch.bool)
    flags.scatter_(1, link, True)
    return flags[:, :links].sum(0, dtype=torch.float64).view(num_gpus, num_gpus)


def flat_hops(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, num_gpus: int) -> list[HopTraffic]:
    """The flat exchange of dest_gpu [T, k] from token_gpu [T]: one hop, a row once per GPU it goes to."""
    dest = dest_gpu.long()
    src = token_gpu.long().view(-1, 1).expand_as(dest)
    return [HopTraffic(_distinct_per_link(src, dest, num_gpus), _per_link(src, dest, num_gpus))]


def next_gpu(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology) -> torch.Tensor:
    """[T, k]: where the hierarchical hop 1 sends each pair: its GPU on the sender's node, else the peer
    with the sender's local index on the pair's node."""
    node = topology.node_of_gpu
    peers = topology.peer_table  # looked up per pair: cheaper than peer_of over every pair
    src = token_gpu.long().view(-1, 1)
    dest_node = node[dest_gpu.long()]
    return torch.where(dest_node == node[src], dest_gpu.long(), peers[src, dest_node])


def hierarchical_hops(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology) -> list[HopTraffic]:
    """Hop 1 (same node direct, else to the node's peer) and hop 2 (the peer fans out inside its node)."""
    if topology.num_nodes == 1:
        return flat_hops(dest_gpu, token_gpu, topology.num_gpus)
    num_gpus, dest = topology.num_gpus, dest_gpu.long()
    src = token_gpu.long().view(-1, 1).expand_as(dest)
    hop1 = next_gpu(dest, token_gpu, topology)
    onward = hop1 != dest
    return [HopTraffic(_distinct_per_link(src, hop1, num_gpus), _per_link(src, hop1, num_gpus)),
            HopTraffic(_distinct_per_link(hop1, dest, num_gpus, onward),
                       _per_link(hop1, dest, num_gpus, onward))]


def exchange_hops(mode: str, dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology) -> list[HopTraffic]:
    """The hops of `mode` (flat or hierarchical; hierarchical on one node is flat, as in the runtime)."""
    if mode == "flat":
        return flat_hops(dest_gpu, token_gpu, topology.num_gpus)
    if mode == "hierarchical":
        return hierarchical_hops(dest_gpu, token_gpu, topology)
    raise ValueError(f"exchange_hops: mode must be flat or hierarchical, got {mode!r}")


def bytes_per_pair(with_weights: bool) -> int:
    """Bytes a pair adds to a hop: its record, and under autograd its float weight beside it."""
    return PAIR_RECORD_BYTES + (PAIR_WEIGHT_BYTES if with_weights else 0)


def link_bytes(rows_sent: int | torch.Tensor, rows_received: int | torch.Tensor, pairs_sent: int | torch.Tensor,
               row_bytes: float, pair_bytes: float = PAIR_RECORD_BYTES) -> int | float | torch.Tensor:
    """Bytes a GPU sends a peer in one hop, dispatch and combine: its rows out, the results back for the
    rows the peer sent it, a record per pair. Ints, or tensors that broadcast (the runtime's Traffic
    counts a hop's split sizes with this)."""
    return (rows_sent + rows_received) * row_bytes + pairs_sent * pair_bytes


def bytes_per_link(hops: Sequence[HopTraffic], row_bytes: float, pair_bytes: float = PAIR_RECORD_BYTES) -> torch.Tensor:
    """[P, P] bytes GPU src sends GPU dst over the hops (link_bytes of each; pair_bytes 0: hidden-state
    bytes alone)."""
    total = torch.zeros_like(hops[0].rows_per_link)
    for hop in hops:
        total += link_bytes(hop.rows_per_link, hop.rows_per_link.T, hop.pairs_per_link, row_bytes, pair_bytes)
    return total


def split_by_node(bytes_to: Sequence[int] | torch.Tensor, rank: int, node_of_gpu: Sequence[int]) -> tuple[int, int]:
    """(intra-node, cross-node) of bytes_to[g], what `rank` sends GPU g; its sends to itself left out.
    The runtime's Traffic counter sorts each exchange's bytes with this."""
    intra = cross = 0
    for other, moved in enumerate(bytes_to.tolist() if isinstance(bytes_to, torch.Tensor) else bytes_to):
        if other == rank:
            continue
        if node_of_gpu[other] == node_of_gpu[rank]:
            intra += moved
        else:
            cross += moved
    return intra, cross


def node_split_per_gpu(bytes_per_link_: torch.Tensor, topology: Topology) -> tuple[torch.Tensor, torch.Tensor]:
    """([P] intra-node, [P] cross-node) bytes each GPU sends, from a [P, P] byte matrix."""
    node = topology.node_of_gpu
    same = (node.view(-1, 1) == node.view(1, -1)) & ~torch.eye(topology.num_gpus, dtype=torch.bool)
    return (bytes_per_link_ * same).sum(1), (bytes_per_link_ * ~(node.view(-1, 1) == node.view(1, -1))).sum(1)


def pair_rows_per_link(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[P, P] rows of a dispatcher sending one row per (token, expert) pair (megatron's alltoall, AutoEP)."""
    dest = dest_gpu.long()
    return _per_link(token_gpu.long().view(-1, 1).expand_as(dest), dest, num_gpus)


def capacity_rows_per_link(num_experts: int, capacity: int, num_gpus: int) -> torch.Tensor:
    """[P, P] rows of DeepSpeed's capacity-padded exchange: [E/W, C] rows to every other GPU."""
    rows = torch.full((num_gpus, num_gpus), float(num_experts // num_gpus * capacity), dtype=torch.float64)
    return rows.fill_diagonal_(0.0)


def gather_rows_per_link(topology: Topology, padded_tokens: int, by_node: bool) -> torch.Tensor:
    """[P, P] rows of the gather exchange, every GPU's tokens padded to `padded_tokens`. Ring (by_node
    False): logically a GPU's rows to every other GPU (NCCL relays them). By node: its rows to its peer on
    every other node (Topology.peer_of), then its node's rows (one block per node) to each node-mate."""
    num_gpus, node = topology.num_gpus, topology.node_of_gpu
    if not by_node:
        return torch.full((num_gpus, num_gpus), float(padded_tokens), dtype=torch.float64).fill_diagonal_(0.0)
    gpus = torch.arange(num_gpus)
    peers = topology.peer_table  # [P, N]
    rows = torch.zeros(num_gpus, num_gpus, dtype=torch.float64)
    rows[gpus.view(-1, 1), peers] = float(padded_tokens)
    same_node = node.view(-1, 1) == node.view(1, -1)
    rows[same_node] = float(topology.num_nodes * padded_tokens)
    return rows.fill_diagonal_(0.0)


def gather_bytes_per_link(topology: Topology, padded_tokens: int, top_k: int, row_bytes: float,
                          by_node: bool) -> torch.Tensor:
    """[P, P] bytes of the gather exchange: each row out packed with its k slots and weights, and its
    hidden-size partial output back."""
    per_row = row_bytes + GATHER_SLOT_BYTES * top_k + row_bytes
    return gather_rows_per_link(topology, padded_tokens, by_node) * per_row


def pairs_per_gpu(dest_gpu: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[P] float64: (token, expert) pairs each GPU computes."""
    return torch.bincount(dest_gpu.reshape(-1), minlength=num_gpus).double()


# ---- time ---------------------------------------------------------------------------------------------

def start_ups_us(links: LinkModel, fixed_cost_us: float) -> tuple[float, float]:
    """(intra, inter) per-collective latency to add: none once a fixed cost is calibrated, as it already
    holds every collective's start-up."""
    return (0.0, 0.0) if fixed_cost_us > 0 else (links.intra_node_latency_us, links.inter_node_latency_us)


def with_host_overlap(fixed_us: float, tail_us: float, waited_us: float, rest_us: float) -> float:
    """Layer time from its fixed cost (a few tokens) and device work: the fixed cost up to the last
    host wait, the work that wait waits for, then the remaining work beside the host's remaining
    launches (`tail_us` of the fixed cost), whichever is longer."""
    tail = min(tail_us, fixed_us)
    return fixed_us - tail + waited_us + max(tail, rest_us)


def intra_bytes_per_us(links: LinkModel) -> float:
    return links.intra_node_bandwidth_GBps * 1e3


def inter_bytes_per_us(links: LinkModel) -> float:
    return links.inter_node_bandwidth_Gbps * 1e3 / 8


def fanout_bytes_per_us(links: LinkModel) -> float:
    """Bytes per microsecond of the same-node stages that run alone (hop 2, the gather's in-node stages)."""
    return (links.fanout_bandwidth_GBps or links.intra_node_bandwidth_GBps) * 1e3


def _alpha_beta_us(bytes_: torch.Tensor, bandwidth_bytes_per_us: float, latency_us: float) -> torch.Tensor:
    return torch.where(bytes_ > 0, bytes_ / bandwidth_bytes_per_us + latency_us, torch.zeros_like(bytes_))


def all_to_all_us(rows_per_link: torch.Tensor, topology: Topology, row_bytes: float, intra_Bpus: float,
                  alpha_intra_us: float, alpha_inter_us: float) -> float:
    """One all-to-all stage: the slowest GPU's max(same-node sends or receipts at intra_Bpus, its node's
    link out or in at the inter-node rate), each with its start-up."""
    node = topology.node_of_gpu
    same = node.view(-1, 1) == node.view(1, -1)
    intra, inter = rows_per_link * same, rows_per_link * ~same
    intra_g = torch.maximum(intra.sum(1), intra.sum(0)) * row_bytes
    node_onehot = torch.nn.functional.one_hot(node, topology.num_nodes).double()
    inter_n = torch.maximum(node_onehot.T @ inter.sum(1), node_onehot.T @ inter.sum(0)) * row_bytes
    return float(torch.maximum(_alpha_beta_us(intra_g, intra_Bpus, alpha_intra_us),
                               _alpha_beta_us(inter_n, inter_bytes_per_us(topology.links), alpha_inter_us)[node]).max())


def expert_compute_us(max_pairs: float, hidden: int, ffn_hidden: int, expert_tflops: float) -> float:
    """The busiest GPU's expert GEMMs."""
    return max_pairs * float(FLOPS_PER_PAIR_FACTOR) * hidden * ffn_hidden / (expert_tflops * 1e6)


def gather_exchange_us(padded_tokens: int, top_k: int, topology: Topology, row_bytes: float) -> float:
    """Rows of padded_tokens from every GPU (hidden state + k slots and weights) to every GPU, then the
    hidden-size partials back summed: by node across equal nodes (as the runtime does), else ring."""
    links = topology.links
    alpha_intra, alpha_inter = start_ups_us(links, links.gather_overhead_us or links.layer_overhead_us)
    intra_bw, inter_bw = intra_bytes_per_us(links), inter_bytes_per_us(links)
    nodes, sizes = topology.num_nodes, set(topology.gpus_per_node)
    total = 0.0
    for per_row in (row_bytes + GATHER_SLOT_BYTES * top_k, row_bytes):
        rows = padded_tokens * per_row
        if nodes > 1 and len(sizes) == 1:
            per_node = topology.gpus_per_node[0]
            total += per_node * rows * (nodes - 1) / inter_bw + alpha_inter
            if per_node > 1:
                total += (per_node - 1) * nodes * rows / fanout_bytes_per_us(links) + alpha_intra
            continue
        intra = rows * (topology.num_gpus - 1) / intra_bw + alpha_intra
        inter = 0.0
        if nodes > 1:
            inter = max(max(rows * (topology.num_gpus - g), rows * g * (nodes - 1))
                        for g in topology.gpus_per_node) / inter_bw + alpha_inter
        total += max(intra, inter)
    return total


def exchange_us(hops: Sequence[HopTraffic], topology: Topology, row_bytes: float, fixed_cost_us: float) -> float:
    """Dispatch time of an exchange's hops: the first at the job group's same-node rate, later ones (the
    fan-out) at the node group's when measured; each hop waits for the one before."""
    links = topology.links
    alpha_intra, alpha_inter = start_ups_us(links, fixed_cost_us)
    total = 0.0
    for i, hop in enumerate(hops):
        rate = intra_bytes_per_us(links) if i == 0 else fanout_bytes_per_us(links)
        total += all_to_all_us(hop.rows_per_link, topology, row_bytes, rate, alpha_intra, alpha_inter)
    return total


LAYER_MODES = ("flat", "hierarchical", "gather")


def layer_times_us(dest_gpu: torch.Tensor, token_gpu: torch.Tensor, topology: Topology, cost: CostSettings,
                   flat: list[HopTraffic] | None = None, hierarchical: list[HopTraffic] | None = None,
                   modes: Sequence[str] = LAYER_MODES) -> dict[str, float]:
    """Modeled layer time of each of `modes` (flat, hierarchical, gather) and the compute alone,
    microseconds; `flat` / `hierarchical`: the routing's hops when already worked out. Modes left out
    are not worked out (a search scoring one mode skips the others' hops)."""
    links = topology.links
    row_bytes = float(cost.row_bytes)
    compute = expert_compute_us(float(pairs_per_gpu(dest_gpu, topology.num_gpus).max()), cost.hidden,
                                cost.ffn_hidden, links.expert_tflops)
    times = {"compute": compute}
    if "hierarchical" in modes:
        hierarchical = hierarchical if hierarchical is not None else hierarchical_hops(dest_gpu, token_gpu, topology)
        dispatch_h = exchange_us(hierarchical, topology, row_bytes, links.layer_overhead_us)
        first_stage = exchange_us(hierarchical[:1], topology, row_bytes, links.layer_overhead_us)
        waited_h = first_stage if cost.hierarchical_waits_for_first_stage else 0.0
        times["hierarchical"] = with_host_overlap(links.layer_overhead_us + links.hop_overhead_us,
                                                  links.hierarchical_host_tail_us, waited_h,
                                                  2 * dispatch_h + compute - waited_h)
    if "flat" in modes:
        flat = flat if flat is not None else flat_hops(dest_gpu, token_gpu, topology.num_gpus)
        dispatch_flat = exchange_us(flat, topology, row_bytes, links.layer_overhead_us)
        times["flat"] = with_host_overlap(links.layer_overhead_us, links.layer_host_tail_us, 0.0,
                                          2 * dispatch_flat + compute)
    if "gather" in modes:
        padded = int(torch.bincount(token_gpu, minlength=topology.num_gpus).max())
        times["gather"] = (gather_exchange_us(padded, dest_gpu.shape[1], topology, row_bytes) + compute
                           + (links.gather_overhead_us or links.layer_overhead_us))
    return times


def baseline_layer_us(cross_node_bytes_per_node: float, max_pairs: float, hidden: int, ffn_hidden: int,
                      links: LinkModel, multi_node: bool, overhead_us: float, host_tail_us: float) -> float:
    """A baseline's layer (DeepSpeed, megatron, AutoEP): its cross-node bytes through one node's link
    (both phases, one start-up each when uncalibrated) and its busiest GPU's expert rows; each waits for
    the device once, for split sizes or capacity, before any row moves."""
    alpha = 0.0 if overhead_us > 0 else 2 * links.inter_node_latency_us
    exchange = cross_node_bytes_per_node / inter_bytes_per_us(links) + alpha if multi_node else 0.0
    return with_host_overlap(overhead_us, host_tail_us, 0.0,
                             exchange + expert_compute_us(max_pairs, hidden, ffn_hidden, links.expert_tflops))


def floor_us(cross_node_bytes_per_node: float, peak_bytes_per_us: float, max_pairs: float, hidden: int,
             ffn_hidden: int, expert_tflops: float) -> float:
    """What no exchange beats: one node's cross-node bytes at the best measured rate + the busiest GPU's FLOPs."""
    return (cross_node_bytes_per_node / peak_bytes_per_us
            + expert_compute_us(max_pairs, hidden, ffn_hidden, expert_tflops))
