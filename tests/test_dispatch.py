"""The token exchange (flat, hierarchical): its byte accounting, and ranks with no tokens or no peers."""
from types import SimpleNamespace

from grace_ds.dispatch import Traffic

ROW_BYTES = 4096  # one bf16 row of hidden size 2048


def test_traffic_counts_rows_their_pair_records_and_results_back_by_node():
    # Rank 0 of 2 nodes x 2: rank 1 is its node-mate, ranks 2 and 3 are on the other node.
    hop = SimpleNamespace(send_row_splits=[9, 3, 2, 0], recv_row_splits=[9, 1, 4, 5], send_pair_splits=[20, 7, 5, 0],
                          pair_weights=None)
    traffic = Traffic()
    traffic.add_hop(hop, 0, [0, 0, 1, 1], ROW_BYTES)
    record_bytes = 16  # four int32 columns a pair
    assert traffic.intra_node_bytes == (3 + 1) * ROW_BYTES + 7 * record_bytes
    assert traffic.cross_node_bytes == (2 + 4) * ROW_BYTES + 5 * record_bytes + (0 + 5) * ROW_BYTES


def _idle_rank_worker(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from grace_ds.dispatch import exchange_and_compute
    from grace_ds.logical_nodes import join_logical_node
    from grace_ds.node_groups import make_node_group
    from grace_ds.topology import Topology
    from tests.test_dispatch_gather import _ScaleBySlot, _ScaleBySlotPairs

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
        report = {}
        for mode, group in (("flat", None), ("hierarchical", None), ("hierarchical", node_group)):
            for experts in (_ScaleBySlot, _ScaleBySlotPairs):
                got = exchange_and_compute(hidden, slots, weights, slots_per_gpu, topology, rank,
                                           experts(rank, slots_per_gpu), mode, node_group=group)
                name = f"{mode}{' node group' if group else ''} {experts.__name__}"
                report[name] = [list(got.shape), float((got - expected).abs().max()) if got.numel() else 0.0]
        Path(out_dir, f"{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_rank_without_tokens_or_without_peers_still_exchanges(tmp_path):
    """Serving batches are uneven: a rank with no tokens, or one whose pairs all stay home, takes part in
    every collective and gets its (empty) share back; the others' outputs stay exact."""
    import json

    import torch.multiprocessing as mp

    from grace_ds.logical_nodes import free_port

    world = 4
    mp.spawn(_idle_rank_worker, args=(world, 2, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank, tokens in enumerate([5, 0, 1, 7]):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert len(report) == 6, report
        for name, (shape, error) in report.items():
            assert shape == [tokens, 6] and error < 1e-5, (rank, name, shape, error)
