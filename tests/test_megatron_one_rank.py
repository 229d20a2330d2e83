"""megatron-core's own FP32Optimizer over the GRACE layer, in a job of one rank: its dist-checkpoint of model and
Adam states, saved under a GRACE plan and loaded under a plan with another slot count. FP32Optimizer's
constructor needs CUDA, so this runs on a GPU machine (scripts/gpu_exactness.sh); on CPU the four-rank test in
tests/test_megatron.py takes torch's Adam through megatron's mapping functions instead."""
import json

import pytest
import torch.multiprocessing as mp

from grace_ds.logical_nodes import free_port
from tests import megatron_worker


@pytest.mark.skipif(megatron_worker.DEVICE.type != "cuda", reason="megatron's FP32Optimizer needs CUDA")
def test_megatron_fp32_optimizer_states_follow_the_experts_into_another_plan(tmp_path):
    mp.spawn(megatron_worker.one_rank_main, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    entry = json.loads((tmp_path / "one-rank.json").read_text())
    print(entry)
    assert entry["optimizer"] == "FP32Optimizer" and entry["slots_per_gpu"][0] != entry["slots_per_gpu"][1]
    assert entry["weights"] == 0.0 and max(entry["states"].values()) == 0.0 < entry["state_size"], entry
    assert entry["continued"] < 1e-5 < 10 * 1e-5 < entry["step_size"], entry  # one step: 6.7e-4 on the H200
