import json

import pytest
import torch

from grace_ds.errors import GraceInputError
from grace_ds.routing_profile import RoutingProfile
from tests.conftest import tiny_trace


def test_from_topk_ids_counts_load_and_coactivation_by_hand():
    # 3 tokens, 1 layer, top-2 of 4 experts.
    ids = torch.tensor([[[0, 1]], [[1, 2]], [[0, 1]]])
    profile = RoutingProfile.from_topk_ids(ids, num_experts=4)
    assert profile.expert_load[0].tolist() == [2, 3, 1, 0]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 1] = expected[1, 0] = 2
    expected[1, 2] = expected[2, 1] = 1
    assert torch.equal(profile.coactivation[0], expected)
    assert profile.num_tokens.tolist() == [3]
    assert profile.top_k == 2


def test_merge_equals_profile_of_concatenated_trace():
    trace = tiny_trace(tokens=50)
    first = RoutingProfile.from_topk_ids(trace[:20], 8)
    second = RoutingProfile.from_topk_ids(trace[20:], 8)
    whole = RoutingProfile.from_topk_ids(trace, 8)
    merged = first.merge(second)
    assert torch.equal(merged.expert_load, whole.expert_load)
    assert torch.equal(merged.coactivation, whole.coactivation)
    assert torch.equal(merged.num_tokens, whole.num_tokens)


def test_save_load_round_trip(tmp_path):
    profile = RoutingProfile.from_topk_ids(tiny_trace(), 8, model_name="tiny", layer_names=["a", "b"])
    profile.save(tmp_path / "p.safetensors")
    again = RoutingProfile.load(tmp_path / "p.safetensors")
    assert torch.equal(again.expert_load, profile.expert_load)
    assert torch.equal(again.coactivation, profile.coactivation)
    assert torch.equal(again.sample_topk_ids, profile.sample_topk_ids)
    assert (again.model_name, again.layer_names, again.top_k) == ("tiny", ["a", "b"], 2)


def test_merge_refuses_other_shapes():
    a = RoutingProfile.from_topk_ids(tiny_trace(experts=8), 8)
    b = RoutingProfile.from_topk_ids(tiny_trace(experts=6), 6)
    with pytest.raises(GraceInputError, match="cannot merge"):
        a.merge(b)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.expert_load.__setitem__((0, 0), -1.0), "negative"),
    (lambda p: p.expert_load.__setitem__((0, 0), float("nan")), "NaN"),
    (lambda p: p.coactivation.__setitem__((0, 0, 1), 999.0), "symmetric"),
    (lambda p: p.expert_load.__setitem__(0, 0.0), "all zero"),
])
def test_validation_rejects_inconsistent_profiles(mutate, message):
    profile = RoutingProfile.from_topk_ids(tiny_trace(), 8)
    mutate(profile)
    with pytest.raises(GraceInputError, match=message):
        profile.validate()


def test_trace_with_repeated_expert_is_rejected():
    with pytest.raises(GraceInputError, match="twice"):
        RoutingProfile.from_topk_ids(torch.tensor([[[1, 1]]]), 4)


def test_load_only_profile_drops_dense_layers(tmp_path):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"logical_count": [[0, 0, 0, 0], [5, 1, 1, 1], [2, 2, 2, 2]]}))
    profile = RoutingProfile.from_logical_counts(path, top_k=2)
    assert profile.layer_names == ["layer_1", "layer_2"]
    assert profile.coactivation is None
    assert profile.num_tokens.tolist() == [5, 4]


@pytest.mark.parametrize("payload, message", [
    ({"logical_count": [[1, 2], [3]]}, "different lengths"),
    ({"logical_count": [[0, 0]]}, "all zero"),
    ({"logical_count": [[1, -2]]}, "negative"),
    ({"other": 1}, "logical_count"),
])
def test_load_only_profile_rejects_bad_json(tmp_path, payload, message):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(GraceInputError, match=message):
        RoutingProfile.from_logical_counts(path, top_k=1)


def test_truncated_profile_file_names_the_file(tmp_path):
    profile = RoutingProfile.from_topk_ids(tiny_trace(), 8)
    path = tmp_path / "p.safetensors"
    profile.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GraceInputError, match="p.safetensors"):
        RoutingProfile.load(path)
