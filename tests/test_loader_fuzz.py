"""Every loader meets random and mutated bytes with a GraceInputError naming the file, or a valid object;
never another exception, never a partial write."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_ds.deepspeed import split_config
from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.profile import RoutingProfile
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace
from tests.conftest import tiny_trace
from tests.tiny_models import tiny_model


def _valid_files(directory):
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=40), 8)
    profile.save(directory / "profile.safetensors")
    make_plan("eplb", profile, Topology.uniform(2, 2), 1).save(directory / "plan.json")
    RoutingTrace(tiny_trace(tokens=40), 8, ["a", "b"]).save(directory / "trace.safetensors")
    (directory / "loads.json").write_text(json.dumps({"logical_count": [[3, 1, 2, 5], [1, 1, 1, 1]]}))
    (directory / "ds.json").write_text(json.dumps({"dtype": "fp32", "grace_moe": {"plan": "p.json"}}))
    tiny_model("olmoe").save_pretrained(directory / "checkpoint")
    shutil.copy(directory / "checkpoint" / "model.safetensors", directory / "model.safetensors")


def load_checkpoint_weights(path):
    """A transformers checkpoint whose weights file is `path` (its config: the tiny OLMoE's)."""
    from grace_ds.profiling import load_model

    checkpoint = path.parent / "checkpoint_under_test"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(tiny_model("olmoe").config.to_json_string())
    shutil.copy(path, checkpoint / "model.safetensors")
    return load_model(checkpoint)


LOADERS = {
    "profile.safetensors": RoutingProfile.load,
    "plan.json": PlacementPlan.load,
    "trace.safetensors": RoutingTrace.load,
    "loads.json": lambda path: RoutingProfile.from_logical_counts(path, top_k=2),
    "ds.json": split_config,
    "model.safetensors": load_checkpoint_weights,
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    directory = tmp_path_factory.mktemp("valid")
    _valid_files(directory)
    return {name: (directory / name).read_bytes() for name in LOADERS}


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(LOADERS)), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                             max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_mutated_files_are_refused_cleanly(originals, tmp_path, name, edits, cut):
    path = tmp_path / name
    path.write_bytes(mutate(originals[name], edits, cut))
    try:
        LOADERS[name](path)
    except GraceInputError as error:
        assert (name in str(error) or name == "ds.json" and "grace_moe" in str(error)
                or name == "model.safetensors" and "cannot load the model" in str(error))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(LOADERS)), payload=st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(GraceInputError):
        LOADERS[name](path)
