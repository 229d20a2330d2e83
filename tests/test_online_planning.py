"""The offline pieces of online re-planning: the routing window, the drift signal on the router's
physical picks, the bounded incremental planner and the transfer schedule."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_ds.drift import drift_signal, measure_drift
from grace_ds.errors import GraceInputError
from grace_ds.expert_transfer import schedule_transfers
from grace_ds.planners import make_plan
from grace_ds.planners.incremental import copies_to_receive, moved_copies, replan_incremental
from grace_ds.routing_profile import RoutingProfile
from grace_ds.routing import ReplicaRouter
from grace_ds.routing_stats import RoutingStats
from grace_ds.simulate import simulate_trace, summarize, token_gpus
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace
from tests.conftest import tiny_trace


def test_window_forgets_steps_older_than_the_window():
    window = RoutingStats(num_layers=1, num_experts=4, top_k=2, window_steps=4, buckets=2, sample_tokens=3)
    old = torch.tensor([[0, 1]] * 5)
    new = torch.tensor([[2, 3]] * 2)
    for ids in (old, old):
        window.observe(0, ids)
        window.end_step()
    assert window.to_profile().expert_load[0].tolist() == [10, 10, 0, 0]
    for _ in range(4):  # two buckets later the old steps are gone
        window.observe(0, new)
        window.end_step()
    profile = window.to_profile()
    assert profile.expert_load[0].tolist()[:2] == [0, 0] and profile.expert_load[0, 2] > 0
    assert profile.coactivation[0, 2, 3] == profile.expert_load[0, 2] and profile.coactivation[0, 2, 2] == 0
    assert profile.sample_topk_ids.shape == (3, 1, 2)  # the last sample_tokens top-k sets, newest kept
    assert (profile.sample_topk_ids == torch.tensor([2, 3])).all()


def test_window_refuses_a_window_that_buckets_do_not_divide():
    with pytest.raises(GraceInputError, match="multiple"):
        RoutingStats(1, 4, 2, window_steps=6, buckets=4)


def served_gpu_loads(plan, trace: torch.Tensor, policy: str = "tar", sampling: str = "swrr") -> torch.Tensor:
    """[L, P] pairs each GPU computes when the plan's router serves trace [T, L, k] from every GPU, counted by
    RoutingStats from the physical picks."""
    stats = RoutingStats(plan.num_layers, plan.num_experts, plan.top_k, num_gpus=plan.num_gpus,
                         slots_per_gpu=plan.slots_per_gpu)
    router, sources = ReplicaRouter(plan, policy, sampling=sampling), token_gpus(trace.shape[0], plan.num_gpus)
    for layer in range(plan.num_layers):
        stats.observe(layer, trace[:, layer], router.route(layer, trace[:, layer], sources))
    return stats.totals(reduce=False)[1]


def test_drift_is_small_on_the_planned_traffic_and_grows_when_load_moves():
    trace = tiny_trace(tokens=400, layers=2, experts=8, top_k=2)
    profile = RoutingProfile.from_topk_ids(trace, 8)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), 1)
    served = served_gpu_loads(plan, trace)
    assert served.sum() == trace[:, :, 0].numel() * 2  # every pair counted once, on the GPU it went to
    assert drift_signal(measure_drift(plan, served)) < 0.05  # the router's rounding, not drift
    shifted = served_gpu_loads(plan, 7 - trace)  # the cold experts became the hot ones
    drifts = measure_drift(plan, shifted)
    assert drift_signal(drifts) > 0.1 and max(d.load_shift for d in drifts) > 0.05


def test_stats_count_the_gpu_of_every_physical_pick():
    stats = RoutingStats(1, 4, 2, num_gpus=3, slots_per_gpu=2)
    stats.observe(0, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 5], [1, 2]]))  # GPUs 0, 2, 0, 1
    assert stats.totals(reduce=False)[1].tolist() == [[2.0, 1.0, 1.0]]
    stats.forget_gpu_loads()
    assert stats.totals(reduce=False)[1].sum() == 0 and stats.to_profile(reduce=False).expert_load.sum() == 4


def test_stats_without_a_window_keep_everything_and_the_first_samples():
    stats = RoutingStats(num_layers=1, num_experts=4, top_k=2, sample_tokens=3)
    for ids in (torch.tensor([[0, 1]] * 2), torch.tensor([[2, 3]] * 5)):
        stats.observe(0, ids)
        stats.end_step()
    profile = stats.to_profile()
    assert profile.expert_load[0].tolist() == [2, 2, 5, 5] and profile.num_tokens.tolist() == [7]
    assert profile.sample_topk_ids[:, 0].tolist() == [[0, 1], [0, 1], [2, 3]]


def test_peeking_at_random_routing_leaves_the_served_draws_alone():
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=200, layers=1), 8)
    plan = make_plan("grace", profile, Topology.uniform(2, 2), 2)
    ids = tiny_trace(tokens=64, layers=1, seed=5)[:, 0]
    served, watched = (ReplicaRouter(plan, "tar", source_gpus=[1], sampling="random") for _ in range(2))
    for _ in range(3):
        expected = served.route(0, ids, 1)
        assert torch.equal(watched.peek(0, ids, 1), expected) and torch.equal(watched.route(0, ids, 1), expected)


@pytest.fixture(scope="module")
def arxiv_plan_wiki_window(shared_data):
    arxiv = RoutingTrace.load(shared_data / "routing" / "olmoe_arxiv.safetensors").topk_ids.long()
    wiki = RoutingTrace.load(shared_data / "routing" / "olmoe_wikipedia.safetensors").topk_ids.long()
    topology = Topology.uniform(2, 2)
    plan = make_plan("grace", RoutingProfile.from_topk_ids(arxiv[:32768], 64), topology, 1)
    return plan, RoutingProfile.from_topk_ids(wiki[:8192], 64), wiki[32768:]


def test_bounded_replan_moves_at_most_the_budget_and_cuts_time_on_real_drift(arxiv_plan_wiki_window):
    """Planned on arxiv, served wikipedia: 16 moved copies cut the hierarchical layer time on held-out
    wikipedia tokens, and the moves are exactly the slots that changed."""
    plan, window, held_out = arxiv_plan_wiki_window
    result = replan_incremental(plan, window, max_moves=16, mode="hierarchical")
    assert 0 < len(result.moves) <= 16
    assert sorted(moved_copies(plan, result.plan), key=repr) == sorted(result.moves, key=repr)
    assert copies_to_receive(plan, result.plan) <= len(result.moves)
    before = summarize(simulate_trace(plan, held_out))["modeled_layer_time_us"]
    after = summarize(simulate_trace(result.plan, held_out))["modeled_layer_time_us"]
    assert after < 0.98 * before
    assert sum(result.cost_after) < sum(result.cost_before)


def test_zero_budget_only_reweights(arxiv_plan_wiki_window):
    plan, window, _ = arxiv_plan_wiki_window
    result = replan_incremental(plan, window, max_moves=0)
    assert result.moves == [] and torch.equal(result.plan.slot_expert, plan.slot_expert)
    assert not torch.equal(result.plan.predicted_gpu_load, plan.predicted_gpu_load)  # the window's loads


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), nodes=st.integers(1, 2), per_node=st.integers(1, 3), budget=st.integers(1, 6))
def test_replan_keeps_plan_invariants(seed, nodes, per_node, budget):
    topology = Topology.uniform(nodes, per_node)
    before = RoutingProfile.from_topk_ids(tiny_trace(tokens=200, layers=2, experts=10, top_k=2, seed=seed), 10)
    # The hot experts turn cold and the cold ones hot.
    after = RoutingProfile.from_topk_ids(9 - tiny_trace(tokens=200, layers=2, experts=10, top_k=2, seed=seed + 1), 10)
    plan = make_plan("eplb", before, topology, 1)
    result = replan_incremental(plan, after, max_moves=budget)  # the new plan passed validation
    assert len(result.moves) <= budget
    assert ((result.plan.slot_expert >= 0).sum(-1) >= (plan.slot_expert >= 0).sum(-1)).all(), "no slot emptied"
    for transfer in schedule_transfers(plan, result.moves):
        assert (plan.slot_expert[transfer.layer, transfer.source_gpu] == transfer.expert).any()


def test_transfers_come_from_the_receivers_node_when_it_holds_a_copy():
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=300, layers=1, experts=8, top_k=2), 8)
    plan = make_plan("contiguous", profile, Topology.uniform(2, 2), 1)
    # Expert 0 lives on GPU 0 (node 0); GPU 1 (node 0) and GPU 3 (node 1) each want a copy.
    from grace_ds.planners.incremental import Move

    moves = [Move(0, 1, 2, -1, 0), Move(0, 3, 2, -1, 0)]
    transfers = schedule_transfers(plan, moves)
    assert [(t.source_gpu, t.target_gpu) for t in transfers] == [(0, 1), (0, 3)]
