"""The training benchmark's code path, short, on 4 gloo ranks as 2 nodes x 2: every figure filled in, the GRACE
run trains as DeepSpeed's MoE does and moves fewer bytes across nodes."""
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_bench_training_measures_grace_against_deepspeed_moe(tmp_path):
    out = tmp_path / "training"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_training.py"), "--out", str(out), "--steps", "4",
                    "--warmup", "1", "--variants", "deepspeed-moe,grace", "--sequence-length", "32"],
                   check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    report = json.loads((out / "bench_training.json").read_text())
    assert report["setting"]["ranks"] == 4 and report["setting"]["commit"]
    ours, theirs = (next(r for r in report["results"] if r["variant"] == v) for v in ("grace", "deepspeed-moe"))
    assert len(ours["losses"]) == len(theirs["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])) < 1e-5
    assert ours["replicas_apart"] == 0.0 and ours["mode_calls"]["hierarchical"] > 0
    # DeepSpeed pads every expert to the largest count; GRACE moves each (token, node) once.
    assert 0 < ours["cross_node_bytes_per_step"] < theirs["cross_node_bytes_per_step"]
    assert theirs["padded_rows_per_gpu_per_step"] >= max(theirs["pairs_per_gpu_per_step"])
    for r in (ours, theirs):
        assert r["median_step_ms"] > 0 and r["all_reduce_bytes_per_step"] > 0
        assert len(r["pairs_per_gpu_per_step"]) == 4 and r["load_max_over_mean"] >= 1.0
    assert (out / "loss_curves.png").stat().st_size > 10_000


def test_replanned_training_resumes_with_remapped_optimizer_states(tmp_path):
    """The re-planning run, short: profiled under the contiguous plan, re-planned from that profile, resumed
    under the GRACE plan. With the optimizer states remapped it trains as the uninterrupted run; DeepSpeed's
    same-plan round trip is exact; with fresh AdamW moments the loss parts at once."""
    out = tmp_path / "replan"
    subprocess.run([sys.executable, str(ROOT / "scripts/replan_training.py"), "--out", str(out), "--steps", "6",
                    "--replan-at", "3", "--sequence-length", "32"], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    report = json.loads((out / "replan_training.json").read_text())
    runs = {r["run"]: r for r in report["results"]}
    assert sorted(runs) == sorted(("uninterrupted", "resumed/same-plan", "replanned", "replanned/fresh", "resumed/noise"))
    assert all(len(r["losses"]) == 3 for r in runs.values()) and len(runs["uninterrupted"]["before"]["losses"]) == 3
    assert runs["resumed/same-plan"]["max_loss_difference"] == 0.0
    assert runs["replanned"]["max_loss_difference"] <= 1e-5 < 1e-3 < runs["replanned/fresh"]["max_loss_difference"]
    # The plan made from the run's own routing moves fewer bytes across nodes than the contiguous one.
    assert 0 < runs["replanned"]["cross_node_bytes_per_step"] < runs["uninterrupted"]["cross_node_bytes_per_step"]
    assert report["planning_s"] > 0 and (out / "replan_loss.png").stat().st_size > 10_000
