"""The deepspeed launcher runs a GRACE-served model as 2 emulated nodes x 2 ranks (scripts/launch.sh)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from grace_ds.routing_stats import RoutingStats
from grace_ds.models import find_moe_blocks
from grace_ds.planners import make_plan
from grace_ds.topology import Topology
from grace_ds.logical_nodes import free_port
from tests.tiny_models import tiny_model
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_two_emulated_nodes_under_the_deepspeed_launcher(tmp_path, monkeypatch):
    per_node = int(os.environ.get("GRACE_TEST_LAUNCH_GPUS_PER_NODE", "2"))
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    blocks = find_moe_blocks(model)
    recorder = RoutingStats(len(blocks), 8, 2).attach_to_routers(blocks)
    with torch.no_grad():
        model(torch.randint(0, 128, (8, 32)))
    make_plan("grace", recorder.to_profile(reduce=False), Topology.uniform(2, per_node), 1).save(tmp_path / "plan.json")
    config = {"dtype": "fp32", "replace_with_kernel_inject": False,
              "grace_moe": {"plan": str(tmp_path / "plan.json"), "communication": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), "--emulate-nodes", "2", "--num-gpus", str(per_node),
                           "--master-port", str(free_port()), "--", str(ROOT / "scripts" / "serve.py"),
                           "--model", str(tmp_path / "model"), "--config", str(tmp_path / "ds.json"), "--check",
                           "--new-tokens", "3", "--report", str(tmp_path / "report.json")],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
    # Two launchers share the pipe: their lines may interleave, so pick the flat JSON objects out directly.
    lines = [json.loads(found) for found in re.findall(r"GRACE_SERVE (\{[^{}]*\})", done.stdout)]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(line["rank"] for line in lines) == list(range(2 * per_node))
    for line in lines:
        assert line["topology"] == f"2 nodes x {per_node} GPU{'s' if per_node > 1 else ''}"
        # auto: hierarchical across 2 x 2, but these small batches (at most 128 tokens a rank) all take the
        # gather exchange.
        assert line["comm_resolved"] == ("hierarchical" if per_node > 1 else "flat") and line["comm"] == "gather"
        assert line["relative"] < 1e-5 and line["text_equal"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["generated_text_equal"] and report["prefill_tokens"] == 2 * per_node * 2 * 32
    assert len(report["pairs_per_gpu_per_layer"]) == 2 and sum(map(sum, report["pairs_per_gpu_per_layer"])) > 0
    # The main job's report renders from such reports: table rows, three plots, an offline W&B run.
    from grace_ds.examples.report import log_wandb, plots, table
    from grace_ds.plan import PlacementPlan

    rows = table(report, report)
    assert any(name.startswith("cross-node bytes") for name, *_ in rows)
    paths = plots(report, report, recorder.to_profile(reduce=False), PlacementPlan.load(tmp_path / "plan.json"),
                  tmp_path / "out")
    assert sorted(paths) == ["coactivation", "gpu_load", "traffic"] and all(p.stat().st_size > 0 for p in paths.values())
    if os.environ.get("GRACE_TEST_DEVICE") == "cuda" and importlib.util.find_spec("wandb") is None:
        return  # the GPU machine has no wandb; CI (CPU, pinned set) always runs the W&B check below
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert "offline" in log_wandb(report, report, paths, {"wandb": {"enabled": True, "project": "t"}}, tmp_path / "out")


def _launch_threads(tmp_path, args: list[str], env_extra: dict[str, str]) -> list[str]:
    """Runs launch.sh with a stand-in launcher that records the OMP_NUM_THREADS its ranks would get."""
    fake = tmp_path / "fake_deepspeed"
    record = tmp_path / "threads.txt"
    fake.write_text(f'#!/usr/bin/env bash\nvalue="$OMP_NUM_THREADS"\n'
                    f'if [ -n "${{DS_ENV_FILE:-}}" ]; then value="file:$(tr "\\n" ";" < "$DS_ENV_FILE")"; fi\n'
                    f'echo "$value" >> {record}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DS_ENV_FILE")}
    env.update(GRACE_DEEPSPEED=str(fake), HOME=str(tmp_path), **env_extra)
    subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), *args, "--", "program.py"], check=True, env=env,
                   cwd=tmp_path, timeout=HANG_GUARD_S)
    return record.read_text().split()


def test_launcher_gives_each_local_rank_its_share_of_the_cores_unless_set(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert _launch_threads(tmp_path, ["--emulate-nodes", "2", "--num-gpus", "2"], {}) == [str(max(1, cores // 4))] * 2
    (tmp_path / "threads.txt").unlink()
    assert _launch_threads(tmp_path, ["--num-gpus", "1"], {}) == [str(cores)]
    (tmp_path / "threads.txt").unlink()
    assert _launch_threads(tmp_path, ["--emulate-nodes", "2", "--num-gpus", "1"], {"OMP_NUM_THREADS": "3"}) == ["3", "3"]
    (tmp_path / "threads.txt").unlink()
    # Real nodes: pdsh does not carry the variable, DeepSpeed's environment file does, after the user's own lines.
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO")  # no final newline
    assert _launch_threads(tmp_path, ["--hostfile", "hosts", "--num-nodes", "2", "--num-gpus", "64"], {}) == [
        "file:NCCL_DEBUG=INFO;OMP_NUM_THREADS=1;"]


def test_transformers_trainer_script_under_the_deepspeed_launcher(tmp_path):
    """scripts/finetune_trainer.py (GraceTrainer) on the embedded model as 2 emulated nodes x 2 (x 1 on 2 GPUs): it trains on
    every rank's own batches, logs GRACE's figures, leaves checkpoint-N with the layout record and a final model
    that from_pretrained loads as the unmodified OLMoE; then resumes from checkpoint-2 to step 4."""
    per_node = int(os.environ.get("GRACE_TEST_LAUNCH_GPUS_PER_NODE", "2"))
    import transformers

    from grace_ds.checkpoint_layout import LAYOUT_FILE
    from grace_ds.examples.corpus import stdlib_bytes
    from grace_ds.profiling import load_model, profile_model

    model_dir = ROOT / "grace_ds" / "examples" / "default_model"
    model, _ = load_model(model_dir)
    profile = profile_model(model, stdlib_bytes("heldout")[:4096], sequence_length=128, show_progress=False)
    profile.save(tmp_path / "profile.safetensors")
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
              "grace_moe": {"profile": str(tmp_path / "profile.safetensors"), "communication": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(config))

    def finetune(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "launch.sh"), "--emulate-nodes", "2", "--num-gpus", str(per_node),
                               "--master-port", str(free_port()), "--", str(ROOT / "scripts" / "finetune_trainer.py"),
                               "--model", str(model_dir), "--deepspeed", str(tmp_path / "ds.json"), "--output-dir",
                               str(tmp_path / "run"), "--sequence-length", "64", "--batch-size", "2", "--save-steps", "2",
                               "--logging-steps", "1",
                               *extra], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    first = finetune("--max-steps", "2")
    assert "trained 2 steps" in first.stdout and "forward_cross_node_MB_per_step" in first.stdout
    assert (tmp_path / "run" / "checkpoint-2" / "global_step2" / LAYOUT_FILE).is_file()
    resumed = finetune("--max-steps", "4", "--resume", str(tmp_path / "run" / "checkpoint-2"))
    assert "trained 4 steps" in resumed.stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert type(loaded).__name__ == "OlmoeForCausalLM"
    trained = dict(loaded.named_parameters())
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, trained[name])]
    assert any(".experts." in name for name in moved) and any("self_attn" in name for name in moved)
    # Plain `python`, no launcher: a job of this one process (accelerate's state set up by cpu_process_state).
    alone = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune_trainer.py"), "--model", str(model_dir),
                            "--deepspeed", str(tmp_path / "ds.json"), "--output-dir", str(tmp_path / "alone"),
                            "--sequence-length", "64", "--batch-size", "2", "--max-steps", "1", "--logging-steps", "1"],
                           capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=ROOT)
    assert alone.returncode == 0 and "trained 1 steps" in alone.stdout, alone.stdout[-2000:] + alone.stderr[-3000:]
