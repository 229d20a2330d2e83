"""transformers' Trainer through GRACE (grace_ds.transformers_trainer.GraceTrainer), on 4 gloo ranks as 2 nodes
x 2 (on GPUs, scripts/gpu_exactness.sh: the largest layout of GRACE_TEST_LAYOUTS, NCCL, plus bf16): a converted
Mixtral with replicated experts, router loss on, clipping on, trained as transformers' Trainer trains the
unmodified model under the same DeepSpeed JSON (ZeRO 0/1/2, Trainer's AdamW or the config's, gradient
accumulation, gradient checkpointing, evaluation during training); checkpoints that from_pretrained loads as
the unmodified model; a run resumed from its checkpoint-N under another plan; GRACE's figures in every training
log; an accelerate loop through GraceAccelerator against accelerate's own on the unmodified model."""
import os

import pytest
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import trainer_worker

NODES, PER_NODE = map(int, os.environ.get("GRACE_TEST_LAYOUTS", "2x2").split(",")[-1].split("x"))
WORLD = NODES * PER_NODE
FP32 = 1e-5  # only summation order differs
BF16 = 2 ** -6  # two bf16 roundings, relative
ON_GPU = trainer_worker.DEVICE.type == "cuda"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("trainer")
    mp.spawn(trainer_worker.main, args=(WORLD, NODES, free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


CASES = ["zero1/trainer-adamw/accumulation2", "zero2/config-adamw/evaluation",
         "zero0/trainer-adamw/gradient-checkpointing"]


@pytest.mark.skipif(not ON_GPU, reason="transformers refuses bf16 on a CPU run that uses DeepSpeed")
def test_bf16_trains_as_the_unmodified_model_within_bf16_rounding(report):
    for rank_report in report:
        entry = rank_report["zero1/bf16"]
        print({k: entry[k] for k in ("loss", "first_loss", "weights", "weight_scale", "replicas_apart")})
        assert entry["steps"] == list(range(1, trainer_worker.STEPS + 1))
        assert entry["loss"] < BF16 * entry["first_loss"]
        assert max(entry["weights"].values()) < BF16 * entry["weight_scale"], entry["weights"]
        assert entry["replicas_apart"] == 0.0


@pytest.mark.parametrize("case", CASES)
def test_trains_as_the_unmodified_model_under_transformers_trainer(report, case):
    for rank_report in report:
        entry = rank_report[case]
        print(case, {k: entry[k] for k in ("loss", "grad_norms", "weights", "replicas_apart")})
        assert entry["steps"] == list(range(1, trainer_worker.STEPS + 1))
        assert entry["moe_groups"] > 0 and (entry["replicated_experts"] > 0 or WORLD == 1)  # one GPU: no copies
        assert entry["loss"] < FP32 * entry["first_loss"]
        for mine, theirs in zip(entry["grad_norms"], entry["reference_grad_norms"]):
            assert mine is not None and (theirs is None or abs(mine - theirs) < FP32 * theirs), (mine, theirs)
        assert max(entry["weights"].values()) < FP32, entry["weights"]
        assert entry["replicas_apart"] == 0.0
        mine, theirs = entry["eval_losses"], entry["reference_eval_losses"]
        assert [step for step, _ in mine] == [step for step, _ in theirs] == ([3, 6] if "evaluation" in case else [])
        assert all(abs(a - b) < FP32 * b for (_, a), (_, b) in zip(mine, theirs)), (mine, theirs)


def test_a_checkpoint_directory_in_place_of_the_model_trains_the_same(report):
    """GraceTrainer(model="DIR") reads each rank's share of the checkpoint (grace_ds.models.rank_load) and trains as
    the unmodified model under Trainer (the ZeRO 0 case, gradient checkpointing on)."""
    for rank_report in report:
        loaded = rank_report["zero0/trainer-adamw/gradient-checkpointing"]["from_directory"]
        first = rank_report["zero0/trainer-adamw/gradient-checkpointing"]["first_loss"]
        assert loaded["loss"] < FP32 * first and max(loaded["weights"].values()) < FP32, loaded
        assert (loaded["skipped_expert_bytes"] > 0) == (WORLD > 1)  # other ranks' experts left unread


def test_fp32_without_zero_logs_the_exact_global_norm(report):
    """DeepSpeed's fp32 engine without ZeRO logs no norm; GRACE's clips by the exact global one and reports it:
    at the first step (same weights, same batches) it is the norm ZeRO 2 reports for the unmodified model."""
    mine, theirs = report[0][CASES[2]]["grad_norms"][0], report[0][CASES[1]]["reference_grad_norms"][0]
    print(mine, theirs)
    assert report[0][CASES[2]]["reference_grad_norms"][0] is None
    assert abs(mine - theirs) < FP32 * theirs


def test_saved_checkpoints_load_as_the_unmodified_model(report):
    entry = report[0][CASES[0]]
    for label in ("saved_checkpoint", "saved_final"):
        print(label, entry[label])
        assert entry[label]["class"] == "MixtralForCausalLM" and entry[label]["same_names"]
        assert entry[label]["difference"] < FP32
    assert entry["layout_record"]


def test_profiling_puts_the_runs_routing_in_every_checkpoint(report):
    """`"profiling": true`: checkpoint-3 holds the routing of steps 1-3, profile_out that of the whole run, the
    same tokens and per-expert loads as hooks on the unmodified model's routers counted."""
    for rank_report in report:
        profile = rank_report[CASES[0]]["profile"]
        print(profile)
        tokens = trainer_worker.STEPS * 2 * 2 * 12 * WORLD  # steps x accumulation x batch x length x ranks
        assert profile["tokens"] == profile["reference_tokens"] == [tokens] * 2
        assert profile["checkpoint_tokens"] == [tokens * trainer_worker.SAVE_AT // trainer_worker.STEPS] * 2
        assert profile["load_difference"] == 0.0


def test_resumed_under_another_plan_continues_the_run(report):
    """checkpoint-3 of the GRACE plan resumed under a plan made from checkpoint-3's own routing profile (two
    replica slots a GPU): steps 4-6 and the final weights as the uninterrupted unmodified run's (weights, AdamW
    states, scheduler and data position all restored)."""
    for rank_report in report:
        resumed = rank_report[CASES[0]]["resumed"]
        print(resumed)
        assert resumed["plan"] == "grace" and resumed["slots_per_gpu"][0] != resumed["slots_per_gpu"][1]
        assert resumed["steps"] == list(range(1, trainer_worker.STEPS + 1))
        assert resumed["loss"] < FP32 * 10 and max(resumed["weights"].values()) < FP32, resumed


def test_grace_figures_in_every_training_log(report):
    for case in CASES:
        logged = [r[case]["logged"] for r in report]
        assert all(rank_logs == logged[0] for rank_logs in logged), "ranks logged different figures"
        for figures in logged[0]:
            assert set(figures) == {f"grace_moe/{name}" for name in ("forward_cross_node_MB_per_step",
                                                                      "forward_same_node_MB_per_step",
                                                                      "load_max_over_mean")}
            assert (figures["grace_moe/forward_cross_node_MB_per_step"] > 0) == (NODES > 1)
            assert figures["grace_moe/load_max_over_mean"] >= 1.0
        # One log per optimizer step: the intervals add up to what the runtime counted over the run.
        mean_logged = sum(f["grace_moe/forward_cross_node_MB_per_step"] for f in logged[0]) / len(logged[0])
        assert abs(mean_logged - report[0][case]["counted_cross_node_MB"]) < 1e-9 * max(1.0, mean_logged)


def test_an_accelerate_loop_trains_as_the_unmodified_model(report):
    """grace_ds.hf_accelerate.GraceAccelerator: convert, prepare, backward, step, as accelerate's own loop on the
    unmodified model (ZeRO 2, torch's AdamW, clipping 0.05)."""
    for rank_report in report:
        entry = rank_report["accelerate-loop"]
        print({k: entry[k] for k in ("loss", "weights", "replicas_apart", "figures")})
        assert entry["losses"] == trainer_worker.STEPS
        assert entry["loss"] < FP32 * entry["first_loss"] and max(entry["weights"].values()) < FP32, entry
        assert entry["replicas_apart"] == 0.0
        assert (entry["figures"]["forward_cross_node_MB_per_step"] > 0) == (NODES > 1)


@pytest.mark.parametrize("case,words", [("zero3", "ZeRO stage 3"), ("dense model", "no transformers MoE block"),
                                        ("one process of the job", "cpu_process_state"),
                                        ("save on each node", "save_on_each_node=False")])
def test_what_it_cannot_train_is_refused_by_name(report, case, words):
    if case == "one process of the job" and (ON_GPU or WORLD == 1):
        pytest.skip("accelerate's own state counts every GPU rank; one rank cannot see fewer")
    message = report[0]["refused"][case]
    print(case, "->", message)
    assert words in message, message
