"""The gather exchange's pieces that need no process group: packing rows, and the CUDA-graph token buckets."""
import pytest
import torch

from grace_ds.exchange.gather import _pack, _unpack
from grace_ds.exchange.graphed_gather import token_bucket


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_unpack_to_hidden_slots_and_weights(dtype):
    hidden = torch.randn(3, 6).to(dtype)
    slots = torch.tensor([[0, 5], [7, 1], [2, 3]])
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    packed = _pack(hidden, slots, weights, padded_tokens=5)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6 * hidden.element_size() + 8 * 2)
    rows, got_slots, got_weights = _unpack(packed, dtype, 6, 2)
    assert torch.equal(rows[:3], hidden) and torch.equal(got_slots[:3], slots.int())
    assert torch.equal(got_weights[:3], weights)
    assert (got_slots[3:] == -1).all()  # padding rows: no rank computes them
    assert (got_weights[3:] == 0).all() and (rows[3:] == 0).all()


def test_token_buckets_are_powers_of_two_up_to_the_limit():
    assert [token_bucket(n, 128) for n in (1, 8, 9, 64, 65, 128)] == [8, 8, 16, 64, 128, 128]
    assert token_bucket(100, 96) is None  # larger than the limit: eager
    assert token_bucket(90, 96) == 96  # the limit caps the bucket


def test_gather_chosen_outright_graphs_larger_calls_than_auto_sends_it():
    from grace_ds.exchange.choice import gather_graph_tokens

    assert gather_graph_tokens("auto", 0) == gather_graph_tokens("hierarchical", 64) == 128
    assert gather_graph_tokens("auto", 256) == 256
    assert gather_graph_tokens("gather", 0) == 512  # decode-512 on 2 GPUs: 256 a rank, graphed
    assert token_bucket(256, gather_graph_tokens("gather", 0)) == 256


class _ScaleBySlot:
    """An expert per global slot s that multiplies its row by s + 1: a plain callable, given this rank's
    pairs only."""

    def __init__(self, rank: int, slots_per_gpu: int) -> None:
        self.first = rank * slots_per_gpu

    def __call__(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        assert (slot >= 0).all()
        return rows * (self.first + slot + 1).unsqueeze(-1).to(rows.dtype)


class _ScaleBySlotPairs(_ScaleBySlot):
    """The same experts with `weighted_sum`, as SlotExperts: every gathered pair, slot -1 skipped."""

    capturable = False

    def slot_tensors(self) -> list[torch.Tensor]:
        return []

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor:
        assert not pairs_by_row or bool((pair_row[1:] >= pair_row[:-1]).all())
        scale = torch.where(pair_slot >= 0, self.first + pair_slot + 1, 0).to(rows.dtype) * pair_weight
        return torch.zeros_like(rows).index_add_(0, pair_row, rows[pair_row] * scale.unsqueeze(-1))


def _gather_worker(rank: int, world: int, nodes: int, port: int, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from grace_ds.exchange.expert_compute import as_expert_compute
    from grace_ds.exchange.gather import GatherExchange, NodeLayout
    from grace_ds.exchange.traffic import Traffic
    from grace_ds.logical_nodes import join_logical_node
    from grace_ds.topology import Topology

    join_logical_node(rank, world, nodes, port)
    try:
        slots_per_gpu, top_k, per_node = 3, 2, world // nodes
        node_of_gpu = [g // per_node for g in range(world)]
        counts = [0 if g == 1 else 2 + g % 3 for g in range(world)]  # uneven (rank 1 idle): padded to the largest
        torch.manual_seed(rank)
        hidden = torch.randn(counts[rank], 5)
        slots = torch.randint(0, world * slots_per_gpu, (counts[rank], top_k))
        weights = torch.rand(counts[rank], top_k)
        expected = (weights.unsqueeze(-1) * hidden.unsqueeze(1) * (slots + 1).unsqueeze(-1)).sum(1)
        report = {}
        for hierarchical in (True, False):
            for experts in (_ScaleBySlot, _ScaleBySlotPairs):
                traffic = Traffic()
                exchange = GatherExchange(Topology.uniform(nodes, per_node), rank, slots_per_gpu, None,
                                          NodeLayout.of(rank, node_of_gpu) if hierarchical else None)
                got = exchange.for_call(max(counts))(hidden, slots, weights, as_expert_compute(experts(rank, slots_per_gpu)),
                                                     "", traffic)
                report[f"{hierarchical} {experts.__name__}"] = {
                    "error": float((got - expected).abs().max()) if got.numel() else 0.0,
                    "shape": list(got.shape), "cross": traffic.cross_node_bytes,
                    "intra": traffic.intra_node_bytes}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("nodes, per_node", [(3, 2), (2, 1)])
def test_gather_by_node_equals_the_ring_and_crosses_nodes_once_per_token(nodes, per_node, tmp_path):
    import json

    import torch.multiprocessing as mp

    from grace_ds.logical_nodes import free_port

    world = nodes * per_node
    mp.spawn(_gather_worker, args=(world, nodes, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert len(report) == 4 and all(r["error"] < 1e-5 for r in report.values()), report
        assert all(r["shape"] == [0 if rank == 1 else 2 + rank % 3, 5] for r in report.values()), report
        # By node, this rank's rows cross to one peer per remote node; the ring's logical count sends
        # them to every GPU off its node.
        remote_gpus, remote_nodes = world - per_node, nodes - 1
        by_node, ring = report["True _ScaleBySlotPairs"], report["False _ScaleBySlotPairs"]
        assert by_node["cross"] * remote_gpus == ring["cross"] * remote_nodes
