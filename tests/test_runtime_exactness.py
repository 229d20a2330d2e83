"""GRACE layers give the unmodified model's outputs on 1, 2 and 4 gloo ranks (4 also as 2 logical nodes
x 2), for every policy, router and communication mode: transformers MoE blocks of six families, and
GraceMoE against DeepSpeed's own MoE layer."""
import json
import os

import pytest
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import distributed_worker
from tests.tiny_models import FAMILIES

POLICIES = ["contiguous", "eplb", "uniform-affinity", "grace"]
ROUTERS = ["tar", "wrr", "static", "modulo"]
TOLERANCE = 1e-5  # relative, fp32; only summation order differs




def run(world: int, nodes: int, checks: dict, tmp_path, deepspeed: dict | None = None,
        init_inference: bool = False, checkpoint: bool = False) -> list[dict]:
    spec = json.dumps({"families": list(checks), "checks": checks, "init_inference": init_inference,
                       "checkpoint": checkpoint,
                       **({"deepspeed": deepspeed} if deepspeed else {})})
    mp.spawn(distributed_worker.main, args=(world, nodes, free_port(), str(tmp_path), spec), nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def every_combination(modes):
    return {"policies": POLICIES, "routers": ROUTERS, "modes": modes}


def layouts() -> list:
    """(world, nodes): 1, 2 and 4 ranks, 4 also as 2 nodes x 2. GRACE_TEST_LAYOUTS="1x1,1x2,2x1" (nodes x
    ranks per node) picks others, e.g. what the GPUs of the test machine allow."""
    text = os.environ.get("GRACE_TEST_LAYOUTS", "1x1,1x2,1x4,2x2")
    picked = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    return [pytest.param(n * g, n, id=f"{n}x{g}") for n, g in picked]


@pytest.mark.parametrize("world, nodes", layouts())
def test_outputs_match_the_unmodified_model(world, nodes, tmp_path):
    modes = ["flat"] + ["hierarchical"] * (nodes > 1) + ["gather"] * (world > 1) + ["gather-ring"] * (nodes > 1)
    # OLMoE gets every policy x router x mode; the other families every policy with tar.
    checks = {family: ({"policies": POLICIES, "routers": ["tar"], "modes": modes} if family != "olmoe"
                       else every_combination(modes)) for family in FAMILIES}
    reports = run(world, nodes, checks, tmp_path, deepspeed={"policies": POLICIES, "ks": [1, 2]},
                  init_inference=True, checkpoint=True)
    for rank, report in enumerate(reports):
        trained = report.pop("training_profile")
        assert trained["tokens"] == [trained["expected_tokens"]], "profile summed over every rank's steps"
        assert trained["pairs"] == trained["expected_tokens"] * 2 and trained["top_k"] == 2
        restored = report.pop("checkpoint")
        assert restored["differed_before"] > 1e-3 and restored["restored"] == 0.0, restored
        assert restored["profiled_tokens"] == restored["expected_tokens"]
        served = report.pop("init_inference")
        assert served["error"] < TOLERANCE and served["error_planned_at_startup"] < TOLERANCE
        # init_inference on the checkpoint directory: the same weights, read rank by rank.
        loaded = served["from_directory"]
        assert loaded["error"] < TOLERANCE and loaded["weights_apart"] == 0.0 and loaded["same_names"], loaded
        assert (loaded["skipped_expert_bytes"] > 0) == (world > 1), loaded
        # generate on every rank at once, ranks stopping at different steps (the last of several with no prompt)
        assert loaded["generated"]["equal"], loaded["generated"]
        assert loaded["generated"]["shape"][0] == (0 if world > 1 and rank == world - 1 else 2)
        assert all(call["error"] < TOLERANCE for call in served["by_size"]), served["by_size"]
        assert served["base_mode"] == ("hierarchical" if nodes > 1 and world > nodes else "flat")
        exchanges = [call["modes"] for call in served["by_size"]]
        if served["base_mode"] == "hierarchical":  # auto at 2 x 2: the exchange follows the largest rank's batch
            assert exchanges[:3] == [{"flat": 0, "hierarchical": 2, "gather": 0}, {"flat": 2, "hierarchical": 0, "gather": 0},
                                 {"flat": 0, "hierarchical": 2, "gather": 0}]
        if world > 1:  # the smallest batches, even and uneven, take the gather exchange in both layers
            assert exchanges[3:] == [{"flat": 0, "hierarchical": 0, "gather": 2}] * 2, exchanges
        on_gpu = os.environ.get("GRACE_TEST_DEVICE") == "cuda"
        if world > 1 and not on_gpu:  # the gather calls (two layers, two calls) took the graphs' padded body
            assert served["padded_gather_calls"] == 4
        if world > 1 and on_gpu:  # bf16: two forwards of two layers replayed CUDA graphs, equal to eager gather
            assert served["graph_check"]["replays"] == 4 and served["graph_check"]["error"] < 1e-3, served["graph_check"]
        assert served["topology"] == [world // nodes] * nodes, "topology found from the ranks' host names"
        per_node = world // nodes  # in-node stages over the node's own group (grace_moe.node_groups) where there are any
        node = list(range(rank // per_node * per_node, (rank // per_node + 1) * per_node))
        assert served["node_group"] == (node if nodes > 1 and per_node > 1 else None)
        assert "plan is for 1 node x 1 GPU" in served["refused"] or world == 1
        assert (tmp_path / "served.safetensors").exists()
        ds_errors = report.pop("deepspeed")["errors"]
        worst = max(ds_errors.items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE, f"rank {rank} GraceMoE vs DeepSpeed MoE {worst[0]}: relative error {worst[1]:.2e}"
        assert len(ds_errors) == 2 * len(POLICIES) * len(modes)
        for family, result in report.items():
            worst = max(result["errors"].items(), key=lambda kv: kv[1])
            assert worst[1] < TOLERANCE, f"rank {rank} {family} {worst[0]}: relative error {worst[1]:.2e}"
            # One split-size exchange (the host's one wait) per MoE call, hierarchical too: hop 2's sizes
            # travel with hop 1's. The gather exchange has none.
            exchanges = result["split_size_exchanges_per_layer"]
            assert exchanges == {m: (0 if m.startswith("gather") else 1) for m in modes}, exchanges
            assert result["expert_params_held"] == result["expert_params_expected"]
            assert not result["fused_left"], result["fused_left"]
            if world > 1:
                assert result["expert_params_held"] < result["full_expert_params"]


def largest_multi_node_layout() -> tuple[int, int]:
    """(world, nodes) of the largest layout with more than one node among those picked (2 x 2 by default)."""
    multi = [p.values for p in layouts() if p.values[1] > 1]
    if not multi:
        pytest.skip("no layout with more than one node picked (GRACE_TEST_LAYOUTS)")
    return max(multi)


def test_the_sparse_way_back_matches_the_unmodified_model_across_nodes(tmp_path, monkeypatch):
    """Every per-row sum taken by the sparse product (the threshold lowered to 0; spawned ranks read it from
    the environment): flat, hierarchical and gather exchanges across nodes still give the model's outputs."""
    monkeypatch.setenv("GRACE_SPARSE_SUM_MIN_PAIRS", "0")
    checks = {"olmoe": {"policies": ["contiguous", "grace"], "routers": ["tar"],
                        "modes": ["flat", "hierarchical", "gather"]}}
    world, nodes = largest_multi_node_layout()
    for rank, report in enumerate(run(world, nodes, checks, tmp_path)):
        worst = max(report["olmoe"]["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE, f"rank {rank} olmoe {worst[0]}: relative error {worst[1]:.2e}"
        assert len(report["olmoe"]["errors"]) >= 6


def test_exchanges_inside_a_node_over_its_own_group_match_the_unmodified_model(tmp_path):
    """Hierarchical hop 2 and the gather's in-node stages over a process group of each node's ranks."""
    multi = [p.values for p in layouts() if p.values[1] > 1 and p.values[0] > p.values[1]]
    if not multi:
        pytest.skip("no layout with more than one node of more than one GPU picked (GRACE_TEST_LAYOUTS)")
    world, nodes = max(multi)
    per_node = world // nodes
    modes = ["hierarchical-node-groups", "gather-node-groups"]
    checks = {"olmoe": {"policies": ["contiguous", "grace"], "routers": ["tar", "modulo"], "modes": modes}}
    for rank, report in enumerate(run(world, nodes, checks, tmp_path)):
        result = report["olmoe"]
        worst = max(result["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE, f"rank {rank} olmoe {worst[0]}: relative error {worst[1]:.2e}"
        assert len(result["errors"]) == 8
        node_ranks = list(range(rank // per_node * per_node, (rank // per_node + 1) * per_node))
        assert result["node_groups"] == {mode: node_ranks for mode in modes}


def test_sparse_way_back_threshold_rejects_what_is_not_a_count(monkeypatch):
    from grace_ds.experts import _min_pairs_from_env

    monkeypatch.setenv("GRACE_SPARSE_SUM_MIN_PAIRS", "lots")
    with pytest.raises(ValueError, match="GRACE_SPARSE_SUM_MIN_PAIRS must be a whole number"):
        _min_pairs_from_env(8192)
    monkeypatch.setenv("GRACE_SPARSE_SUM_MIN_PAIRS", "100")
    assert _min_pairs_from_env(8192) == 100
    monkeypatch.delenv("GRACE_SPARSE_SUM_MIN_PAIRS")
    assert _min_pairs_from_env(8192) == 8192
