"""The deepspeed launcher runs a GRACE-served model as 2 emulated nodes x 2 ranks (scripts/launch.sh)."""
import json
import os
import subprocess
from pathlib import Path

import torch

from grace_ds.hooks import RoutingRecorder
from grace_ds.models import find_moe_blocks
from grace_ds.planners import make_plan
from grace_ds.topology import Topology
from tests.test_runtime_exactness import free_port
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_two_emulated_nodes_under_the_deepspeed_launcher(tmp_path):
    per_node = int(os.environ.get("GRACE_TEST_LAUNCH_GPUS_PER_NODE", "2"))
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    blocks = find_moe_blocks(model)
    recorder = RoutingRecorder(len(blocks), 8, 2).attach_to_routers(blocks)
    with torch.no_grad():
        model(torch.randint(0, 128, (8, 32)))
    make_plan("grace", recorder.to_profile(reduce=False), Topology.uniform(2, per_node), 1).save(tmp_path / "plan.json")
    config = {"dtype": "fp32", "replace_with_kernel_inject": False,
              "grace_moe": {"plan": str(tmp_path / "plan.json"), "communication": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), "--emulate-nodes", "2", "--num-gpus", str(per_node),
                           "--master-port", str(free_port()), "--", str(ROOT / "scripts" / "serve.py"),
                           "--model", str(tmp_path / "model"), "--config", str(tmp_path / "ds.json"), "--check"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [json.loads(line.split("GRACE_SERVE ", 1)[1]) for line in done.stdout.splitlines() if "GRACE_SERVE " in line]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(line["rank"] for line in lines) == list(range(2 * per_node))
    for line in lines:
        assert line["topology"] == f"2 nodes x {per_node} GPUs"
        assert line["comm"] == ("hierarchical" if per_node > 1 else "flat")
        assert line["relative"] < 1e-5
