import torch

from grace_ds.plan import PlacementPlan
from grace_ds.cost import CostSettings
from grace_ds.simulate import layer_traffic, simulate_trace
from grace_ds.topology import LinkModel, Topology


def test_traffic_counts_by_hand():
    topology = Topology.uniform(2, 2)
    token_gpu = torch.tensor([0, 1])
    # Token 0 on GPU 0 goes to GPUs 0, 2 and 3: remote GPUs 2 and 3 (both on node 1).
    # Token 1 on GPU 1 goes to GPUs 0 and 1: remote GPU 0 on its own node.
    dest = torch.tensor([[0, 2, 3], [0, 1, 1]])
    m = layer_traffic(dest, token_gpu, topology, CostSettings(hidden=4, ffn_hidden=4, dtype_bytes=2))
    assert m["gpu_copies_per_token"] == 1.5
    assert m["cross_node_copies_per_token"] == 0.5  # hierarchical: token 0 crosses once
    assert m["cross_node_copies_per_token_flat"] == 1.0  # flat: twice
    # Dispatch + combine: hierarchical crosses once each way (8 bytes a copy).
    assert m["cross_node_bytes"] == 2 * 1 * 8
    assert m["cross_node_bytes_flat"] == 2 * 2 * 8
    # Hierarchical intra: token 1 -> GPU 0 (same node) and the fan-out GPU 2 -> GPU 3 on node 1.
    assert m["intra_node_bytes"] == 2 * 2 * 8
    assert abs(m["max_over_mean_gpu_load"] - 2.0 / 1.5) < 1e-12  # pairs per GPU [2, 2, 1, 1]


def test_modeled_time_follows_alpha_beta():
    links = LinkModel(inter_node_bandwidth_Gbps=8.0, inter_node_latency_us=10.0, intra_node_latency_us=1.0,
                      intra_node_bandwidth_GBps=1.0, expert_tflops=1.0)
    topology = Topology.uniform(2, 1, links)
    # One token on GPU 0 sent to GPU 1 on the other node: 1000 bytes at 1 byte/ns = 1 us + 10 us latency.
    m = layer_traffic(torch.tensor([[1]]), torch.tensor([0]), topology, CostSettings(hidden=500, ffn_hidden=1, dtype_bytes=2))
    compute = 6 * 500 * 1 / 1e6
    assert abs(m["modeled_layer_time_us_flat"] - (2 * 11.0 + compute)) < 1e-9
    assert abs(m["modeled_layer_time_us"] - (2 * 11.0 + compute)) < 1e-9
    # Gather: the token (1000 bytes, + 8 of slot and weight going out) reaches the other node, its output
    # comes back: 11.008 + 11.0 us.
    assert abs(m["modeled_layer_time_us_gather"] - (11.008 + 11.0 + compute)) < 1e-9
    # 2 x 2, gather by node: GPU 0's padded row (1 token a GPU at most) and its node-mate's cross to their
    # peers (2 x 1008 bytes through the node link + 10 us), then the node's 2 rows go to the mate
    # (2 x 1008 bytes over 1 byte/ns + 1 us); the combine returns 1000-byte partials the reverse way.
    m = layer_traffic(torch.tensor([[1]]), torch.tensor([0]), Topology.uniform(2, 2, links),
                      CostSettings(hidden=500, ffn_hidden=1, dtype_bytes=2))
    assert abs(m["modeled_layer_time_us_gather"] - ((2.016 + 10 + 2.016 + 1) + (2.0 + 10 + 2.0 + 1) + compute)) < 1e-9


def test_simulate_trace_runs_every_layer():
    slot_expert = torch.tensor([[[0], [1]], [[1], [0]]])
    plan = PlacementPlan(slot_expert, slot_expert >= 0, torch.ones(2, 2, 1, dtype=torch.float64),
                         torch.ones(2, 2, dtype=torch.float64), Topology.uniform(1, 2), 2, 1, "hand", ["a", "b"])
    layers = simulate_trace(plan, torch.tensor([[[0], [0]], [[1], [1]]]))
    # Token 0 on GPU 0 picks expert 0: local in layer a, remote in layer b.
    assert [m.gpu_copies_per_token for m in layers] == [0.0, 1.0]


def test_peer_of_is_the_gpu_with_the_same_local_index_wrapped_to_smaller_nodes():
    topology = Topology((3, 2, 4))  # GPUs 0-2 | 3-4 | 5-8
    assert [topology.peer_of(4, node) for node in range(3)] == [1, 4, 6]
    assert [topology.peer_of(2, node) for node in range(3)] == [2, 3, 7]  # local 2 wraps to local 0 on node 1
    gpus, nodes = torch.arange(9).view(-1, 1), torch.arange(3).view(1, -1)
    assert topology.peer_of(gpus, nodes).tolist() == [[topology.peer_of(g, n) for n in range(3)] for g in range(9)]
