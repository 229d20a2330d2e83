"""Online re-planning while serving (4 gloo ranks as 2 nodes x 2, flat and hierarchical): the routing
drifts, the plan changes by bounded moves with weights sent point to point in chunks, and every step's
outputs equal the unmodified model's, including steps with a transfer in flight and right after a switch."""
import pytest

from tests import online_worker
from tests.test_megatron import spawn_two_nodes
from tests.test_runtime_exactness import TOLERANCE


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return spawn_two_nodes(online_worker.main, tmp_path_factory.mktemp("online"))


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_outputs_stay_exact_across_plan_switches(reports, mode):
    for report in reports:
        served = report[mode]
        assert max(served["errors"]) < TOLERANCE, served["errors"]
        switches = [r for r in served["history"] if r["replanned"] and r["moves"] > 0]
        assert switches, served["history"]
        assert any(served["pending_at"]), "some forward ran while expert weights were in flight"
        assert served["slots_changed"] > 0
        assert served["wrong_slots"] == []


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_every_rank_switches_to_the_same_plan_at_the_same_step(reports, mode):
    assert len({report[mode]["digest"] for report in reports}) == 1
    steps = {tuple(r.get("switch_step", -1) for r in report[mode]["history"]) for report in reports}
    assert len(steps) == 1


@pytest.mark.parametrize("mode", ["flat", "hierarchical"])
def test_moves_stay_within_the_budget_when_the_drift_asks_for_more(reports, mode):
    budget = online_worker.ONLINE["max_moves_per_step"]
    history = [report[mode]["history"] for report in reports]
    first = history[0]
    # The bound is exercised: some check stopped at the budget while a move still helped. Without this the
    # "at most the budget" below would hold for any planner that happened to want few moves.
    assert any(r["moves"] == budget and r["budget_exhausted"] for r in first), first
    for check, record in enumerate(first):
        assert record["moves"] <= budget, record
        if record["moves"]:
            assert record["modeled_time_after_us"] < record["modeled_time_before_us"], record
            # What crossed between ranks is exactly the moved copies: each lands on one rank.
            received = sum(ranks[check]["bytes_received_here"] for ranks in history)
            assert received == record["bytes_moved"] > 0, (received, record)
