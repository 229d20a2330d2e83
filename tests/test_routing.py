import pytest
import torch

from grace_ds.plan import PlacementPlan
from grace_ds.routing import ReplicaRouter, ordinal_within_group, swrr_schedule
from grace_ds.topology import Topology


def hand_plan() -> PlacementPlan:
    """2 nodes x 2 GPUs, 4 experts; expert 0 has copies on GPU 0 (primary) and GPU 3 (weight 3x GPU 0's)."""
    slot_expert = torch.tensor([[[0, -1], [1, -1], [2, -1], [3, 0]]])
    primary = torch.tensor([[[True, False], [True, False], [True, False], [True, False]]])
    weight = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 3.0]]], dtype=torch.float64)
    return PlacementPlan(slot_expert, primary, weight, torch.ones(1, 4, dtype=torch.float64), Topology.uniform(2, 2),
                         4, 1, "hand", ["l0"])


def gpu_of(slots: torch.Tensor) -> torch.Tensor:
    return slots // 2


def test_tar_prefers_own_gpu_then_own_node():
    router = ReplicaRouter(hand_plan(), "tar")
    ids = torch.zeros(4, 1, dtype=torch.int64)  # every token picks expert 0
    sources = torch.tensor([0, 1, 2, 3])
    # GPU 0 and GPU 3 hold a copy: local. GPU 1 (node 0): node copy on GPU 0. GPU 2 (node 1): GPU 3.
    assert gpu_of(router.route(0, ids, sources)).flatten().tolist() == [0, 0, 3, 3]


def test_wrr_follows_weights_exactly_over_a_period():
    router = ReplicaRouter(hand_plan(), "wrr")
    ids = torch.zeros(400, 1, dtype=torch.int64)
    picked = gpu_of(router.route(0, ids, 1))
    assert int((picked == 3).sum()) == 300 and int((picked == 0).sum()) == 100


def test_random_sampling_is_seeded():
    a = ReplicaRouter(hand_plan(), "wrr", sampling="random", seed=7).route(0, torch.zeros(64, 1, dtype=torch.int64), 1)
    b = ReplicaRouter(hand_plan(), "wrr", sampling="random", seed=7).route(0, torch.zeros(64, 1, dtype=torch.int64), 1)
    assert torch.equal(a, b)
    assert set(gpu_of(a).flatten().tolist()) == {0, 3}


def test_static_uses_one_fixed_copy_per_source():
    router = ReplicaRouter(hand_plan(), "static")
    picked = gpu_of(router.route(0, torch.zeros(10, 1, dtype=torch.int64), 1))
    assert picked.unique().tolist() == [0]


def test_modulo_alternates_copies_by_position():
    router = ReplicaRouter(hand_plan(), "modulo")
    picked = gpu_of(router.route(0, torch.zeros(6, 1, dtype=torch.int64), 2))
    assert picked.flatten().tolist() == [0, 3, 0, 3, 0, 3]


@pytest.mark.parametrize("policy", ["tar", "wrr", "static", "modulo"])
def test_every_pick_is_a_copy_of_the_chosen_expert(policy):
    plan = hand_plan()
    ids = torch.randint(0, 4, (50, 1))
    slots = ReplicaRouter(plan, policy).route(0, ids, torch.randint(0, 4, (50,)))
    assert torch.equal(plan.slot_expert[0].reshape(-1)[slots], ids)


def test_swrr_is_smooth():
    picks = swrr_schedule(torch.tensor([[5.0, 1.0, 1.0]], dtype=torch.float64), 7)[0].tolist()
    assert sorted(picks) == [0, 0, 0, 0, 0, 1, 2]
    assert picks != [0, 0, 0, 0, 0, 1, 2], "smooth: the light copies are interleaved, not bunched at the end"


def test_ordinal_within_group():
    assert ordinal_within_group(torch.tensor([3, 1, 3, 3, 1])).tolist() == [0, 0, 1, 2, 1]


def test_auto_mode_follows_the_modeled_times():
    from grace_ds.exchange.choice import resolve_mode

    two_by_two = Topology.uniform(2, 2)
    assert resolve_mode("auto", two_by_two, {"flat": 5.0, "hierarchical": 9.0}) == "flat"
    assert resolve_mode("auto", two_by_two, {"flat": 9.0, "hierarchical": 5.0}) == "hierarchical"
    assert resolve_mode("auto", two_by_two) == "hierarchical"
    assert resolve_mode("auto", Topology.uniform(2, 1)) == "flat"
    assert resolve_mode("flat", two_by_two, {"flat": 9.0, "hierarchical": 5.0}) == "flat"
