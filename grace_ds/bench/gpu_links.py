"""The GPU benchmark's link and GEMM figures, measured inside every rank before any case."""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from grace_ds.bench.layers import Stopwatch, slowest_rank
from grace_ds.exchange.node_groups import make_node_group
from grace_ds.topology import Topology


def measure_links(topology: Topology, rank: int, device: torch.device, dtype: torch.dtype, big_bytes: int) -> dict:
    """Cross-node (and same-node) all-to-all throughput and latency; bf16 GEMM rate. Same-node also over
    a process group of the node alone (`intra_node_group_*`): every collective over the world group
    touches the other nodes' ranks too, which a same-node exchange can avoid."""
    world = topology.num_gpus
    node = topology.node_of_gpu.tolist()
    out = {}

    def exchange(per_peer_bytes: int, same_node: bool, repeats: int, group=None) -> tuple[float, float]:
        """(median, best) ms of an all-to-all sending per_peer_bytes to every peer on the same node
        (same_node) or on the other nodes; over `group` (this node's ranks) when given."""
        rows = max(per_peer_bytes // 2, 1)
        members = [p for p in range(world) if group is None or node[p] == node[rank]]
        splits = [rows if (node[p] == node[rank]) == same_node and p != rank else 0 for p in members]
        send = torch.ones(sum(splits), dtype=dtype, device=device)
        buf = torch.empty(sum(splits), dtype=dtype, device=device)  # symmetric: receive what is sent
        watch = Stopwatch(device)
        for _ in range(repeats + 2):
            dist.barrier()
            started = watch.start()
            dist.all_to_all_single(buf, send, splits, splits, group=group)
            watch.stop(started)
        times = slowest_rank(watch.milliseconds()[2:], device)
        return statistics.median(times), min(times)

    if topology.num_nodes > 1:
        ms, best_ms = exchange(big_bytes, False, 5)
        # Bytes leaving one node per second: its GPUs' sends to every GPU of other nodes (all nodes
        # send at once, as in a dispatch). The median feeds the cost model, the best the floor.
        node_out = big_bytes * sum(1 for p in range(world) if node[p] != node[rank]) * topology.gpus_per_node[node[rank]]
        out["inter_node_GBps"] = node_out / (ms * 1e-3) / 1e9
        out["inter_node_peak_GBps"] = node_out / (best_ms * 1e-3) / 1e9
        out["inter_node_latency_us"] = exchange(1024, False, 20)[0] * 1e3
    if max(topology.gpus_per_node) > 1:
        ms = exchange(big_bytes, True, 5)[0]
        peers = sum(1 for p in range(world) if node[p] == node[rank] and p != rank)
        out["intra_node_GBps"] = big_bytes * max(peers, 1) / (ms * 1e-3) / 1e9
        out["intra_node_latency_us"] = exchange(1024, True, 20)[0] * 1e3
        if topology.num_nodes > 1:  # the group the runtime's node_groups use
            mine = make_node_group(topology, rank).group
            out["intra_node_group_GBps"] = big_bytes * max(peers, 1) / (exchange(big_bytes, True, 5, mine)[0] * 1e-3) / 1e9
            out["intra_node_group_latency_us"] = exchange(1024, True, 20, mine)[0] * 1e3
    # bf16 GEMM rate at an expert's shape: [tokens, H] x [H, 2I]. A CPU run only smoke-tests the path, and a CPU
    # without bf16 matrix units (no AMX / AVX512-BF16) takes minutes for one product at the GPU shape.
    tokens, hidden = (8192, 2048) if device.type == "cuda" else (256, 256)
    a = torch.randn(tokens, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, hidden, dtype=dtype, device=device)
    watch = Stopwatch(device)
    for _ in range(12):
        started = watch.start()
        a @ b
        watch.stop(started)
    ms = statistics.median(watch.milliseconds()[2:])
    out["gemm_tflops"] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / (ms * 1e-3) / 1e12
    # Every rank uses the same (slowest) figures.
    keys = sorted(out)
    values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return dict(zip(keys, values.tolist()))
