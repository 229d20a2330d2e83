"""GRACE's megatron-core layer equals megatron's own MoELayer (contiguous experts), for the alltoall and
allgather dispatchers, every plan and both communication modes, on 4 gloo ranks as 2 nodes x 2; the
profiling hook on megatron's router; checkpoint entries filed as megatron's own layer files them, a
dist-checkpointing save under one plan loaded under another, and checkpoints moved both ways between
megatron's layer and GRACE's; online re-planning while inputs drift; the CPU patch."""
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests import megatron_worker
from grace_ds.logical_nodes import free_port


def layout() -> tuple[int, int]:
    """2 nodes x 2 ranks; on a GPU machine the largest 2-node layout its GPUs allow (GRACE_TEST_LAYOUTS;
    none, as on one GPU: the test is skipped, not run on GPUs that are not there)."""
    two_node = [tuple(map(int, s.split("x"))) for s in os.environ.get("GRACE_TEST_LAYOUTS", "2x2").split(",")
                if s.startswith("2x")]
    if not two_node:
        pytest.skip("no layout with two nodes picked (GRACE_TEST_LAYOUTS)")
    return two_node[-1]


def spawn_two_nodes(worker_main, out: Path) -> list[dict]:
    """worker_main(rank, world, nodes, port, out_dir) on every rank of layout(); each rank's JSON report."""
    nodes, per_node = layout()
    world = nodes * per_node
    mp.spawn(worker_main, args=(world, nodes, free_port(), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return spawn_two_nodes(megatron_worker.main, tmp_path_factory.mktemp("megatron"))


def test_grace_layer_matches_megatron_moe_layer(report):
    for rank_report in report:
        errors = rank_report["errors"]
        assert len(errors) == 2 * 3 * 2 + 1  # dispatchers x plans x modes, and the checkpoint round trip
        assert max(errors.values()) < 1e-5, errors


def test_profiling_hook_on_megatron_router_counts_every_rank(report):
    tokens = megatron_worker.SEQ * megatron_worker.BATCH * len(report)
    for rank_report in report:
        assert set(rank_report["profiled_tokens"].values()) == {tokens}
        assert set(rank_report["profiled_pairs"].values()) == {tokens * megatron_worker.TOP_K}


def test_checkpoint_entries_are_megatrons_with_each_logical_expert_saved_once(report):
    """The saved (main-replica) entries of every plan are exactly those of megatron's own layer:
    same keys, offsets, gate / up halves and extra states, each once; replicas are filed as copies."""
    def saved(policy: str) -> Counter:
        return Counter((key, tuple(offset)) for r in report for key, offset, replica in r["checkpoint"][policy]
                       if not any(replica))

    megatron = saved("megatron")
    assert {key for key, _ in megatron} == {f"decoder.layers.0.mlp.experts.experts.{name}" for name in (
        "linear_fc1.weight", "linear_fc2.weight", "linear_fc1._extra_state", "linear_fc2._extra_state")}
    assert set(megatron.values()) == {1} and len(megatron) == 5 * megatron_worker.EXPERTS  # fc1 in 2 halves
    for policy in ("contiguous", "eplb", "grace"):
        assert saved(policy) == megatron, policy
        replicas = [e for r in report for e in r["checkpoint"][policy] if any(e[2])]
        assert bool(replicas) == (policy != "contiguous"), policy


def test_checkpoints_move_between_megatrons_layer_and_grace(report):
    """Saved by megatron's MoELayer, loaded by the GRACE layer under a plan with replicas, saved again and
    loaded by a fresh MoELayer: outputs equal the reference's, copies equal; also with singleton shards."""
    for rank_report in report:
        results = rank_report["interchange"]
        assert len(results) == 6, results
        assert max(results.values()) < 1e-5, results


def test_optimizer_states_follow_the_experts_into_another_plan(report):
    """Adam's states of the GRACE layer (a plan with replicas) through megatron's own optimizer mapping into one
    dist-checkpoint, loaded under the contiguous plan: every logical expert's and the router's states exactly
    the saver's, weights too, and the next step the saver's next step."""
    for rank_report in report:
        entry = rank_report["optimizer_states"]
        print(entry)
        assert entry["replicated_experts"] > 0 and entry["weights"] == 0.0
        assert max(entry["states"].values()) == 0.0 < entry["state_size"], entry["states"]
        assert entry["continued"] < 1e-5 < 100 * 1e-5 < entry["step_size"], entry


@pytest.mark.skipif(megatron_worker.DEVICE.type == "cuda", reason="the patch is for machines without CUDA")
def test_cpu_patch_is_applied_explicitly_and_undone(monkeypatch):
    import megatron.core
    from megatron.core.transformer.moe import router, token_dispatcher

    from patches import megatron_core_cpu

    before = (router.torch, token_dispatcher.torch, token_dispatcher.maybe_move_tensor_to_cpu)
    with megatron_core_cpu.apply():
        assert router.torch is not before[0] and router.torch.cuda.current_device() == "cpu"
        assert token_dispatcher.maybe_move_tensor_to_cpu is not before[2]
    assert (router.torch, token_dispatcher.torch, token_dispatcher.maybe_move_tensor_to_cpu) == before
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match="targets megatron-core 0.19"):
        megatron_core_cpu.apply()


def test_online_replanning_keeps_the_megatron_layer_exact(report):
    for rank_report in report:
        online = rank_report["online"]
        assert max(online["errors"]) < 1e-5, online
        assert online["moves"] > 0


def test_training_through_the_megatron_layer_matches_moe_layer(report):
    """Backward (load-balancing loss on) equals megatron's MoELayer: input, router and every logical
    expert's gradient, plans with replicas too; after an SGD step and the replica sync every copy is equal
    and every expert holds megatron's weights."""
    for rank_report in report:
        training = rank_report["training"]
        assert set(training) == {f"{p}/{m}" for p in ("contiguous", "grace") for m in ("flat", "hierarchical")}
        assert training["grace/flat"]["replicated_experts"] > 0, "the grace plan must replicate experts"
        for case, entry in training.items():
            for name in ("input", "router", "experts", "after_step"):
                assert entry[name] <= 1e-5, f"{case}: {name} differs by {entry[name]:.2e}"
            assert entry["replicas_apart"] == 0.0, case
