import json

import pytest
import torch

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology
from tests.conftest import tiny_trace


@pytest.fixture()
def plan() -> PlacementPlan:
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=200), 8, model_name="tiny")
    return make_plan("eplb", profile, Topology.uniform(2, 2), replica_slots=1)


def test_save_load_round_trip(plan, tmp_path):
    plan.save(tmp_path / "plan.json")
    again = PlacementPlan.load(tmp_path / "plan.json")
    assert torch.equal(again.slot_expert, plan.slot_expert)
    assert torch.equal(again.slot_is_primary, plan.slot_is_primary)
    assert torch.allclose(again.slot_weight, plan.slot_weight)
    assert again.topology == plan.topology
    assert (again.policy, again.num_experts, again.top_k) == ("eplb", 8, 2)


def test_every_expert_has_exactly_one_primary(plan):
    primaries = plan.slot_expert[plan.slot_is_primary]
    per_layer = primaries.view(plan.num_layers, -1)
    for layer in per_layer:
        assert sorted(layer.tolist()) == list(range(8))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][0]["gpus"][0].update(experts=[], primary=[], weights=[]), "no copy|primary"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["layers"][0]["gpus"][1].update(experts=d["layers"][0]["gpus"][1]["experts"][:-1] * 0 +
                                                  [d["layers"][0]["gpus"][1]["experts"][0]] * 2,
                                                  primary=[False, False], weights=[1.0, 1.0]), "twice|primary|no copy"),
    (lambda d: d["layers"][0]["gpus"][0].update(weights=[-1.0] * len(d["layers"][0]["gpus"][0]["weights"])), "weights"),
    (lambda d: d.pop("topology"), "malformed"),
])
def test_invalid_plans_are_refused_with_the_file_named(plan, tmp_path, edit, message):
    data = plan.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(GraceInputError, match=message) as info:
        PlacementPlan.load(path)
    assert "bad.json" in str(info.value)


def test_check_matches_refuses_other_jobs(plan):
    plan.check_matches(8, 2, 2, Topology.uniform(2, 2))
    with pytest.raises(GraceInputError, match="experts"):
        plan.check_matches(16, 2, 2, None)
    with pytest.raises(GraceInputError, match="MoE layers"):
        plan.check_matches(8, 3, 2, None)
    with pytest.raises(GraceInputError, match="top_k"):
        plan.check_matches(8, 2, 4, None)
    with pytest.raises(GraceInputError, match="1 node x 4 GPUs"):
        plan.check_matches(8, 2, 2, Topology.uniform(1, 4))


def test_save_is_atomic_and_keeps_the_old_file_on_failure(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        plan.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
