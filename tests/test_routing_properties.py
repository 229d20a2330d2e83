"""Property tests over routers and the simulator on random profiles and awkward topologies (experts not
divisible by GPUs, one node, one GPU per node, top-k = 1 and top-k = E, a single token)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_ds.cost import CostSettings
from grace_ds.planners import POLICIES, make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing import ROUTER_POLICIES, ReplicaRouter
from grace_ds.simulate import layer_traffic, simulate_trace, token_gpus
from grace_ds.topology import Topology


@st.composite
def cases(draw):
    nodes = draw(st.integers(1, 3))
    topology = Topology(tuple(draw(st.lists(st.integers(1, 3), min_size=nodes, max_size=nodes))))
    experts = draw(st.integers(max(2, topology.num_gpus - 1), 12))
    top_k = draw(st.sampled_from(sorted({1, 2, experts})))
    tokens = draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    popularity = torch.rand(experts, generator=gen) ** 2 + 1e-3
    ids = torch.multinomial(popularity.expand(tokens, -1), top_k, generator=gen).view(tokens, 1, top_k)
    profile = RoutingProfile.from_topk_ids(ids, experts)
    plan = make_plan(draw(st.sampled_from(POLICIES)), profile, topology, draw(st.integers(0, 2)))
    return plan, ids, draw(st.sampled_from(ROUTER_POLICIES)), draw(st.sampled_from(["swrr", "random"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_routers_pick_a_copy_of_the_chosen_expert_and_prefer_the_local_one(case):
    plan, ids, policy, sampling = case
    sources = token_gpus(ids.shape[0], plan.num_gpus)
    slots = ReplicaRouter(plan, policy, sampling=sampling, seed=1).route(0, ids[:, 0], sources)
    assert torch.equal(plan.slot_expert[0].reshape(-1)[slots], ids[:, 0]), "the gate's pick is never changed"
    if policy in ("tar", "static"):
        held_locally = (plan.slot_expert[0][sources].unsqueeze(1) == ids[:, 0].unsqueeze(-1)).any(-1)  # [T, k]
        chosen_gpu = slots // plan.slots_per_gpu
        assert (chosen_gpu[held_locally] == sources.unsqueeze(1).expand_as(chosen_gpu)[held_locally]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_simulator_counts_stay_within_their_bounds(case):
    plan, ids, policy, sampling = case
    (metrics,) = simulate_trace(plan, ids, policy, sampling=sampling)
    topology = plan.topology
    assert 0 <= metrics.gpu_copies_per_token <= min(topology.num_gpus - 1, ids.shape[2])
    assert 0 <= metrics.cross_node_copies_per_token <= metrics.cross_node_copies_per_token_flat + 1e-12
    assert metrics.cross_node_copies_per_token <= topology.num_nodes - 1
    assert metrics.cross_node_bytes <= metrics.cross_node_bytes_flat
    assert metrics.max_over_mean_gpu_load >= 1.0 - 1e-9
    assert metrics.modeled_layer_time_us >= metrics.modeled_compute_us >= 0
    if topology.num_nodes == 1:
        assert metrics.cross_node_bytes == metrics.cross_node_bytes_flat == 0


def test_a_single_token_on_one_gpu_sends_nothing():
    m = layer_traffic(torch.tensor([[0, 0]]), torch.tensor([0]), Topology.uniform(1, 1), CostSettings())
    assert m["gpu_copies_per_token"] == 0 and m["cross_node_bytes_flat"] == 0
