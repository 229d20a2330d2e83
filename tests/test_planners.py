import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_ds.errors import GraceInputError
from grace_ds.planners import POLICIES, make_plan
from grace_ds.planners.assemble import slot_capacity
from grace_ds.planners.eplb import balanced_packing, replicate_experts
from grace_ds.planners.grouping import repair_sizes
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology
from tests.conftest import tiny_trace


def test_contiguous_is_deepspeeds_layout():
    profile = RoutingProfile.from_topk_ids(tiny_trace(experts=8), 8)
    plan = make_plan("contiguous", profile, Topology.uniform(2, 2), replica_slots=0)
    assert plan.slot_expert[0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.slot_is_primary.all()


def test_replicate_experts_gives_copies_to_highest_load_per_copy():
    counts = replicate_experts(torch.tensor([10.0, 4.0, 1.0]), num_copies=6, max_copies=4)
    # per copy [10, 4, 1] -> expert 0; [5, 4, 1] -> expert 0; [3.33, 4, 1] -> expert 1
    assert counts.tolist() == [3, 2, 1]


def test_balanced_packing_never_puts_one_key_twice_in_a_pack():
    loads = torch.tensor([5.0, 5.0, 4.0, 3.0, 1.0, 1.0])
    keys = torch.tensor([0, 0, 1, 2, 3, 3])
    packs = balanced_packing(loads, keys, [3, 3])
    for pack in packs:
        assert len({int(keys[i]) for i in pack}) == len(pack)
    assert sorted(len(p) for p in packs) == [3, 3]


def test_repair_sizes_meets_bounds_and_keeps_strong_pairs_together():
    affinity = torch.zeros(6, 6)
    affinity[0, 1] = affinity[1, 0] = 10.0
    labels = repair_sizes(torch.tensor([0, 0, 0, 0, 0, 1]), affinity, 2, 3, 3)
    assert torch.bincount(labels).tolist() == [3, 3]
    assert labels[0] == labels[1]


def test_grace_hot_expert_gets_a_replica_and_loads_even_out():
    # Expert 0 is in every token's top-2: far hotter than the rest.
    tokens = 400
    ids = torch.stack([torch.zeros(tokens, dtype=torch.int64), 1 + torch.arange(tokens) % 7], -1).view(tokens, 1, 2)
    profile = RoutingProfile.from_topk_ids(ids, 8)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), replica_slots=1)
    assert int(plan.copies_per_expert()[0, 0]) >= 2
    contiguous = make_plan("contiguous", profile, Topology.uniform(2, 2), replica_slots=1)
    ratio = lambda p: float(p.predicted_gpu_load.max() / p.predicted_gpu_load.mean())
    assert ratio(plan) < ratio(contiguous)


def test_eplb_hierarchical_keeps_groups_on_nodes():
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=300, experts=16, top_k=2), 16)
    plan = make_plan("eplb-hierarchical", profile, Topology.uniform(2, 2), replica_slots=1, num_groups=2)
    node_of_gpu = Topology.uniform(2, 2).node_of_gpu
    for layer in range(plan.num_layers):
        for gpu in range(4):
            experts = plan.slot_expert[layer, gpu][plan.slot_expert[layer, gpu] >= 0]
            groups = set((experts // 8).tolist())
            assert len(groups) == 1, "EPLB hierarchical packs whole expert groups onto one node"
        # Both GPUs of a node hold experts of the same group.
        g0 = set((plan.slot_expert[layer, 0][plan.slot_expert[layer, 0] >= 0] // 8).tolist())
        g1 = set((plan.slot_expert[layer, 1][plan.slot_expert[layer, 1] >= 0] // 8).tolist())
        assert node_of_gpu[0] == node_of_gpu[1] and g0 == g1


def test_unknown_policy_and_negative_budget_are_refused():
    profile = RoutingProfile.from_topk_ids(tiny_trace(), 8)
    with pytest.raises(GraceInputError, match="policy"):
        make_plan("nope", profile, Topology.uniform(1, 2))
    with pytest.raises(GraceInputError, match="replica slots"):
        make_plan("eplb", profile, Topology.uniform(1, 2), replica_slots=-1)
    with pytest.raises(GraceInputError, match="objective"):
        make_plan("grace", profile, Topology.uniform(1, 2), objective="speed")
    with pytest.raises(GraceInputError, match="balance_limit"):
        make_plan("grace", profile, Topology.uniform(1, 2), balance_limit=0.9)


@st.composite
def problems(draw):
    nodes = draw(st.integers(1, 3))
    gpus_per_node = tuple(draw(st.lists(st.integers(1, 3), min_size=nodes, max_size=nodes)))
    experts = draw(st.integers(max(2, sum(gpus_per_node) - 2), 20))
    top_k = draw(st.integers(1, min(experts, 4)))
    tokens = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 1000))
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.rand(experts, generator=gen) ** 3 + 1e-3
    ids = torch.stack([torch.multinomial(popularity.expand(tokens, -1), top_k, generator=gen)], 1)
    replica_slots = draw(st.integers(0, 2))
    return RoutingProfile.from_topk_ids(ids, experts), Topology(gpus_per_node), replica_slots


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), policy=st.sampled_from(POLICIES))
def test_plan_invariants_hold_for_any_profile_and_topology(problem, policy):
    profile, topology, replica_slots = problem
    plan = make_plan(policy, profile, topology, replica_slots)
    capacity = slot_capacity(profile.num_experts, topology, replica_slots)
    copies = plan.copies_per_expert()
    assert (copies >= 1).all(), "every expert has a copy in every layer"
    assert plan.slots_per_gpu <= capacity, "slot budget kept"
    assert ((plan.slot_expert >= 0).sum(-1) <= capacity).all()
    assert (copies <= topology.num_gpus).all()
    for layer in range(plan.num_layers):
        for gpu in range(topology.num_gpus):
            held = plan.slot_expert[layer, gpu][plan.slot_expert[layer, gpu] >= 0].tolist()
            assert len(held) == len(set(held)), "replicas of one expert on distinct GPUs"
    total = plan.predicted_gpu_load.sum(1)
    assert torch.allclose(total, profile.expert_load.sum(1)), "predicted loads account for every pair"


def test_grace_plans_fewer_experts_than_gpus_on_unequal_nodes():
    """A node can get no expert to group (3 experts, nodes of 2 and 3 GPUs): found by the property test."""
    profile = RoutingProfile.from_topk_ids(torch.tensor([[[1]]]), 3)
    for replica_slots in (0, 1):
        plan = make_plan("grace", profile, Topology((2, 3)), replica_slots)
        assert (plan.copies_per_expert() >= 1).all()
        assert torch.allclose(plan.predicted_gpu_load.sum(1), profile.expert_load.sum(1))


def test_grace_plans_the_same_in_forked_workers():
    trace = tiny_trace(tokens=200, layers=3, experts=16, top_k=2)
    profile = RoutingProfile.from_topk_ids(trace, 16)
    topology = Topology.uniform(2, 2)
    one = make_plan("grace", profile, topology, 1, workers=1)
    two = make_plan("grace", profile, topology, 1, workers=2)
    assert torch.equal(one.slot_expert, two.slot_expert) and torch.equal(one.slot_weight, two.slot_weight)
    assert one.options["layer_settings"] == two.options["layer_settings"]


def test_deep_models_tune_probe_layers_and_give_the_rest_their_winner():
    from collections import Counter

    from grace_ds.planners.grace import PROBE_LAYERS

    layers = PROBE_LAYERS + 3
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=300, layers=layers, experts=16, top_k=2), 16)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), 1, workers=2)
    used = [tuple(sorted((k, v) for k, v in s.items() if k != "r")) for s in plan.options["layer_settings"]]
    probes = sorted({round(i * (layers - 1) / (PROBE_LAYERS - 1)) for i in range(PROBE_LAYERS)})
    winner = Counter(used[li] for li in probes).most_common(1)[0][0]
    assert all(used[li] == winner for li in range(layers) if li not in probes)
    # The first probe tried every candidate: it matches a plan of that layer alone.
    alone = make_plan("grace", profile.select_layers([0]), Topology.uniform(2, 2), 1)
    assert torch.equal(alone.slot_expert[0], plan.slot_expert[0])
