"""The calibrated cost model's prediction of the GPU layer benchmark at another layout, before a machine
of that size is lent (2 logical nodes x 4 GPUs on 8 H200 for now).

Link and GEMM figures, fixed layer and hop costs come from a measured run (`--calibration`, one of
scripts/bench_gpu.py's JSON files); plans are made at the target layout from the first half of each
trace the benchmark replays, and the second half is simulated for the benchmark's batches, for every GRACE
plan and both exchanges. The calibration's own layout is predicted too, next to what was measured there,
so the model's error is in view. Assumption stated in the output: fixed costs (launches, collective
start-up) measured at the calibration layout carry over.

    python scripts/predict_layout.py --calibration docs/bench-gpu-2x2.json --nodes 2 --gpus-per-node 4
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


from grace_ds.bench.gpu_cases import BATCHES, HIERARCHICAL_SPLIT_SIZES, POLICIES, REPLAYS, SHAPES, map_ids
from grace_ds.bench.gpu_model import calibrated_links
from grace_ds.bench.provenance import ROOT, run_record
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.cost import CostSettings
from grace_ds.simulate import simulate_trace
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace


def predict(calibration: dict, topology: Topology, traces: Path, shapes: list[str], replica_slots: int,
            shared_link: bool = False) -> list[dict]:
    """One row per (case, plan, exchange, batch) with the modeled MoE-layer time in ms. `shared_link`: the
    measured cross-node rate is one link that every node shares, so each node's share scales with the
    calibration's nodes / this topology's."""
    link_share = calibration["setting"]["nodes"] / topology.num_nodes if shared_link else 1.0
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        for file, layer, mapping in REPLAYS[name]:
            path = traces / file
            if not path.is_file():
                continue
            ids = map_ids(RoutingTrace.load(path).topk_ids[:, layer].long(), mapping)
            half = ids.shape[0] // 2
            profile = RoutingProfile.from_topk_ids(ids[:half, None, :], shape.num_experts, model_name=file)
            case = f"{name}/{Path(file).stem}/L{layer}"
            # The fixed costs timed with this case (runs since 2026-11-28), else the run's.
            figures = {**calibration["links"], **calibration.get("fixed_costs", {}).get(case, {})}
            figures["inter_node_GBps"] *= link_share
            calibrated = Topology(topology.gpus_per_node, calibrated_links(figures))
            # The fixed costs and host tails hold the calibration runtime's waits.
            cost = CostSettings(shape.hidden, shape.inter, 2, hierarchical_waits_for_first_stage=calibration["setting"].get(
                "hierarchical_split_sizes") != HIERARCHICAL_SPLIT_SIZES)
            for policy in POLICIES:
                plan = dataclasses.replace(make_plan(policy, profile, topology, replica_slots), topology=calibrated)
                for batch, tokens in BATCHES.items():
                    metrics = simulate_trace(plan, ids[half:half + tokens, None, :], "tar", cost)[0]
                    modes = [("flat", metrics.modeled_layer_time_us_flat), ("hierarchical", metrics.modeled_layer_time_us)]
                    if batch.startswith("decode"):  # the gather exchange is timed at decode only
                        modes.append(("gather", metrics.modeled_layer_time_us_gather))
                    for mode, time_us in modes:
                        rows.append({"case": case, "policy": policy, "mode": mode, "batch": batch,
                                     "modeled_ms": time_us / 1e3})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration", type=Path, default=ROOT / "docs" / "bench-gpu-2x2.json")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--shapes", default="olmoe")
    parser.add_argument("--replica-slots", type=int, default=1)
    parser.add_argument("--traces", type=Path, default=ROOT.parent / "shared" / "data" / "routing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--measured", type=Path,
                        help="a bench_gpu.py run at the target layout: its medians beside the prediction")
    parser.add_argument("--shared-link", action="store_true",
                        help="the cross-node rate is one link all nodes share (logical nodes on one host share its "
                             "socket transport; so do nodes behind one switch uplink): each node's rate scales "
                             "with the calibration's nodes / the target's")
    args = parser.parse_args(argv)
    calibration = json.loads(args.calibration.read_text())
    setting = calibration["setting"]
    here = Topology.uniform(setting["nodes"], setting["gpus_per_node"])
    target = Topology.uniform(args.nodes, args.gpus_per_node)
    shapes = args.shapes.split(",")
    at_target = predict(calibration, target, args.traces, shapes, args.replica_slots, args.shared_link)
    at_calibration = predict(calibration, here, args.traces, shapes, args.replica_slots, args.shared_link)
    measured = {(r["case"], r["policy"], r["mode"], r["batch"]): r["median_ms"]
                for r in calibration["results"] if r["policy"] is not None}
    at_target_measured = {}
    if args.measured:
        run = json.loads(args.measured.read_text())
        if (run["setting"]["nodes"], run["setting"]["gpus_per_node"]) != (args.nodes, args.gpus_per_node):
            parser.error(f"{args.measured} ran at {run['setting']['nodes']}x{run['setting']['gpus_per_node']}, "
                         f"not the target {args.nodes}x{args.gpus_per_node}")
        at_target_measured = {(r["case"], r["policy"], r["mode"], r["batch"]): r["median_ms"]
                              for r in run["results"] if r["policy"] is not None}
    label = f"{args.nodes}x{args.gpus_per_node}"
    (args.out / f"predicted-{label}.json").write_text(json.dumps(
        {"run": run_record("cpu"), "calibration": str(args.calibration.name), "target": target.describe(), "rows": at_target,
         "calibration_rows": at_calibration}, indent=1) + "\n")
    lines = [f"# Predicted GPU layer times at {target.describe()}", "",
             f"By `python scripts/predict_layout.py --calibration {args.calibration.relative_to(ROOT) if args.calibration.is_relative_to(ROOT) else args.calibration} "
             f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node} --traces {args.traces.name}"
             + (f" --measured {args.measured.relative_to(ROOT) if args.measured.is_relative_to(ROOT) else args.measured}"
                if args.measured else "") + (" --shared-link" if args.shared_link else "") + "` (the traces "
             "scripts/prepare_gpu_carry.sh puts in `.bench_data`): the simulator's cost model with the link, "
             f"GEMM and fixed-cost figures measured at {here.describe()} ({setting['device']}, {setting.get('date', '')}), "
             "plans made at each layout from the first half of each trace, the second half replayed. Assumes the "
             "fixed per-layer and per-hop costs measured there carry over to the new layout (more ranks usually "
             "raise them). "
             + (f"The measured cross-node rate is taken as one link all nodes share (logical nodes on one host share "
                f"its socket transport), so each node gets {setting['nodes']}/{args.nodes} of the measured per-node "
                "rate. " if args.shared_link else "")
             + "The first measured column is the calibration run itself, to show the model's error "
             "there; "
             + (f"the last is `{args.measured.name}`, measured at {target.describe()}."
                if args.measured else f"the {label} figures are to be checked when that machine is lent."), ""]
    base = {(r["case"], r["policy"], r["mode"], r["batch"]): r["modeled_ms"] for r in at_calibration}
    checked = [(row["batch"], row["modeled_ms"] / at_target_measured[key] - 1) for row in at_target
               if (key := (row["case"], row["policy"], row["mode"], row["batch"])) in at_target_measured]
    if checked:
        prefill = [error for batch, error in checked if batch.startswith("prefill")]
        lines += [f"Against the {label} measurement: within 25% for {sum(abs(e) <= 0.25 for _, e in checked)} of "
                  f"{len(checked)} GRACE-layer variants (prefill {sum(abs(e) <= 0.25 for e in prefill)} of "
                  f"{len(prefill)}); largest error {max((e for _, e in checked), key=abs):+.0%}.", ""]
    lines += [f"| case | plan / exchange | batch | predicted {here.describe()} ms | measured {here.describe()} ms "
              f"| predicted {target.describe()} ms | {label} / {setting['nodes']}x{setting['gpus_per_node']} |"
              + (f" measured {target.describe()} ms |" if args.measured else ""),
              "|---|---|---|---:|---:|---:|---:|" + ("---:|" if args.measured else "")]
    for row in at_target:
        key = (row["case"], row["policy"], row["mode"], row["batch"])
        seen, there = measured.get(key), at_target_measured.get(key)
        lines.append(f"| {row['case']} | {row['policy']} / {row['mode']} | {row['batch']} | {base[key]:.2f} | "
                     f"{'-' if seen is None else f'{seen:.2f}'} | {row['modeled_ms']:.2f} | "
                     f"{row['modeled_ms'] / base[key]:.2f}x |"
                     + ((f" {there:.2f} |" if there is not None else " - |") if args.measured else ""))
    (args.out / f"predicted-{label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
