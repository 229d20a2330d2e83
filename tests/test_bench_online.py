"""The online re-planning benchmark's code path, run small on gloo (4 ranks as 2 nodes x 2): every
policy serves the drifting stream with outputs equal to a dense reference, and the re-planning policies
move real weights."""
import json
import subprocess
import sys
from pathlib import Path
from tests.conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_bench_online_runs_every_policy_on_cpu(shared_data, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_online.py"), "--device", "cpu", "--world", "4",
                    "--nodes", "2", "--small", "--step-tokens", "256", "--steps-before", "4", "--steps-after", "8",
                    "--window-steps", "4", "--interval", "2", "--repeats", "1", "--check-every", "2",
                    "--traces", str(shared_data / "routing"), "--out", str(tmp_path)], check=True, cwd=ROOT,
                   timeout=HANG_GUARD_S)
    report = json.loads((tmp_path / "bench-online-2x2.json").read_text())
    assert report["run"]["commit"] and report["run"]["command"].startswith("bench_online.py") and report["run"]["cpus"]
    policies = report["policies"]
    assert set(policies) == {"grace-offline", "grace-online", "eplb-periodic"}
    for name, result in policies.items():
        assert len(result["step_ms"]) == 12 and min(result["step_ms"]) > 0
        assert result["max_relative_error"] < 1e-5, name  # fp32: only summation order differs
    offline, online, eplb = (policies[p]["summary"] for p in ("grace-offline", "grace-online", "eplb-periodic"))
    assert offline["copies_moved"] == 0 and offline["replans"] == 0
    assert online["replans"] >= 1 and 0 < online["copies_moved"] < eplb["copies_moved"]
    assert eplb["bytes_moved"] == eplb["copies_moved"] * 3 * 64 * 32 * 4  # gate, up, down of a 64 x 32 expert, fp32
    assert any(policies["grace-online"]["in_flight"]), "some step ran while weights were in flight"
