"""DeepSpeed checkpoints across expert layouts, on 4 gloo ranks as 2 nodes x 2 (one spawn for every case):
saved under a GRACE plan with replicas and loaded under other plans (contiguous with empty slots, more
replica slots, other experts), under ZeRO 0, 1 and 2; DeepSpeed's own MoE into GraceMoE; a GRACE
checkpoint exported to DeepSpeed's layout into DeepSpeed's MoE (grace_ds.deepspeed_checkpoint)."""
import json

import pytest
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import checkpoint_layout_worker

WORLD, NODES = 4, 2
FP32 = 1e-5  # another plan sums the same products in another order
BF16 = 2e-2  # the same in bf16, relative to losses of about 1
STEP = 0.05  # how far one clipped SGD step moves a weight, at most (seen: 0.016; a fresh engine is 2.8 away)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_layout")
    mp.spawn(checkpoint_layout_worker.main, args=(WORLD, NODES, free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_loaded(entry: dict, case: str, exact: bool, bound: float = FP32) -> None:
    """Every logical expert (and every copy of it) holds the saved weights; the forward is the saver's."""
    bound = 0.0 if exact else bound
    assert all(value == 0.0 for value in entry["parameters"].values()), (case, entry["parameters"])
    assert entry["slots"] == 0.0 and entry["replicas_apart"] == 0.0, (case, entry)
    assert entry["forward"] <= bound, (case, entry["forward"])


def stages(reports):
    for rank, report in enumerate(reports):
        for stage in (0, 1, 2):
            yield f"rank {rank} zero{stage}", report[f"zero{stage}"]


def test_same_plan_round_trips_and_continues_exactly(reports):
    """Same plan, optimizer states loaded: the weights, and the next step, exactly the saver's."""
    for case, entry in stages(reports):
        assert entry["record"], case
        assert_loaded(entry["same_plan"], case, exact=True)
        assert all(v == 0.0 for v in entry["same_plan"]["continued"].values()), (case, entry["same_plan"])


def test_other_plan_loads_each_slot_with_its_logical_expert(reports):
    """Contiguous (empty slots), more replica slots, other experts: every copy of every logical expert
    holds the saved weights (also with load_module_only), and the forward is the saver's."""
    for case, entry in stages(reports):
        assert_loaded(entry["other_plan"], case, exact=False)
        assert_loaded(entry["module_only"], case + " module only", exact=False)
    assert {r["zero1"]["other_plan"]["copies"] for r in reports} != {0}  # the other plans replicate too


def test_other_plan_refuses_optimizer_states_and_steps_from_the_loaded_weights(reports):
    """Optimizer states follow the saved slots: refused, naming what differs and what to pass; without
    them (ZeRO's fp32 masters refreshed from the loaded weights) a step equals the saved plan's."""
    for case, entry in stages(reports):
        message = entry["refused"]
        assert "was saved under a GRACE plan" in message and "load_optimizer_states=False" in message, (case, message)
        assert max(entry["other_plan"]["stepped"].values()) <= FP32, (case, entry["other_plan"]["stepped"])
        assert_stepped_from_loaded(entry["other_plan"], case)


def assert_stepped_from_loaded(entry: dict, case: str) -> None:
    """The step after the load started from the loaded weights, not from the fresh engine's fp32 masters."""
    assert entry["step_size"] <= STEP < entry["initial_distance"], (case, entry)


def test_bf16_other_plan_refreshes_the_fp32_masters(reports):
    """bf16 without ZeRO (DeepSpeed's BF16_Optimizer, whose fp32 masters DeepSpeed leaves stale when no
    optimizer state is loaded): the experts relabelled, weights remapped, the next step from them."""
    for rank, report in enumerate(reports):
        entry, case = report["bf16-zero0"], f"rank {rank} bf16"
        assert "load_optimizer_states=False" in entry["refused"], entry["refused"]
        assert_loaded(entry["other_plan"], case, exact=False, bound=BF16)
        assert_stepped_from_loaded(entry["other_plan"], case)


def test_deepspeed_moe_checkpoint_loads_into_grace_moe(reports):
    for rank, report in enumerate(reports):
        entry = report["deepspeed_moe"]
        assert "DeepSpeed's layout" in entry["refused"], entry["refused"]
        assert_loaded(entry, f"rank {rank} DeepSpeed MoE -> GraceMoE", exact=False)
        assert entry["copies"] > 0  # the GRACE plan replicates


def test_grace_checkpoint_exported_loads_into_deepspeed_moe(reports):
    for rank, report in enumerate(reports):
        entry = report["export"]
        assert entry["exit_code"] == 0
        assert all(v == 0.0 for v in entry["parameters"].values()), (rank, entry)
        assert entry["forward"] <= FP32, (rank, entry)


def test_converted_transformers_model_loads_under_another_plan(reports):
    """GraceExpertsMoE (a converted Mixtral, 2 MoE layers: DeepSpeed's moe_layer_id order), ZeRO 1."""
    for rank, report in enumerate(reports):
        entry = report["transformers"]
        assert entry["layers"] == 2 and entry["replicated"] > 0, entry
        assert "MoE layer 0" in entry["refused"] and "GPU 0's slots held experts" in entry["refused"], entry
        assert entry["experts"] == 0.0 and entry["dense"] == 0.0 and entry["replicas_apart"] == 0.0, (rank, entry)
        assert entry["loss"] <= FP32, (rank, entry)
