"""Training through GRACE layers, on 4 gloo ranks as 2 nodes x 2: gradients and parameters equal to
DeepSpeed's own MoE layer and to the unmodified transformers model (Mixtral, Qwen3-MoE, DeepSeek-V3), plans
with replicated experts, flat and hierarchical exchanges, ZeRO 0-2, fp32 and bf16, gradient clipping on;
the copies of a replicated expert stay equal through steps and checkpoints; expert x data parallel
(ep_size 2 on 4 ranks); DeepSpeed MoE's constructor arguments honoured or refused by name."""
import json

import pytest
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import training_worker

WORLD, NODES = 4, 2
FP32 = 1e-5  # largest absolute difference, fp32: only summation order differs
CHECKS = {"gradients": True, "training": True, "expert_data_parallel": True, "bf16": True, "accumulation": True,
          "monitor": True, "arguments": True,
          "hf": ["mixtral", "qwen3_moe", "deepseek_v3"]}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    mp.spawn(training_worker.main, args=(WORLD, NODES, free_port(), str(out), json.dumps(CHECKS)), nprocs=WORLD,
             join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_gradients_equal_deepspeed_moe_router_included(reports):
    """Input, upstream layer, gate (router) and every logical expert: top-1/2/3, with and without l_aux,
    contiguous and grace plans (with replicas), flat and hierarchical; replicas' own gradients are zero."""
    for rank, report in enumerate(reports):
        gradients = report["gradients"]
        assert len(gradients["differences"]) == 3 * 2 * 2 * 2
        for case, entry in gradients["differences"].items():
            assert entry["gate_norm"] > 0, f"rank {rank} {case}: DeepSpeed's gate got no gradient"
            for name in ("input", "upstream", "gate", "experts"):
                assert entry[name] is not None, f"rank {rank} {case}: no {name} gradient"
                assert entry[name] <= FP32, f"rank {rank} {case}: {name} gradient differs by {entry[name]:.2e}"
            assert entry["replica_gradient"] == 0.0, case
            if "/grace/" in case:
                assert gradients["replicated_experts"][case] > 0, f"{case}: the plan replicates no expert"


def test_steps_with_clipping_equal_deepspeed_moe_and_copies_stay_equal(reports):
    """10 SGD steps (momentum, weight decay, clipping on) under ZeRO 0, 1, 2 against DeepSpeed's MoE under
    ZeRO 1; every copy of an expert equal after every step; a checkpoint restores the weights and copies."""
    for rank, report in enumerate(reports):
        training = report["training"]
        assert set(training) == {f"{m}/zero{s}" for m in ("flat", "hierarchical") for s in (0, 1, 2)}
        for case, entry in training.items():
            norms = entry["norm_relative_differences"]
            assert len(norms) == 10 and max(norms) <= 1e-6, f"{case}: the clipped norm differs from DeepSpeed's: {norms}"
            for step, differences in entry["differences"].items():
                for name, value in differences.items():
                    assert value <= FP32, f"rank {rank} {case}: {name} after {step} steps differs by {value:.2e}"
            assert entry["replicas_apart"] == 0.0, f"{case}: copies of an expert diverged"
            assert all(v == 0.0 for v in entry["restored"].values()), entry["restored"]
            assert entry["restored_replicas_apart"] == 0.0


def test_gradient_accumulation_steps_as_deepspeed_moe(reports):
    """gradient_accumulation_steps 2, 6 micro steps: 3 optimizer steps under ZeRO 0, 1, 2, the weights equal
    DeepSpeed's MoE accumulating the same way, every copy of an expert equal."""
    for rank, report in enumerate(reports):
        entry = report["accumulation"]
        assert min(entry["moved"].values()) > 100 * FP32, entry["moved"]  # the steps moved every kind of weight
        for stage in (0, 1, 2):
            case = entry[f"zero{stage}"]
            assert case["steps"] == 3 and case["replicas_apart"] == 0.0, (rank, stage, case)
            for step, differences in case["differences"].items():
                assert max(differences.values()) <= FP32, (rank, stage, step, differences)


def test_expert_parallel_two_of_four_ranks_matches_deepspeed_ep2(reports):
    for rank, report in enumerate(reports):
        ep = report["expert_data_parallel"]
        assert ep["runtime_rank"] == rank % 2 and ep["ep_group"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert max(ep["gradients"].values()) <= FP32, ep["gradients"]
        for step, differences in ep["parameters"].items():
            assert max(differences.values()) <= FP32, (step, differences)
        assert ep["replicas_apart"] == 0.0
        # A runtime given the job's rank instead of its expert-parallel rank stops every rank, no hang.
        assert "dist.get_rank() % 2" in ep["refused"], ep["refused"]


def test_bf16_steps_follow_deepspeed_moe_and_copies_stay_equal(reports):
    for report in reports:
        for case, entry in report["bf16"].items():
            bound = 2 ** -6 * entry["scale"]  # two bf16 steps of rounding at the weights' scale
            for step, differences in entry["differences"].items():
                assert max(differences.values()) <= bound, (case, step, differences)
            assert entry["replicas_apart"] == 0.0, case


def test_deepspeed_moe_arguments_are_honoured_or_refused_by_name(reports):
    for report in reports:
        arguments = report["arguments"]
        refused = arguments.pop("refused")
        for name, entry in arguments.items():
            assert entry["loss"] <= FP32 and entry["gradients"] <= FP32, (name, entry)
        assert arguments["drops_k1"]["dropped_routes"] > 0 and arguments["drops_k2"]["dropped_routes"] > 0
        for argument, message in refused.items():
            assert argument in message, (argument, message)


def test_transformers_models_train_as_the_unmodified_model(reports):
    """grace_ds.deepspeed.initialize on converted Mixtral, Qwen3-MoE and DeepSeek-V3 (GRACE plan with
    replicas, flat and hierarchical, ZeRO 0 and 2, clipping on; Mixtral also with transformers' gradient
    checkpointing, and from its checkpoint directory read rank by rank) against the unmodified model trained on one process without it: embedding, attention,
    router, expert and other gradients, and the weights after 1 and 10 steps."""
    for rank, report in enumerate(reports):
        hf = report["hf"]
        assert {case.split("/")[0] for case in hf} == set(CHECKS["hf"])
        recomputed = hf[f"{CHECKS['hf'][0]}/hierarchical/zero0/gradient-checkpointing"]
        plain = hf[f"{CHECKS['hf'][0]}/hierarchical/zero0"]
        assert recomputed["moe_calls_per_step"] == 2 * plain["moe_calls_per_step"] > 0  # the backward reran them
        loaded = hf[f"{CHECKS['hf'][0]}/hierarchical/zero0/from-directory"]  # initialize(checkpoint directory)
        assert loaded["skipped_expert_bytes"] > 0  # other ranks' experts were never read
        for case, entry in hf.items():
            assert entry["replicated_experts"] > 0, case
            checked = [key for key in entry if key == "gradients" or key.startswith("after_")]
            assert ("gradients" in checked) == ("/zero0" in case) and len(checked) >= 2
            assert entry["recomputed"] == case.endswith("/gradient-checkpointing"), case
            for key in checked:
                assert set(entry[key]) >= {"embedding", "attention", "router", "experts"}, entry[key]
                for kind, value in entry[key].items():
                    assert value <= FP32, f"rank {rank} {case} {key}: {kind} differs by {value:.2e}"
            assert entry["replicas_apart"] == 0.0, case


def test_training_figures_reach_deepspeeds_monitor(reports):
    """csv_monitor on, grace_moe.monitor_interval_steps 2, 4 steps: GRACE's figures written at steps 2 and 4
    on DeepSpeed's samples axis; every (token, expert) pair computed once; the forwards' bytes as handed to
    all_to_all_single, less the split-size messages the count leaves out (this tiny layer: under 10%)."""
    for rank, report in enumerate(reports):
        entry = report["monitor"]
        last, written = entry["last"], entry["written"]
        names = {"forward_cross_node_MB_per_step", "forward_same_node_MB_per_step", "load_max_over_mean"}
        assert set(written) == {"Train_Samples_grace_moe_" + name for name in names}, written
        for name in names:
            rows = written["Train_Samples_grace_moe_" + name]
            assert [int(step) for step, _ in rows] == [16, 32], rows  # 2 steps x 4 ranks x 2 sequences
            assert abs(float(rows[-1][1]) - last[name]) <= 1e-9 * max(1.0, last[name]), (name, rows, last)
        assert sum(last["pairs_per_rank_per_step"]) == 4 * entry["tokens"] * 2  # ranks x tokens x top-2
        pairs = last["pairs_per_rank_per_step"]
        assert last["load_max_over_mean"] == max(pairs) / (sum(pairs) / len(pairs))
        for counted, wire in zip((last["forward_cross_node_MB_per_step"], last["forward_same_node_MB_per_step"]),
                                 entry["wire_MB_per_step"]):
            assert 0.9 * wire <= counted <= wire, (rank, counted, wire)
