"""The cross-plan checkpoint checks of tests/test_checkpoint_layout.py in a job of one rank (plans for one
GPU: another slot count, empty slots, relabelled experts): on a GPU machine with a single GPU this is
what runs them on CUDA (scripts/gpu_exactness.sh); here, on gloo. With one rank every sum keeps its
order, so each continuation is the saver's exactly."""
import json

import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import checkpoint_layout_worker

FP32 = 1e-5


def test_one_rank_remaps_weights_and_optimizer_states_across_plans(tmp_path):
    mp.spawn(checkpoint_layout_worker.one_rank_main, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    report = json.loads((tmp_path / "one-rank.json").read_text())
    for case in ("zero0", "zero1", "zero2", "bf16-zero0"):
        entry = report[case]
        assert max(entry["with_states"]["parameters"].values()) == 0.0, (case, entry["with_states"])
        assert max(entry["with_states"]["continued"].values()) == 0.0, (case, entry["with_states"])
        assert entry["other_plan"]["vs_saver"] > 100 * FP32, (case, entry["other_plan"])  # the states matter
    for case in ("zero0", "zero1", "zero2"):
        assert max(report[case]["same_plan"]["continued"].values()) == 0.0, (case, report[case]["same_plan"])
        assert max(report[case]["other_plan"]["stepped"].values()) == 0.0, (case, report[case]["other_plan"])
    entry = report["transformers"]
    assert entry["experts"] == entry["dense"] == entry["loss"] == entry["continued"] == 0.0, entry
    assert entry["step_size"] > 100 * FP32, entry
