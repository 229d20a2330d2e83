"""grace_ds.cost: the traffic matrices and times by hand, and the bytes the runtime measures on 4 gloo ranks
(2 logical nodes x 2) equal to the bytes the model gives for the same routing, flat and hierarchical."""
import json

import pytest
import torch

from grace_ds import cost
from grace_ds.topology import LinkModel, Topology

# Token 0 on GPU 0 goes to GPUs 0, 2 and 3 (2 and 3 on node 1); token 1 on GPU 1 to GPU 0 and twice to itself.
DEST = torch.tensor([[0, 2, 3], [0, 1, 1]])
TOKEN_GPU = torch.tensor([0, 1])


def entries(matrix: torch.Tensor) -> dict[tuple[int, int], float]:
    return {(int(s), int(d)): float(matrix[s, d]) for s, d in matrix.nonzero().tolist()}


def test_flat_hop_sends_a_row_once_per_gpu_and_a_record_per_pair():
    (hop,) = cost.flat_hops(DEST, TOKEN_GPU, 4)
    assert entries(hop.rows_per_link) == {(0, 2): 1, (0, 3): 1, (1, 0): 1}
    assert entries(hop.pairs_per_link) == {(0, 2): 1, (0, 3): 1, (1, 0): 1}
    (hop,) = cost.flat_hops(torch.tensor([[2, 2, 3]]), torch.tensor([0]), 4)
    assert entries(hop.rows_per_link) == {(0, 2): 1, (0, 3): 1}  # two pairs on GPU 2: one row, two records
    assert entries(hop.pairs_per_link) == {(0, 2): 2, (0, 3): 1}


def test_hierarchical_hops_cross_once_to_the_peer_then_fan_out():
    topology = Topology.uniform(2, 2)
    hop1, hop2 = cost.hierarchical_hops(DEST, TOKEN_GPU, topology)
    # Token 0 crosses once, to GPU 0's peer on node 1 (GPU 2), with both its pairs there; GPU 2 forwards one.
    assert entries(hop1.rows_per_link) == {(0, 2): 1, (1, 0): 1}
    assert entries(hop1.pairs_per_link) == {(0, 2): 2, (1, 0): 1}
    assert entries(hop2.rows_per_link) == {(2, 3): 1} and entries(hop2.pairs_per_link) == {(2, 3): 1}
    # One node: hierarchical is flat.
    assert len(cost.hierarchical_hops(DEST, TOKEN_GPU, Topology.uniform(1, 4))) == 1


def test_hop_1_goes_to_topology_peer_of_on_unequal_nodes():
    topology = Topology((3, 2))  # GPUs 0-2 | 3-4: GPU 2 (local 2) reaches node 1 through local 0, GPU 3
    dest, token_gpu = torch.tensor([[4, 1]]), torch.tensor([2])
    assert cost.next_gpu(dest, token_gpu, topology).tolist() == [[topology.peer_of(2, 1), 1]] == [[3, 1]]
    hop1, hop2 = cost.hierarchical_hops(dest, token_gpu, topology)
    assert entries(hop1.rows_per_link) == {(2, 3): 1, (2, 1): 1} and entries(hop2.rows_per_link) == {(3, 4): 1}


def test_bytes_per_link_counts_rows_out_results_back_and_records():
    (hop,) = cost.flat_hops(torch.tensor([[2, 2, 3]]), torch.tensor([0]), 4)
    sent = cost.bytes_per_link([hop], row_bytes=100)
    # GPU 0 sends 1 row + 2 records to GPU 2; GPU 2 returns one result row.
    assert sent[0, 2] == 100 + 2 * cost.PAIR_RECORD_BYTES and sent[2, 0] == 100
    assert sent[0, 3] == 100 + cost.PAIR_RECORD_BYTES and sent[3, 0] == 100
    assert float(cost.bytes_per_link([hop], row_bytes=100, pair_bytes=0).sum()) == 4 * 100
    assert cost.link_bytes(1, 0, 2, 100) == sent[0, 2] and cost.bytes_per_pair(True) == cost.PAIR_RECORD_BYTES + 4
    intra, cross = cost.node_split_per_gpu(sent, Topology.uniform(2, 2))
    assert intra.tolist() == [0, 0, 0, 0] and cross.tolist() == [200 + 3 * cost.PAIR_RECORD_BYTES, 0, 100, 100]


def test_split_by_node_is_what_the_runtime_counter_does():
    from grace_ds.exchange.traffic import Traffic

    node_of_gpu = [0, 0, 1, 1, 1]
    generator = torch.Generator().manual_seed(3)
    for rank in range(5):
        bytes_to = torch.randint(0, 1000, (5,), generator=generator).tolist()
        counted = Traffic()
        counted.add_sent(bytes_to, rank, node_of_gpu)
        assert cost.split_by_node(bytes_to, rank, node_of_gpu) == (counted.intra_node_bytes, counted.cross_node_bytes)


def test_the_model_agrees_with_the_dispatch_tests_count_from_the_routing():
    """tests/test_exchange.py counts a routing's bytes by hand, set by set; the matrices give the same."""
    from tests.test_exchange import expected_traffic

    topology, slots_per_gpu, row_bytes = Topology.uniform(2, 2), 3, 24
    generator = torch.Generator().manual_seed(0)
    slots = [torch.randint(0, 12, (n, 4), generator=generator) for n in (5, 0, 3, 7)]
    dest = torch.cat(slots) // slots_per_gpu
    token_gpu = torch.cat([torch.full((len(s),), r) for r, s in enumerate(slots)])
    for mode in ("flat", "hierarchical"):
        modeled = cost.bytes_per_link(cost.exchange_hops(mode, dest, token_gpu, topology), row_bytes)
        intra, cross = cost.node_split_per_gpu(modeled, topology)
        by_hand = expected_traffic([s.tolist() for s in slots], topology, slots_per_gpu, mode, row_bytes)
        assert [[int(i), int(c)] for i, c in zip(intra, cross)] == by_hand, mode


def test_all_to_all_time_is_the_slowest_gpu_or_node_link():
    links = LinkModel(intra_node_bandwidth_GBps=1.0, inter_node_bandwidth_Gbps=8.0, intra_node_latency_us=1.0,
                      inter_node_latency_us=10.0)
    topology = Topology.uniform(2, 2, links)
    rows = torch.zeros(4, 4, dtype=torch.float64)
    rows[0, 1] = 3  # 3000 bytes inside node 0 at 1000 bytes/us: 3 us + 1
    rows[0, 2] = rows[1, 3] = 1  # node 0's link carries 2000 bytes at 1000 bytes/us: 2 us + 10
    assert cost.all_to_all_us(rows, topology, 1000, cost.intra_bytes_per_us(links), 1.0, 10.0) == 12.0
    rows[0, 1] = 20
    assert cost.all_to_all_us(rows, topology, 1000, cost.intra_bytes_per_us(links), 1.0, 10.0) == 21.0


def test_host_overlap_floor_and_baseline():
    assert cost.with_host_overlap(10.0, 4.0, 0.0, 1.0) == 10.0  # work hidden behind the host's launches
    assert cost.with_host_overlap(10.0, 4.0, 2.0, 7.0) == 6.0 + 2.0 + 7.0
    assert cost.with_host_overlap(0.0, 0.0, 0.0, 5.0) == 5.0
    links = LinkModel(inter_node_bandwidth_Gbps=8.0, inter_node_latency_us=10.0, expert_tflops=1.0)
    compute = cost.expert_compute_us(4, 500, 1, 1.0)
    assert compute == 4 * 6 * 500 / 1e6
    assert cost.floor_us(2000.0, 1000.0, 4, 500, 1, 1.0) == 2.0 + compute
    assert cost.baseline_layer_us(2000.0, 4, 500, 1, links, True, 0.0, 0.0) == 2.0 + 20.0 + compute
    assert cost.baseline_layer_us(2000.0, 4, 500, 1, links, True, 30.0, 30.0) == 30.0  # all under the fixed cost
    assert cost.baseline_layer_us(2000.0, 4, 500, 1, links, False, 0.0, 0.0) == compute


def test_gather_rows_go_to_peers_then_node_mates():
    topology = Topology.uniform(2, 2)
    by_node = cost.gather_rows_per_link(topology, 3, by_node=True)
    # GPU 0: 3 rows to its peer GPU 2, both nodes' 3 rows to its node-mate GPU 1, nothing to GPU 3.
    assert by_node[0].tolist() == [0, 6, 3, 0] and by_node.diagonal().sum() == 0
    ring = cost.gather_rows_per_link(topology, 3, by_node=False)
    assert ring.sum() == 3 * 4 * 3
    assert cost.gather_bytes_per_link(topology, 3, 2, 10, True)[0, 2] == 3 * (10 + 8 * 2 + 10)


def test_baseline_traffic_matrices():
    rows = cost.pair_rows_per_link(torch.tensor([[1, 1], [0, 2]]), torch.tensor([0, 0]), 3)
    assert entries(rows) == {(0, 1): 2, (0, 2): 1}  # a row per pair, repeats too
    padded = cost.capacity_rows_per_link(num_experts=8, capacity=5, num_gpus=4)
    assert padded.diagonal().sum() == 0 and float(padded[0, 1]) == 2 * 5


# ---- measured == modeled on 4 gloo ranks --------------------------------------------------------------

REPLICA_SLOTS, TOKENS, HIDDEN, TOP_K, EXPERTS = 1, [9, 4, 0, 13], 12, 3, 8


# Exchange labels (grace_ds.exchange.CommunicationConfig.from_label) measured; training: flat and hierarchical.
LABELS = ("flat", "hierarchical", "hierarchical-node-groups", "gather", "gather-ring")
CASES = [f"{label} inference" for label in LABELS] + ["flat training", "hierarchical training"]


def _runtime(plan, rank: int, label: str):
    from grace_ds.exchange import CommunicationConfig
    from grace_ds.runtime import GraceRuntime

    return GraceRuntime(plan, rank=rank, group=None, communication=CommunicationConfig.from_label(label), device="cpu")


def _scale_by_slot(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return rows * (slot + 1).unsqueeze(-1)


def _measuring_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from grace_ds.logical_nodes import join_logical_node
    from grace_ds.planners import make_plan
    from grace_ds.routing_profile import RoutingProfile

    join_logical_node(rank, world, 2, port)
    try:
        topology = Topology.uniform(2, 2)
        # Skewed routing, so the plan replicates hot experts and the router has copies to choose from.
        generator = torch.Generator().manual_seed(11)
        skew = torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1])
        hot = torch.multinomial(skew.expand(400, EXPERTS), TOP_K, generator=generator)
        profile = RoutingProfile.from_topk_ids(hot[:, None, :], EXPERTS, model_name="skewed")
        # Training ties replicas through SlotExperts-like modules; its case serves a plan without them.
        plans = {False: make_plan("grace", profile, topology, REPLICA_SLOTS),
                 True: make_plan("contiguous", profile, topology, 0)}
        torch.manual_seed(100 + rank)
        top_k = torch.multinomial(skew.expand(TOKENS[rank], EXPERTS), TOP_K) if TOKENS[rank] else hot[:0]
        hidden = torch.randn(TOKENS[rank], HIDDEN)
        report = {}
        for case in CASES:
            label, trains = case.split()[0], case.endswith("training")
            plan = plans[trains]
            runtime = _runtime(plan, rank, label)
            seen = []
            runtime.observers.append(lambda layer, ids, slots: seen.append(slots.tolist()))
            runtime.measure = True
            weights = torch.rand(TOKENS[rank], TOP_K, requires_grad=trains)
            with torch.set_grad_enabled(trains):
                out = runtime.route_and_compute(0, hidden, top_k, weights, _scale_by_slot)
            if trains:
                out.sum().backward()  # every rank joins the backward exchange
            traffic = runtime.traffic[0]
            report[case] = {
                "slots": seen[0], "intra": traffic.intra_node_bytes, "cross": traffic.cross_node_bytes,
                "slots_per_gpu": plan.slots_per_gpu}
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"report": report, "row_bytes": HIDDEN * hidden.element_size()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    from grace_ds.logical_nodes import free_port

    out = tmp_path_factory.mktemp("measured")
    mp.spawn(_measuring_worker, args=(4, free_port(), str(out)), nprocs=4, join=True)
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.parametrize("case", CASES)
def test_measured_bytes_equal_modeled_bytes(measured, case):
    """Each rank's intra- and cross-node bytes as GraceRuntime's Traffic counted them on a real exchange
    equal cost.bytes_per_link of the slots its router picked (training: a float weight beside each record;
    node groups: hop 2 over each node's group; gather: cost.gather_bytes_per_link, padded to the largest
    rank's tokens)."""
    topology = Topology.uniform(2, 2)
    reports = [m["report"][case] for m in measured]
    slots_per_gpu, row_bytes = reports[0]["slots_per_gpu"], measured[0]["row_bytes"]
    dest = torch.cat([torch.tensor(r["slots"], dtype=torch.long).view(-1, TOP_K) for r in reports]) // slots_per_gpu
    token_gpu = torch.repeat_interleave(torch.arange(4), torch.tensor(TOKENS))
    label = case.split()[0]
    if label.startswith("gather"):
        modeled = cost.gather_bytes_per_link(topology, max(TOKENS), TOP_K, row_bytes, by_node=label == "gather")
    else:
        hops = cost.exchange_hops(label.removesuffix("-node-groups"), dest, token_gpu, topology)
        modeled = cost.bytes_per_link(hops, row_bytes, cost.bytes_per_pair(with_weights=case.endswith("training")))
    intra, cross = cost.node_split_per_gpu(modeled, topology)
    assert [[r["intra"], r["cross"]] for r in reports] == [[int(i), int(c)] for i, c in zip(intra, cross)]
    assert float(cross.sum()) > 0 and float(intra.sum()) > 0  # both kinds of link carried something
