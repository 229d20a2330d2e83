"""The token exchange (flat, hierarchical): its byte accounting, and ranks with no tokens or no peers."""
import json

import pytest

RECORD_BYTES = 16  # a pair record: four int32 columns


def expected_traffic(slots_by_rank: list[list[list[int]]], topology, slots_per_gpu: int, mode: str,
                     row_bytes: int) -> list[list[int]]:
    """[intra-node, cross-node] bytes each rank sends, from the routing alone: a row once per rank it
    goes to next (hierarchical: a remote node's peer with the sender's local index, which forwards it once
    per GPU it fans out to), a record per pair, and results back for every row received."""
    world = topology.num_gpus
    node, first = topology.node_of_gpu.tolist(), topology.first_gpu_of_node.tolist()
    local, size = topology.local_index_of_gpu.tolist(), topology.gpus_per_node
    hops = [([[set() for _ in range(world)] for _ in range(world)], [[0] * world for _ in range(world)])
            for _ in range(2)]
    for rank, slots in enumerate(slots_by_rank):
        for token, row in enumerate(slots):
            for slot in row:
                target = slot // slots_per_gpu
                remote = mode == "hierarchical" and node[target] != node[rank]
                peer = first[node[target]] + local[rank] % size[node[target]] if remote else target
                hops[0][0][rank][peer].add(token)
                hops[0][1][rank][peer] += 1
                if peer != target:  # hop 2: the peer fans the row out inside its node
                    hops[1][0][peer][target].add((rank, token))
                    hops[1][1][peer][target] += 1
    out = [[0, 0] for _ in range(world)]
    for rows, pairs in hops:
        for rank in range(world):
            for other in range(world):
                if other != rank:
                    moved = (len(rows[rank][other]) + len(rows[other][rank])) * row_bytes
                    out[rank][node[other] != node[rank]] += moved + pairs[rank][other] * RECORD_BYTES
    return out


def _idle_rank_worker(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from grace_ds.exchange.expert_compute import as_expert_compute
    from grace_ds.exchange.flat import FlatExchange
    from grace_ds.exchange.hierarchical import HierarchicalExchange
    from grace_ds.exchange.node_groups import make_node_group
    from grace_ds.exchange.traffic import Traffic
    from grace_ds.logical_nodes import join_logical_node
    from grace_ds.topology import Topology
    from tests.test_exchange_gather import _ScaleBySlot, _ScaleBySlotPairs

    join_logical_node(rank, world, nodes, port)
    try:
        topology = Topology.uniform(nodes, world // nodes)
        slots_per_gpu, top_k = 3, 4
        counts = [5, 0, 1, 7][:world]  # rank 1 serves no tokens; rank 2 one token
        torch.manual_seed(rank)
        hidden = torch.randn(counts[rank], 6)
        # Rank 2's token goes to its own GPU alone: it sends nothing to the other ranks.
        slots = (torch.randint(0, world * slots_per_gpu, (counts[rank], top_k)) if rank != 2
                 else torch.full((1, top_k), 2 * slots_per_gpu))
        weights = torch.rand(counts[rank], top_k)
        expected = (weights.unsqueeze(-1) * hidden.unsqueeze(1) * (slots + 1).unsqueeze(-1)).sum(1)
        node_group = make_node_group(topology, rank)
        report, traffic = {}, {}
        for mode, group in (("flat", None), ("hierarchical", None), ("hierarchical", node_group)):
            for experts in (_ScaleBySlot, _ScaleBySlotPairs):
                counted = Traffic()
                exchange = (FlatExchange(topology, rank, slots_per_gpu) if mode == "flat"
                            else HierarchicalExchange(topology, rank, slots_per_gpu, None, group))
                got = exchange(hidden, slots, weights, as_expert_compute(experts(rank, slots_per_gpu)), "", counted)
                name = f"{mode}{' node group' if group else ''} {experts.__name__}"
                report[name] = [list(got.shape), float((got - expected).abs().max()) if got.numel() else 0.0]
                traffic[name] = [mode, counted.intra_node_bytes, counted.cross_node_bytes]
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"outputs": report, "traffic": traffic,
                                                             "slots": slots.tolist(), "row_bytes": 6 * 4}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def uneven_exchange(tmp_path_factory) -> list[dict]:
    """Every rank's report of _idle_rank_worker on 4 gloo ranks as 2 nodes x 2."""
    import torch.multiprocessing as mp

    from grace_ds.logical_nodes import free_port

    out, world = tmp_path_factory.mktemp("uneven"), 4
    mp.spawn(_idle_rank_worker, args=(world, 2, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(world)]


def test_a_rank_without_tokens_or_without_peers_still_exchanges(uneven_exchange):
    """Serving batches are uneven: a rank with no tokens, or one whose pairs all stay home, takes part in
    every collective and gets its (empty) share back; the others' outputs stay exact."""
    for rank, tokens in enumerate([5, 0, 1, 7]):
        report = uneven_exchange[rank]["outputs"]
        assert len(report) == 6, report
        for name, (shape, error) in report.items():
            assert shape == [tokens, 6] and error < 1e-5, (rank, name, shape, error)


def test_traffic_counts_what_the_hops_of_the_exchange_sent(uneven_exchange):
    """The bytes a real exchange counted (Hop.start's splits through Traffic) equal those worked out from the
    routing alone, per rank, same-node and cross-node apart, in every mode and with node groups."""
    from grace_ds.topology import Topology

    topology = Topology.uniform(2, 2)
    slots = [report["slots"] for report in uneven_exchange]
    for name, (mode, _, _) in uneven_exchange[0]["traffic"].items():
        expected = expected_traffic(slots, topology, 3, mode, uneven_exchange[0]["row_bytes"])
        counted = [report["traffic"][name][1:] for report in uneven_exchange]
        assert counted == expected, (name, counted, expected)
    assert any(cross > 0 for _, cross in expected) and any(intra > 0 for intra, _ in expected)
