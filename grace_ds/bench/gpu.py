"""GPU benchmark: one MoE layer (and a small full model) across logical nodes, DeepSpeed's native MoE
against the GRACE layer under every plan and communication mode, with routing replayed from real traces.

    python scripts/bench_gpu.py --traces DIR --out DIR            (one call of scripts/bench_gpu.sh)
    python scripts/bench_gpu.py --device cpu --tiny --out DIR     (the same code on gloo, small shapes)

Per rank (one GPU a rank; ranks split into `--nodes` logical nodes told apart by NCCL_HOSTID, so traffic
between them takes NCCL's socket path): link and GEMM figures are measured first, then every (shape,
batch, variant) is timed: median over `--iters` forwards after `--warmup`, CUDA events, the slowest rank
per iteration; a trace's variants take turns in rounds, so the link's drift falls on all alike. Plans
are built in the parent from the first half of each trace; the second half is replayed. The parent then
adds the simulator's modeled time (calibrated with the measured figures) and the floor, writes
bench_gpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from grace_ds.bench.gpu_cases import BATCHES, HIERARCHICAL_SPLIT_SIZES, SHAPES, prepare, prepare_model
from grace_ds.bench.gpu_model import add_model_and_floor, print_table
from grace_ds.bench.gpu_timing import worker
from grace_ds.bench.provenance import ROOT, command, commit, run_record
from grace_ds.logical_nodes import free_port
from grace_ds.topology import Topology


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=Path, default=ROOT.parent / "shared/data/routing",
                   help="folder with the routing traces (../shared/data/routing and the embedded model's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--gpus", type=int, help="ranks (default: every GPU; 4 on the CPU)")
    p.add_argument("--nodes", type=int, default=2, help="logical nodes the ranks are split into")
    p.add_argument("--shapes", default="olmoe,qwen3,dsv2lite")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--replica-slots", type=int, default=1)
    p.add_argument("--link-bytes", type=int, default=64 << 20, help="bytes per peer when measuring links")
    p.add_argument("--batches", help=f"comma-separated subset of {','.join(BATCHES)} (default: all)")
    p.add_argument("--variants", help="comma-separated name prefixes of the variants to run, e.g. "
                   "deepspeed-autoep,grace-layer/grace (default: all)")
    p.add_argument("--tiny", action="store_true", help="small shapes and batches (CPU smoke run)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the whole-model prefill/decode runs")
    p.add_argument("--no-node-groups", action="store_true",
                   help="leave out the exchanges whose in-node stages run over a process group of each node")
    p.add_argument("--model-only", action="store_true", help="the whole-model runs alone, no single-layer cases")
    p.add_argument("--profile", metavar="EXCHANGE:BATCH",
                   help="instead of the benchmark: torch.profiler's op table (and timeline, on a GPU) of the GRACE "
                        "layer, grace plan, e.g. hierarchical:prefill-32768 (profile_EXCHANGE_BATCH.txt / .json)")
    p.add_argument("--profile-decode", dest="profile", action="store_const", const="flat:decode-256",
                   help="the same as --profile flat:decode-256")
    p.add_argument("--remodel", type=Path, metavar="MEASURED_JSON",
                   help="no run: redo the modeled time and floor of a run's bench_gpu_measured.json "
                        "(its layout, shapes and replica slots) into --out/bench_gpu.json")
    args = p.parse_args()
    if args.remodel:
        setting = json.loads(args.remodel.read_text())["setting"]
        args.gpus, args.nodes, args.tiny = setting["ranks"], setting["nodes"], setting["tiny"]
        args.replica_slots = setting["replica_slots"]
        args.shapes = ",".join(dict.fromkeys(r["shape"] for r in json.loads(args.remodel.read_text())["results"]))
    args.shapes = args.shapes.split(",")
    args.batches = args.batches.split(",") if args.batches else None
    args.variants = args.variants.split(",") if args.variants else None
    if args.profile and (args.profile.count(":") != 1 or args.profile.split(":")[1] not in BATCHES
                         or args.profile.split(":")[0] not in ("flat", "hierarchical", "gather")):
        p.error(f"--profile takes EXCHANGE:BATCH, an exchange of flat, hierarchical, gather and a batch of "
                f"{sorted(BATCHES)}; got {args.profile!r}")
    if args.batches and set(args.batches) - set(BATCHES):
        p.error(f"unknown batches {sorted(set(args.batches) - set(BATCHES))}; choose from {sorted(BATCHES)}")
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        p.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    world = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 4)
    if world < args.nodes or world % args.nodes:
        args.nodes = 1
    topology = Topology.uniform(args.nodes, world // args.nodes)
    # auto: the runtime's per-call choice (flat below hierarchical_min_tokens on the largest rank).
    args.e2e_modes = ["flat", "hierarchical", "auto"] if args.nodes > 1 and world // args.nodes > 1 else ["flat"]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{world} ranks as {args.nodes} logical node(s) x {world // args.nodes}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.remodel:  # the same plans and replays again (deterministic), the run's measurements as they were
            report = json.loads(args.remodel.read_text())
            report["setting"]["remodeled"] = time.strftime("%Y-%m-%d")
            report["setting"]["remodeled_by"] = {"commit": commit(), "command": command()}
            add_model_and_floor(report, prepare(args, topology, Path(tmp)), topology, args)
            (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=1))
            print_table(report)
            return
        cases = [] if args.model_only else prepare(args, topology, Path(tmp))
        model_case = prepare_model(args, topology, Path(tmp))
        result_file = str(Path(tmp, "results.json"))
        mp.spawn(worker, args=(world, args, cases, model_case, free_port(), result_file), nprocs=world, join=True)
        report = json.loads(Path(result_file).read_text())
        report["setting"] = {**run_record(args.device), "ranks": world, "nodes": args.nodes,
                             "gpus_per_node": world // args.nodes, "iters": args.iters, "warmup": args.warmup,
                             "replica_slots": args.replica_slots, "tiny": args.tiny, "batches": BATCHES,
                             "fixed_cost_batch": "every expert one pair from every GPU",
                             "hierarchical_split_sizes": HIERARCHICAL_SPLIT_SIZES}
        # The measurements first, as they are, before anything else can go wrong.
        (args.out / "bench_gpu_measured.json").write_text(json.dumps(report, indent=1))
        add_model_and_floor(report, cases, topology, args)
    if args.profile:
        mode, batch = args.profile.split(":")
        print((args.out / f"profile_{mode}_{batch}.txt").read_text())
        return
    (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
