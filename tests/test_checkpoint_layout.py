"""DeepSpeed checkpoints across expert layouts, on 4 gloo ranks as 2 nodes x 2 (one spawn for every case):
saved under a GRACE plan with replicas and loaded under other plans (contiguous with empty slots, more
replica slots, other experts), under ZeRO 0, 1 and 2, with and without optimizer states; DeepSpeed's own MoE into GraceMoE; a GRACE
checkpoint exported to DeepSpeed's layout into DeepSpeed's MoE (grace_ds.deepspeed_checkpoint)."""
import json

import pytest
import torch
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import checkpoint_layout_worker

WORLD, NODES = 4, 2
FP32 = 1e-5  # another plan sums the same products in another order
BF16 = 2e-2  # the same in bf16, relative to losses of about 1
BF16_ROUNDING = 2.0 ** -8  # one bf16 rounding of a weight below 1 (seen: 4.9e-4; fresh optimizer state: 4.7e-2)
STEP = 0.05  # how far one clipped SGD step moves a weight, at most (seen: 0.016; a fresh engine is 2.8 away)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the folder of the checkpoints, every rank's report)."""
    if checkpoint_layout_worker.DEVICE.type == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"{WORLD} ranks need {WORLD} GPUs (GRACE_TEST_DEVICE=cuda), {torch.cuda.device_count()} visible")
    out = tmp_path_factory.mktemp("checkpoint_layout")
    mp.spawn(checkpoint_layout_worker.main, args=(WORLD, NODES, free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reports(run):
    return run[1]


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


def test_other_plan_remaps_optimizer_states_and_continues_as_the_saver(reports):
    """Optimizer states follow the saved slots; under another plan each slot's (AdamW's exp_avg, exp_avg_sq
    and step, SGD's momentum; ZeRO's fp32 masters) come from its logical expert's saved primary: the next
    step equals the saver's next step. A fresh optimizer state lands far from it (the check can fail)."""
    for case, entry in stages(reports):
        remapped = entry["with_states"]
        assert_loaded(remapped, case + " with optimizer states", exact=False)
        assert max(remapped["continued"].values()) <= FP32, (case, remapped["continued"])
        assert remapped["step_size"] > 100 * FP32 and entry["other_plan"]["vs_saver"] > 100 * FP32, (case, entry)


def test_other_plan_without_optimizer_states_steps_from_the_loaded_weights(reports):
    """load_optimizer_states=False: ZeRO's fp32 masters refreshed from the loaded weights, a step equals
    the saved plan's step from fresh optimizer state."""
    for case, entry in stages(reports):
        assert max(entry["other_plan"]["stepped"].values()) <= FP32, (case, entry["other_plan"]["stepped"])
        assert_stepped_from_loaded(entry["other_plan"], case)


def assert_stepped_from_loaded(entry: dict, case: str) -> None:
    """The step after the load started from the loaded weights, not from the fresh engine's fp32 masters."""
    assert entry["step_size"] <= STEP < entry["initial_distance"], (case, entry)


def test_bf16_other_plan_refreshes_the_fp32_masters(reports):
    """bf16 without ZeRO (DeepSpeed's FP16_UnfusedOptimizer, whose fp32 masters DeepSpeed leaves stale when
    no optimizer state is loaded): the experts relabelled, weights remapped, the next step from them; with
    optimizer states (its fp32 masters and momenta remapped) the next step is the saver's."""
    for rank, report in enumerate(reports):
        entry, case = report["bf16-zero0"], f"rank {rank} bf16"
        assert_loaded(entry["other_plan"], case, exact=False, bound=BF16)
        assert_stepped_from_loaded(entry["other_plan"], case)
        assert_loaded(entry["with_states"], case + " with optimizer states", exact=False, bound=BF16)
        # The saver's next step within one bf16 rounding of a weight below 1; fresh state lands farther.
        assert max(entry["with_states"]["continued"].values()) <= BF16_ROUNDING < entry["other_plan"]["vs_saver"], entry


def test_optimizers_not_remapped_are_refused_by_name(reports):
    """ZeRO's elastic checkpoints (DeepSpeed merges their partitions itself): one GraceInputError naming
    the layouts, the reason and what to pass."""
    for rank, report in enumerate(reports):
        message = report["zero1"]["refused"]
        assert "was saved under a GRACE plan" in message and "elastic_checkpoint" in message, (rank, message)
        assert "load_optimizer_states=False" in message, (rank, message)


def test_expert_data_parallel_zero2_joins_split_parameters(reports):
    """ep_size 2 on 4 ranks, ZeRO 2: parameters split between two ranks' partitions are joined, and the
    next step under another plan is the saver's."""
    for rank, report in enumerate(reports):
        entry = report["expert_data_parallel"]
        assert_loaded(entry, f"rank {rank} ep_size 2", exact=False)
        assert max(entry["continued"].values()) <= FP32 < 100 * FP32 < entry["step_size"], (rank, entry)
    assert sum(report["expert_data_parallel"]["split"] for report in reports) > 0  # some parameter was split


def test_deepspeed_moe_checkpoint_loads_into_grace_moe(reports):
    for rank, report in enumerate(reports):
        entry = report["deepspeed_moe"]
        message = entry["refused"]  # optimizer states: its experts per rank are not recorded
        assert "DeepSpeed's layout" in message and "load_optimizer_states=False" in message, message
        assert_loaded(entry, f"rank {rank} DeepSpeed MoE -> GraceMoE", exact=False)
        assert entry["copies"] > 0  # the GRACE plan replicates


def test_grace_checkpoint_exported_loads_into_deepspeed_moe(reports):
    for rank, report in enumerate(reports):
        entry = report["export"]
        assert entry["exit_code"] == 0
        assert all(v == 0.0 for v in entry["parameters"].values()), (rank, entry)
        assert entry["forward"] <= FP32, (rank, entry)


def test_converted_transformers_model_loads_under_another_plan(reports):
    """GraceExpertsMoE (a converted Mixtral, 2 MoE layers: DeepSpeed's moe_layer_id order), ZeRO 1, with
    optimizer states: the weights are the saver's, and the next step is the saver's next step."""
    for rank, report in enumerate(reports):
        entry = report["transformers"]
        assert entry["layers"] == 2 and entry["replicated"] > 0, entry
        assert entry["experts"] == 0.0 and entry["dense"] == 0.0 and entry["replicas_apart"] == 0.0, (rank, entry)
        assert entry["loss"] <= FP32, (rank, entry)
        assert entry["continued"] <= FP32 < 100 * FP32 < entry["step_size"], (rank, entry)


def test_a_job_of_another_size_loads_weights_and_optimizer_states_under_its_plan(run):
    """The 4-rank checkpoints in a job of 2 ranks (2 nodes x 1) under a GRACE plan for 2 GPUs: every copy of
    every logical expert and every dense weight the saver's, and so every optimizer state: ZeRO 1's fp32
    masters and SGD momenta (partitions cut anew for 2 ranks; DeepSpeed alone refuses another size) and ZeRO 0's
    torch AdamW exp_avg and exp_avg_sq (per-rank files, taken by name)."""
    out, _ = run
    mp.spawn(checkpoint_layout_worker.resize_main, args=(2, 2, free_port(), str(out)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((out / f"resize-rank{rank}.json").read_text())
        for stage, keys in ((1, ("fp32", "momentum")), (0, ("exp_avg", "exp_avg_sq"))):
            entry = report[f"zero{stage}"]
            print(f"rank {rank} zero{stage}", entry["optimizer"])
            assert_loaded(entry, f"rank {rank} of 2, zero{stage}", exact=False)
            assert set(entry["optimizer"]) == {f"{kind}/{key}" for kind in ("upstream", "gate", "experts")
                                               for key in keys}, entry["optimizer"]
            assert max(entry["optimizer"].values()) == 0.0 < entry["state_size"], entry
            assert entry["copies"] > 0 and entry["step_size"] <= STEP, entry


def test_a_larger_job_loads_per_parameter_states_its_extra_ranks_have_no_file_for(run):
    """4 -> 2 -> 4 ranks: the 2-rank job's ZeRO-0 checkpoint (saved right after loading the 4-rank one) in a job
    of 4 under a third layout (contiguous, empty slots): ranks 2 and 3 read a saver rank's file for the dense
    states; every weight and AdamW state is the original saver's, the groups keep this job's names, and the
    next step is the saver's next step."""
    out, _ = run
    mp.spawn(checkpoint_layout_worker.grow_main, args=(4, 2, free_port(), str(out)), nprocs=4, join=True)
    for rank in range(4):
        entry = json.loads((out / f"grow-rank{rank}.json").read_text())
        print(f"rank {rank}", entry["optimizer"], entry["continued"], entry["groups"])
        assert_loaded(entry, f"rank {rank} of 4", exact=False)
        assert max(entry["optimizer"].values()) == 0.0, entry["optimizer"]
        assert "ep_size_4" in entry["groups"], entry["groups"]
        assert max(entry["continued"].values()) <= FP32 < 100 * FP32 < entry["step_size"], entry
