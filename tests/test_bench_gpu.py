"""The GPU benchmark's code path, run small on gloo: every variant times, traffic and model are filled in."""
import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from grace_ds.bench import gpu_cases, gpu_model
from grace_ds.bench import layers as bench_layers
from grace_ds.planners import make_plan
from grace_ds.simulate import simulate_trace
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import LinkModel, Topology
from tests.conftest import HANG_GUARD_S, tiny_trace

ROOT = Path(__file__).resolve().parents[1]


def rendered_page(tmp_path: Path, report: Path, *options: str) -> str:
    """benchmark_report.py's page for `report` (and its options), as text."""
    subprocess.run([sys.executable, str(ROOT / "scripts/benchmark_report.py"), str(report), *options,
                    "--out", str(tmp_path / "benchmarks.md")], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    return (tmp_path / "benchmarks.md").read_text()


EXTRA_LAYER_OVERHEAD_US = 1000.0  # added to every case's measured GRACE-layer fixed cost
PERTURBED_BYTES = ("megatron-alltoall", "prefill-32768")  # this result's measured cross-node bytes are doubled


def remodel_perturbed(measured: Path, shared_data: Path, out: Path) -> dict:
    """bench_gpu.py --remodel of `measured` with its GRACE layer's fixed cost raised and one result's
    cross-node bytes doubled."""
    report = json.loads(measured.read_text())
    for fixed in report["fixed_costs"].values():
        fixed["layer_overhead_us"] += EXTRA_LAYER_OVERHEAD_US
    for r in report["results"]:
        if (r["variant"], r["batch"]) == PERTURBED_BYTES:
            r["cross_node_bytes"] *= 2
    perturbed = out.parent / "perturbed_measured.json"
    perturbed.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--remodel", str(perturbed),
                    "--traces", str(shared_data / "routing"), "--out", str(out)], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    return json.loads((out / "bench_gpu.json").read_text())


def assert_remodel_follows_the_perturbation(run: list[dict], remodeled: list[dict], links: dict, nodes: int) -> None:
    """The flat GRACE layer's modeled time grows by the added fixed cost (its floor, which has none, stays);
    the result whose bytes doubled grows by the extra bytes through one node's link, at the measured rate
    in the model and the peak rate in the floor; every other modeled time and floor is the run's."""
    assert len(run) == len(remodeled)
    per_node_link_Bpms = links["inter_node_GBps"] * 1e6
    peak_Bpms = links.get("inter_node_peak_GBps", links["inter_node_GBps"]) * 1e6
    for before, after in zip(run, remodeled):
        assert (before["variant"], before["batch"]) == (after["variant"], after["batch"])
        model_delta = floor_delta = 0.0
        if before["policy"] is not None and before["mode"] == "flat":
            model_delta = EXTRA_LAYER_OVERHEAD_US / 1e3
        if (before["variant"], before["batch"]) == PERTURBED_BYTES:
            extra_per_node = before["cross_node_bytes"] / nodes
            model_delta, floor_delta = extra_per_node / per_node_link_Bpms, extra_per_node / peak_Bpms
            assert model_delta > 1e-6
        assert after["modeled_ms"] == pytest.approx(before["modeled_ms"] + model_delta, rel=1e-9, abs=1e-9), after
        assert after["floor_ms"] == pytest.approx(before["floor_ms"] + floor_delta, rel=1e-9, abs=1e-9), after


def test_bench_gpu_runs_every_variant_on_cpu(shared_data, tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--device", "cpu", "--tiny", "--gpus", "2",
                    "--nodes", "2", "--shapes", "olmoe", "--iters", "2", "--warmup", "1",
                    "--traces", str(shared_data / "routing"), "--out", str(out)], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["setting"]["commit"] and report["setting"]["command"].startswith("bench_gpu.py --device cpu")
    assert report["setting"]["device"] == "cpu" and report["setting"]["cpus"] > 0
    results = report["results"]
    variants = {r["variant"] for r in results}
    assert variants == {"deepspeed-native", "megatron-alltoall", "deepspeed-autoep"} | {f"grace-layer/{p}/{m}" for p in
                                                ("contiguous", "eplb", "uniform-affinity", "grace")
                                                for m in ("flat", "gather")}
    assert {r["batch"] for r in results} == {"prefill-32768", "decode-256", "decode-512"}
    assert {r["batch"] for r in results if r["mode"] == "gather"} == {"decode-256", "decode-512"}
    assert report["links"]["gather_overhead_us"] > 0
    # Fixed costs are timed per case in its rounds (every expert one pair from every GPU), kept out of the results.
    fixed = report["fixed_costs"]["olmoe/olmoe_arxiv/L1"]
    assert {"layer_overhead_us", "gather_overhead_us", "gather_ring_overhead_us", "deepspeed_overhead_us",
            "autoep_overhead_us"} <= set(fixed)
    # The host's launches after its last wait are measured beside them; on a CPU the host does the work.
    tails = {k: v for k, v in fixed.items() if k.endswith("_host_tail_us")}
    assert {"layer_host_tail_us", "gather_host_tail_us", "deepspeed_host_tail_us", "megatron_host_tail_us",
            "autoep_host_tail_us"} <= set(tails) and set(tails.values()) == {0.0}
    # AutoEP took the replayed routing (checked in the run) and moves one row per (token, expert) like megatron.
    autoep = next(r for r in results if r["variant"] == "deepspeed-autoep" and r["batch"] == "prefill-32768")
    megatron_rows = next(r for r in results if r["variant"] == "megatron-alltoall" and r["batch"] == "prefill-32768")
    assert autoep["cross_node_bytes"] == megatron_rows["cross_node_bytes"] > 0
    assert "grace-layer/contiguous/gather-ring" not in {r["variant"] for r in results}
    for r in results:
        assert r["median_ms"] > 0 and r["floor_ms"] > 0 and r["modeled_ms"] > 0 and r["iters"] == 2
        assert r["cross_node_bytes"] > 0 and len(r["gpu_busy_ms"]) == 2
    for batch in ("prefill-32768", "decode-256"):
        native = next(r for r in results if r["batch"] == batch and r["policy"] is None)
        grace = next(r for r in results if r["batch"] == batch and r["policy"] == "grace" and r["mode"] == "flat")
        # DeepSpeed pads every expert to the largest count: it never moves fewer bytes than a dropless exchange.
        assert native["capacity"] > 0 and native["cross_node_bytes"] >= grace["cross_node_bytes"]
    assert {"inter_node_GBps", "gemm_tflops", "layer_overhead_us", "megatron_overhead_us"} <= set(report["links"])
    megatron = next(r for r in results if r["variant"] == "megatron-alltoall" and r["batch"] == "prefill-32768")
    grace = next(r for r in results if r["policy"] == "grace" and r["batch"] == "prefill-32768")
    # megatron sends a token once per expert, GRACE once per GPU: never more bytes for GRACE
    assert megatron["cross_node_bytes"] >= grace["cross_node_bytes"] > 0
    model = report["model"]
    assert {(r["policy"], r["batch"]) for r in model} == {
        (p, b) for p in ("contiguous", "eplb", "uniform-affinity", "grace")
        for b in ("prefill-256x128", "prefill-512x64", "decode-256", "decode-512")}
    # --remodel recomputes the model from the measured JSON's figures: perturbed, they move it as the model says.
    again = tmp_path / "again"
    remodeled = remodel_perturbed(out / "bench_gpu_measured.json", shared_data, again)
    assert_remodel_follows_the_perturbation(results, remodeled["results"], report["links"], nodes=2)
    # The docs page renders from it, with an earlier run beside it.
    page = rendered_page(tmp_path, out / "bench_gpu.json", "--earlier", str(again / "bench_gpu.json"))
    assert "## Findings" in page and "must-shows, run by run" in page and "Run-to-run spread" in page


def test_fixed_cost_adds_to_the_modeled_time_in_place_of_the_start_up_latencies():
    trace = tiny_trace()
    profile = RoutingProfile.from_topk_ids(trace, 8)
    times = []
    for links in (LinkModel(layer_overhead_us=100.0, hop_overhead_us=40.0),
                  LinkModel(layer_overhead_us=200.0, hop_overhead_us=40.0),
                  LinkModel(layer_overhead_us=100.0, hop_overhead_us=40.0, intra_node_latency_us=500.0,
                            inter_node_latency_us=900.0),
                  LinkModel()):
        plan = make_plan("contiguous", profile, Topology.uniform(2, 2, links))
        times.append(simulate_trace(plan, trace)[0])
    assert times[1].modeled_layer_time_us_flat == pytest.approx(times[0].modeled_layer_time_us_flat + 100.0)
    assert times[1].modeled_layer_time_us == pytest.approx(times[0].modeled_layer_time_us + 100.0)
    # Measured with a few tokens, the fixed cost holds every collective's start-up already.
    assert times[2].modeled_layer_time_us_flat == pytest.approx(times[0].modeled_layer_time_us_flat)
    assert times[2].modeled_layer_time_us_gather == pytest.approx(times[0].modeled_layer_time_us_gather)
    # Uncalibrated (no fixed cost), the start-ups are the alpha terms.
    assert times[3].modeled_layer_time_us_flat > times[0].modeled_layer_time_us_flat - 100.0
    with pytest.raises(Exception, match="layer_overhead_us"):
        LinkModel(layer_overhead_us=-1.0)


def test_host_tail_overlaps_the_device_work_after_the_last_wait():
    trace = tiny_trace()
    profile = RoutingProfile.from_topk_ids(trace, 8)
    # A link so slow that the work after the last wait outlasts every tail.
    slow = LinkModel(inter_node_bandwidth_Gbps=1e-3, intra_node_bandwidth_GBps=1e-3, layer_overhead_us=100.0,
                     hop_overhead_us=40.0, gather_overhead_us=60.0)
    variants = [slow, dataclasses.replace(slow, layer_host_tail_us=30.0, hierarchical_host_tail_us=50.0),
                dataclasses.replace(slow, inter_node_bandwidth_Gbps=1e6, intra_node_bandwidth_GBps=1e6,
                                    expert_tflops=1e6),
                dataclasses.replace(slow, inter_node_bandwidth_Gbps=1e6, intra_node_bandwidth_GBps=1e6,
                                    expert_tflops=1e6, layer_host_tail_us=30.0, hierarchical_host_tail_us=50.0)]
    m = [simulate_trace(make_plan("contiguous", profile, Topology.uniform(2, 2, links)), trace)[0]
         for links in variants]
    # Work longer than the tail: the tail is hidden behind it.
    assert m[1].modeled_layer_time_us_flat == pytest.approx(m[0].modeled_layer_time_us_flat - 30.0)
    assert m[1].modeled_layer_time_us == pytest.approx(m[0].modeled_layer_time_us - 50.0)
    # The gather exchange is one CUDA graph launched at the end of the host's work: nothing to overlap.
    assert m[1].modeled_layer_time_us_gather == pytest.approx(m[0].modeled_layer_time_us_gather)
    # Work shorter than the tail: it hides behind the launches, and the fixed cost is what is left.
    assert m[3].modeled_layer_time_us_flat == pytest.approx(100.0)
    assert m[3].modeled_layer_time_us == pytest.approx(140.0, abs=0.01)
    assert m[3].modeled_layer_time_us_gather == pytest.approx(60.0, abs=0.01)
    assert m[2].modeled_layer_time_us_flat > m[3].modeled_layer_time_us_flat
    with pytest.raises(Exception, match="layer_host_tail_us"):
        LinkModel(layer_host_tail_us=-1.0)


@pytest.mark.filterwarnings("ignore:some other warning")
def test_host_tail_is_the_time_after_the_last_synchronising_call():
    now = [0.0]  # the test's clock: the forward advances it, nothing else does

    def forward(wait_s: float, tail_s: float, syncs: int):
        def run(_x):
            for _ in range(syncs):
                now[0] += wait_s
                warnings.warn(f"{bench_layers.SYNC_WARNING} (a test's)")
            warnings.warn("some other warning, not a wait")
            now[0] += tail_s
        return run

    def clock() -> float:
        return now[0]

    filters, show = list(warnings.filters), warnings.showwarning
    tails = bench_layers.tails_after_sync_warnings(forward(0.05, 0.02, 2), None, 2, lambda: None, clock)
    assert tails == pytest.approx([20.0, 20.0])  # after the second wait, not the first (70 ms)
    # No wait at all: every moment of the forward is launch time the device can overlap.
    assert bench_layers.tails_after_sync_warnings(forward(0.05, 0.02, 0), None, 1, lambda: None, clock) == \
        pytest.approx([20.0])
    # `drain` runs before the iteration's clock starts: its time is not the forward's.
    drained = bench_layers.tails_after_sync_warnings(forward(0.0, 0.01, 0), None, 1,
                                                     lambda: now.__setitem__(0, now[0] + 1.0), clock)
    assert drained == pytest.approx([10.0])
    # The capture leaves no filter or display hook behind.
    assert warnings.filters == filters and warnings.showwarning is show


def test_bench_gpu_at_two_by_two_times_node_group_exchanges_and_the_auto_model(shared_data, tmp_path):
    out = tmp_path / "model"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--device", "cpu", "--tiny", "--gpus", "4",
                    "--nodes", "2", "--shapes", "olmoe", "--variants", "grace-layer/contiguous", "--batches", "decode-256",
                    "--iters", "1", "--warmup", "1",
                    "--traces", str(shared_data / "routing"), "--out", str(out)], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    report = json.loads((out / "bench_gpu.json").read_text())
    # Same-node exchanges are also measured over a process group of the node alone.
    links = report["links"]
    assert links["intra_node_group_GBps"] > 0 and links["intra_node_group_latency_us"] > 0
    # Hierarchical and gather with their in-node stages over node groups, beside the same over the job's group:
    # the same bytes, their own fixed costs, modeled with the node group's same-node rate.
    by_variant = {r["variant"]: r for r in report["results"]}
    assert set(by_variant) == {f"grace-layer/contiguous/{m}" for m in
                               ("flat", "hierarchical", "gather", "hierarchical-node-groups", "gather-node-groups")}
    for mode in ("hierarchical", "gather"):
        world, grouped = by_variant[f"grace-layer/contiguous/{mode}"], by_variant[f"grace-layer/contiguous/{mode}-node-groups"]
        assert (grouped["cross_node_bytes"], grouped["intra_node_bytes"]) == (world["cross_node_bytes"], world["intra_node_bytes"])
        assert grouped["modeled_ms"] > 0
    fixed = report["fixed_costs"]["olmoe/olmoe_arxiv/L1"]
    assert {"hop_node_groups_overhead_us", "gather_node_groups_overhead_us", "hierarchical_node_groups_host_tail_us"} <= set(fixed)
    grouped_links = gpu_model.calibrated_links({**links, **fixed}, node_groups=True)
    assert grouped_links.fanout_bandwidth_GBps == links["intra_node_group_GBps"]
    assert grouped_links.hop_overhead_us == fixed["hop_node_groups_overhead_us"]
    assert grouped_links.gather_overhead_us == fixed["gather_node_groups_overhead_us"]
    assert gpu_model.calibrated_links({**links, **fixed}).fanout_bandwidth_GBps == 0.0
    modes = {(r["policy"], r["mode"]) for r in report["model"]}
    assert {("grace", "flat"), ("grace", "hierarchical"), ("grace", "auto")} <= modes
    assert all(r["median_ms"] > 0 for r in report["model"])


def test_a_faster_fanout_shortens_only_the_stages_inside_a_node():
    trace = tiny_trace()
    profile = RoutingProfile.from_topk_ids(trace, 8)
    times = []
    for fanout in (0.0, 1e4):
        links = LinkModel(intra_node_bandwidth_GBps=0.01, fanout_bandwidth_GBps=fanout, layer_overhead_us=100.0)
        times.append(simulate_trace(make_plan("contiguous", profile, Topology.uniform(2, 2, links)), trace)[0])
    assert times[1].modeled_layer_time_us < times[0].modeled_layer_time_us
    assert times[1].modeled_layer_time_us_gather < times[0].modeled_layer_time_us_gather
    assert times[1].modeled_layer_time_us_flat == times[0].modeled_layer_time_us_flat


def test_predict_layout_models_every_plan_and_exchange_at_two_by_four(shared_data, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/predict_layout.py"), "--calibration",
                    str(ROOT / "docs/bench-gpu-2x2.json"), "--traces", str(shared_data / "routing"),
                    "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    report = json.loads((tmp_path / "predicted-2x4.json").read_text())
    assert report["target"] == "2 nodes x 4 GPUs"
    # olmoe_arxiv: 4 plans x (2 exchanges x 3 batches + gather x 2 decode batches), at the target and at
    # the calibration's layout.
    assert len(report["rows"]) == len(report["calibration_rows"]) == 32
    assert all(r["modeled_ms"] > 0 for r in report["rows"] + report["calibration_rows"])
    # Flat prefill crosses nodes once per remote GPU: more GPUs a node, more copies on the same link.
    flat = {r["policy"]: r["modeled_ms"] for r in report["rows"] if r["mode"] == "flat" and r["batch"] == "prefill-32768"}
    before = {r["policy"]: r["modeled_ms"] for r in report["calibration_rows"]
              if r["mode"] == "flat" and r["batch"] == "prefill-32768"}
    assert all(flat[p] > before[p] for p in flat)


def test_shared_link_divides_the_cross_node_rate_among_more_nodes(shared_data, tmp_path):
    reports = {}
    for name, extra in (("own", []), ("shared", ["--shared-link"])):
        subprocess.run([sys.executable, str(ROOT / "scripts/predict_layout.py"), "--calibration",
                        str(ROOT / "docs/bench-gpu-2x2.json"), "--nodes", "4", "--gpus-per-node", "1", "--traces",
                        str(shared_data / "routing"), "--out", str(tmp_path)] + extra, check=True, cwd=ROOT, timeout=HANG_GUARD_S)
        reports[name] = json.loads((tmp_path / "predicted-4x1.json").read_text())
    # At the calibration's own 2 nodes the share is the measured rate, so nothing changes there.
    assert reports["own"]["calibration_rows"] == reports["shared"]["calibration_rows"]
    prefill = {name: [r["modeled_ms"] for r in report["rows"] if r["batch"] == "prefill-32768"]
               for name, report in reports.items()}
    assert all(shared > own for own, shared in zip(prefill["own"], prefill["shared"]))


def test_expert_compute_benchmark_times_fused_per_row_and_gemm_alike(shared_data, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_expert_compute.py"), "--device", "cpu", "--tiny",
                    "--iters", "2", "--warmup", "1", "--traces", str(shared_data / "routing"), "--out", str(tmp_path)],
                   check=True, cwd=ROOT, timeout=HANG_GUARD_S)
    results = json.loads((tmp_path / "expert_compute.json").read_text())["results"]
    assert {(r["shape"], r["batch"]) for r in results} == {
        (s, b) for s in ("olmoe", "qwen3", "dsv2lite") for b in ("prefill", "decode-256", "decode-512")}
    for r in results:
        assert r["max_rel_diff"] < 1e-5  # the fused path computes what the per-row path computed
        assert 0 < r["pairs_here"] <= r["pairs"] and min(r["fused_ms"], r["scatter_ms"], r["per_row_ms"], r["gemm_ms"]) > 0
        if r["batch"] == "prefill":
            assert r["pairs_here"] == r["pairs"]  # the all-to-all brings only this GPU's pairs
    # The way back's two forms on growing prefixes of the first shape's prefill pairs.
    sweep = json.loads((tmp_path / "expert_compute.json").read_text())["sweep"]
    assert [r["pairs"] for r in sweep] == [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    assert all(r["shape"] == "olmoe" and r["sparse_ms"] > 0 and r["gather_ms"] > 0 for r in sweep)
    # The docs page gives it a section of its own.
    page = rendered_page(tmp_path, ROOT / "docs/bench-gpu-2x2.json", "--expert-compute",
                         str(tmp_path / "expert_compute.json"))
    assert "fused permute and unpermute" in page and "| olmoe | prefill |" in page and "| 65536 |" in page


def test_fixed_cost_batch_gives_every_expert_a_pair():
    for shape in gpu_cases.SHAPES.values():
        ids = gpu_cases.fixed_cost_ids(shape)
        assert ids.shape == (-(-shape.num_experts // shape.top_k), shape.top_k)
        assert set(ids.flatten().tolist()) == set(range(shape.num_experts))
        assert all(len(set(row)) == shape.top_k for row in ids.tolist())


def test_variants_take_turns_in_rounds_sharing_the_iterations():
    calls = []
    bench_layers.round_robin(2, 5, 3, lambda entry, iters, warmup: calls.append((entry, iters, warmup)))
    assert calls == [(0, 2, 3), (1, 2, 3)] + [(0, 1, 1), (1, 1, 1)] * 3
    calls.clear()  # fewer iterations than rounds: one round each
    bench_layers.round_robin(3, 2, 1, lambda entry, iters, warmup: calls.append((entry, iters, warmup)))
    assert calls == [(0, 1, 1), (1, 1, 1), (2, 1, 1)] * 2


def test_profile_writes_the_op_table_of_the_asked_exchange_and_batch(shared_data, tmp_path):
    run = [sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--device", "cpu", "--tiny", "--gpus", "2", "--nodes",
           "2", "--shapes", "olmoe", "--no-e2e", "--traces", str(shared_data / "routing"), "--out", str(tmp_path)]
    subprocess.run(run + ["--profile-decode"], check=True, cwd=ROOT, timeout=HANG_GUARD_S, capture_output=True)
    assert "Self CPU time total" in (tmp_path / "profile_flat_decode-256.txt").read_text()
    bad = subprocess.run(run + ["--profile", "hierarchical"], cwd=ROOT, timeout=HANG_GUARD_S, capture_output=True, text=True)
    assert bad.returncode == 2 and "EXCHANGE:BATCH" in bad.stderr
