"""Every loader meets random and mutated bytes with a GraceInputError naming the file, or a valid object;
never another exception. A writer interrupted half-way leaves the file it replaces as it was, and no
temporary file beside it."""
import json
import shutil

import torch
from safetensors.torch import load_file, save_file

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_ds.checkpoint_layout import LayerLayout, read_record, write_layout
from grace_ds.deepspeed_config import split_config
from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.simulate import simulate_trace
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace
from tests.conftest import tiny_trace
from tests.tiny_models import tiny_model


def _valid_files(directory):
    profile = RoutingProfile.from_topk_ids(tiny_trace(tokens=40), 8)
    profile.save(directory / "profile.safetensors")
    plan = make_plan("eplb", profile, Topology.uniform(2, 2), 1)
    plan.save(directory / "plan.json")
    write_layout(directory / "grace_layout.json", [  # a checkpoint's layout record: two GRACE layers, one DeepSpeed's
        LayerLayout("grace", 8, plan.slots_per_gpu, tuple(map(tuple, plan.slot_expert[layer].tolist())),
                    tuple(map(tuple, plan.slot_is_primary[layer].tolist()))) for layer in range(2)]
        + [LayerLayout("deepspeed", 8, 2)],
        {rank: ["inp.weight", f"moe.deepspeed_moe.experts.deepspeed_experts.{rank}.fc1.weight"] for rank in range(4)}, 4)
    RoutingTrace(tiny_trace(tokens=40), 8, ["a", "b"]).save(directory / "trace.safetensors")
    (directory / "loads.json").write_text(json.dumps({"logical_count": [[3, 1, 2, 5], [1, 1, 1, 1]]}))
    (directory / "ds.json").write_text(json.dumps({"dtype": "fp32", "grace_moe": {"plan": "p.json"}}))
    tiny_model("olmoe").save_pretrained(directory / "checkpoint")
    shutil.copy(directory / "checkpoint" / "model.safetensors", directory / "model.safetensors")
    shutil.copy(directory / "checkpoint" / "model.safetensors", directory / "rank-model.safetensors")


def load_checkpoint_weights(path):
    """A transformers checkpoint whose weights file is `path` (its config: the tiny OLMoE's)."""
    from grace_ds.profiling import load_model

    checkpoint = path.parent / "checkpoint_under_test"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(tiny_model("olmoe").config.to_json_string())
    shutil.copy(path, checkpoint / "model.safetensors")
    return load_model(checkpoint)


def _rank_runtime():
    from grace_ds.runtime import GraceRuntime

    return GraceRuntime(make_plan("grace", RoutingProfile.from_topk_ids(tiny_trace(tokens=40), 8),
                                  Topology.uniform(2, 2), 1), rank=1)


def load_checkpoint_for_rank(path):
    """The same checkpoint read rank by rank (grace_ds.models.rank_load) for rank 1 of a 2 x 2 plan."""
    from grace_ds.models.rank_load import load_for_rank

    checkpoint = path.parent / "rank_checkpoint_under_test"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(tiny_model("olmoe").config.to_json_string())
    shutil.copy(path, checkpoint / "model.safetensors")
    return load_for_rank(checkpoint, _rank_runtime(), progress=False)[0]


LOADERS = {
    "profile.safetensors": RoutingProfile.load,
    "plan.json": PlacementPlan.load,
    "trace.safetensors": RoutingTrace.load,
    "loads.json": lambda path: RoutingProfile.from_logical_counts(path, top_k=2),
    "ds.json": split_config,
    "model.safetensors": load_checkpoint_weights,
    "grace_layout.json": read_record,
    "rank-model.safetensors": load_checkpoint_for_rank,
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


def assert_usable(name: str, loaded, path) -> None:
    """What a loaded object must be for its consumers: checked here in their terms, not by re-running the
    loader's own validation, so a loader that lets a broken file through fails the test."""
    if name == "plan.json":
        assert isinstance(loaded, PlacementPlan)
        occupied = loaded.slot_expert >= 0
        assert loaded.slot_expert.max() < loaded.num_experts and (loaded.slot_weight[occupied] > 0).all()
        assert (loaded.copies_per_expert() >= 1).all()
        assert (loaded.slot_is_primary.sum((1, 2)) == loaded.num_experts).all()  # one primary per expert
        ids = tiny_trace(tokens=16, layers=loaded.num_layers, experts=loaded.num_experts, top_k=loaded.top_k)
        simulate_trace(loaded, ids)  # the router serves it
    elif name in ("profile.safetensors", "loads.json"):
        assert isinstance(loaded, RoutingProfile)
        load = loaded.expert_load
        assert load.dim() == 2 and torch.isfinite(load).all() and (load >= 0).all() and (load.sum(1) > 0).all()
        assert len(loaded.layer_names) == loaded.num_layers and 1 <= loaded.top_k <= loaded.num_experts
        make_plan("eplb", loaded, Topology.uniform(2, 2), 1)  # a planner takes it
    elif name == "trace.safetensors":
        assert isinstance(loaded, RoutingTrace)
        ids = loaded.topk_ids
        assert ids.dim() == 3 and ids.shape[0] >= 1 and len(loaded.layer_names) == ids.shape[1]
        assert 0 <= int(ids.min()) and int(ids.max()) < loaded.num_experts
    elif name == "ds.json":
        rest, section = loaded
        on_disk = json.loads(path.read_text())
        assert rest == {k: v for k, v in on_disk.items() if k != "grace_moe"}
        assert (section is None) == (on_disk.get("grace_moe") is None)
    elif name == "model.safetensors":
        model, _ = loaded
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert logits.shape == (1, 3, model.config.vocab_size)
    elif name == "rank-model.safetensors":  # every weight the rank holds as the safetensors package reads it
        try:
            official = load_file(str(path))
        except Exception as error:  # noqa: BLE001 (whatever the official reader raises)
            raise AssertionError(f"read rank by rank, but the safetensors package refuses it: {error}") from None

        def bits(tensor):
            return tensor.to(torch.float32).view(torch.int32)

        got = loaded.state_dict()
        dense = [key for key in got if ".experts." not in key]
        assert all(torch.equal(bits(got[key]), bits(official[key])) for key in dense)
        for layer, block in enumerate(block.mlp for block in loaded.model.layers):
            for slot, expert in enumerate(_rank_runtime().local_slots(layer).tolist()):
                if expert >= 0:
                    gate_up, down = block.experts.slots.slot_weights(slot)
                    stored = f"model.layers.{layer}.mlp.experts.{expert}."
                    assert torch.equal(bits(gate_up), bits(torch.cat([official[stored + "gate_proj.weight"],
                                                                      official[stored + "up_proj.weight"]])))
                    assert torch.equal(bits(down), bits(official[stored + "down_proj.weight"]))
    elif name == "grace_layout.json":
        layouts, order, world = loaded.layers, loaded.optimizer_order, loaded.world_size
        assert world is None or (isinstance(world, int) and world >= 1)
        assert order is None or all(isinstance(rank, int) and all(isinstance(n, str) for n in names)
                                    for rank, names in order.items())  # a load can look up each parameter
        for layout in layouts:  # a load can fill every slot: each expert has one file to read it from
            assert isinstance(layout, LayerLayout) and layout.kind in ("grace", "deepspeed")
            files = layout.file_of_expert()
            assert sorted(files) == list(range(layout.num_experts))
            assert all(0 <= f < len(layout.file_experts()) and layout.file_experts()[f] == e for e, f in files.items())
    else:
        raise AssertionError(f"no usability check for {name}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(LOADERS)), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                             max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_mutated_files_are_refused_cleanly_or_load_usable(originals, tmp_path, name, edits, cut):
    path = tmp_path / name
    path.write_bytes(mutate(originals[name], edits, cut))
    try:
        loaded = LOADERS[name](path)
    except GraceInputError as error:
        assert (name in str(error) or name == "ds.json" and "grace_moe" in str(error)
                or name == "model.safetensors" and "cannot load the model" in str(error)
                or name == "rank-model.safetensors" and "rank_checkpoint_under_test" in str(error))
    else:
        assert_usable(name, loaded, path)


def _edited_json(original: bytes, edit) -> bytes:
    data = json.loads(original)
    edit(data)
    return json.dumps(data).encode()


def _edited_tensors(path, name: str, edit) -> None:
    from grace_ds.files import METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    edit(tensors[name])
    save_file(tensors, str(path), metadata={METADATA_KEY: metadata[METADATA_KEY]})


def _promote_a_replica(plan: dict) -> None:
    """Marks the first replica of the plan primary: its expert then has two primary copies."""
    for gpu in plan["layers"][0]["gpus"]:
        if not all(gpu["primary"]):
            gpu["primary"][gpu["primary"].index(False)] = True
            return
    raise AssertionError("the plan has no replica to promote")


# Files that still parse but say something impossible: a loader must refuse each (fuzzing may never hit them).
PARSEABLE_BUT_WRONG = {
    "plan: expert id past num_experts": ("plan.json", lambda d: d["layers"][0]["gpus"][0]["experts"].__setitem__(0, 8)),
    "plan: negative copy weight": ("plan.json", lambda d: d["layers"][1]["gpus"][2]["weights"].__setitem__(0, -0.5)),
    "plan: an expert with two primaries": ("plan.json", lambda d: _promote_a_replica(d)),
    "loads: a negative count": ("loads.json", lambda d: d["logical_count"][0].__setitem__(1, -4)),
    "layout: an expert with two primaries": ("grace_layout.json", lambda d: d["layers"][0].__setitem__(
        "slot_is_primary", [[e >= 0 for e in row] for row in d["layers"][0]["slot_expert"]])),
    "layout: expert id past num_experts": ("grace_layout.json", lambda d: d["layers"][1]["slot_expert"][0].__setitem__(0, 8)),
    "layout: an unknown layer kind": ("grace_layout.json", lambda d: d["layers"][2].__setitem__("kind", "tutel")),
    "layout: a world of no ranks": ("grace_layout.json", lambda d: d.__setitem__("world_size", 0)),
    "layout: optimizer parameters not a list of names": (
        "grace_layout.json", lambda d: d["optimizer_parameters"].__setitem__("1", "inp.weight")),
    "ds: an unknown communication mode": ("ds.json", lambda d: d["grace_moe"].__setitem__("communication", "sideways")),
    "profile: negative load": ("profile.safetensors", ("expert_load", lambda t: t.__setitem__((0, 0), -1.0))),
    "profile: sampled expert id past num_experts": (
        "profile.safetensors", ("sample_topk_ids", lambda t: t.__setitem__((0, 0, 0), 8))),
    "trace: expert id past num_experts": ("trace.safetensors", ("topk_ids", lambda t: t.__setitem__((3, 1, 0), 8))),
}


@pytest.mark.parametrize("case", sorted(PARSEABLE_BUT_WRONG))
def test_parseable_files_with_impossible_contents_are_refused(originals, tmp_path, case):
    name, edit = PARSEABLE_BUT_WRONG[case]
    path = tmp_path / name
    path.write_bytes(originals[name])
    if name.endswith(".json"):
        path.write_bytes(_edited_json(originals[name], edit))
    else:
        _edited_tensors(path, *edit)
    with pytest.raises(GraceInputError, match="grace_moe" if name == "ds.json" else name):
        LOADERS[name](path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(LOADERS)), payload=st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(GraceInputError):
        LOADERS[name](path)


class _Interrupted(BaseException):
    """Stands for a kill or Ctrl-C in the middle of a write (not an Exception: cleanup must still run)."""


def _interrupt(*args, **kwargs):
    raise _Interrupted


WRITERS = {
    "plan.json": lambda directory, path: make_plan(
        "contiguous", RoutingProfile.from_topk_ids(tiny_trace(tokens=40, seed=3), 8), Topology.uniform(2, 2)).save(path),
    "profile.safetensors": lambda directory, path: RoutingProfile.from_topk_ids(tiny_trace(tokens=40, seed=3), 8).save(path),
    "trace.safetensors": lambda directory, path: RoutingTrace(tiny_trace(tokens=40, seed=3), 8, ["a", "b"]).save(path),
}


# Where each writer can be cut: its payload's last call before the rename, and the rename itself.
CUT_POINTS = [(name, where) for name in sorted(WRITERS)
              for where in ("os.fsync" if name.endswith(".json") else "save_file", "os.replace")]


@pytest.mark.parametrize(("name", "where"), CUT_POINTS)
def test_an_interrupted_write_leaves_the_old_file_whole_and_no_partial_one(tmp_path, monkeypatch, name, where):
    """Interrupted before the new bytes are all down (fsync, the safetensors writer) or just before they
    take the old file's place (rename): the path still holds the old file, byte for byte, and nothing
    half-written lies beside it. A writer that wrote the path in place would leave it changed."""
    import grace_ds.files

    path = tmp_path / name
    earlier = f"the file {name} held before this write".encode()  # not written by the writer under test
    path.write_bytes(earlier)
    if where == "save_file":
        def half_then_interrupt(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:  # the bytes so far: a truncated file
                handle.truncate(len(handle.read()) // 2)
            raise _Interrupted
        monkeypatch.setattr(grace_ds.files, "save_file", half_then_interrupt)
    else:
        module, function = where.split(".")
        monkeypatch.setattr(getattr(grace_ds.files, module), function, _interrupt)
    with pytest.raises(_Interrupted):
        WRITERS[name](tmp_path, path)
    monkeypatch.undo()
    assert path.read_bytes() == earlier
    assert [p.name for p in tmp_path.iterdir()] == [name]
