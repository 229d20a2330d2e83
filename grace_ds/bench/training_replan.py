"""Re-planning a training run: start under the contiguous plan with routing profiling on, plan from the
routing the run itself recorded, and resume from its checkpoint under the GRACE plan, optimizer states
included (grace_ds.optimizer_state_remap).

The embedded OLMoE-architecture model converted by grace_ds.deepspeed.initialize (AdamW, ZeRO 1, clipping),
ranks as logical nodes; every run sees the same batches of the standard library's training text:
  uninterrupted        the contiguous plan for every step, `grace_moe.profiling` on; after --replan-at
                       steps it saves the checkpoint and the routing profile of those steps
  resumed/same-plan    a fresh engine under the contiguous plan loads the checkpoint: DeepSpeed's own
                       round trip (equal to the uninterrupted run, exactly)
  replanned            a fresh engine under the GRACE plan made from that profile loads the checkpoint:
                       weights and AdamW's moments remapped to the new slots
  replanned/fresh      the same with load_optimizer_states=False: the moments start over
  resumed/noise        resumed/same-plan with every weight moved by about one float32 rounding: how far two
                       runs part from rounding alone (a top-k choice between near-tied experts flips)
Each resumed run is compared with the uninterrupted run's steps after the re-plan. Bytes a rank hands to
all_to_all_single per step and per-GPU load (max/mean of (token, expert) pairs computed) are measured over
those steps.

    python scripts/replan_training.py --out docs/replan-training-2x2-cpu [--steps 80 --replan-at 40]
Writes OUT/replan_training.json (commit, command, machine) and OUT/replan_loss.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grace_ds.bench.provenance import run_record
from grace_ds.bench.training import add_run_arguments, batches, reduced, synchronize, world_of
from grace_ds.bench.training_report import parting_step
from grace_ds.bench.training_variants import WireBytes, load_model, perturb
from grace_ds.exchange.traffic import Traffic
from grace_ds.topology import Topology

RUNS = ("uninterrupted", "resumed/same-plan", "replanned", "replanned/fresh", "resumed/noise")
TAG = "replan"


def engine_under(plan: str, args, device: torch.device, profiling: bool = False):
    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.deepspeed_training import runtimes_of

    config = {"train_micro_batch_size_per_gpu": args.sequences_per_rank, "gradient_clipping": args.clip,
              "zero_optimization": {"stage": args.zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9,
              "grace_moe": {"plan": plan, "communication": "hierarchical", "profiling": profiling}}
    engine, *_ = grace_deepspeed.initialize(load_model().to(device), config,
                                            optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr,
                                                                                       weight_decay=0.01))
    runtime = runtimes_of(engine.module)[0]
    runtime.measure = True
    return engine, runtime


def train_steps(engine, runtime, steps, wire: WireBytes, label: str, world: int) -> dict:
    """Optimizer steps over `steps` (batches); the run's losses (mean over ranks) and what it moved."""
    from tqdm import tqdm

    steps = list(steps)
    wire.reset()
    runtime.traffic = [Traffic() for _ in runtime.traffic]  # pairs computed over these steps only
    losses = []
    engine.train()
    for ids in tqdm(steps, desc=label, disable=dist.get_rank() != 0, leave=False):
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    synchronize(ids.device)
    mean = torch.tensor(losses, dtype=torch.float64)
    mean = reduced(mean)
    pairs = torch.zeros(world, dtype=torch.float64)
    pairs[runtime.rank] = sum(t.pairs_computed for t in runtime.traffic) / len(steps)
    pairs = reduced(pairs)
    moved = torch.tensor([wire.exchange.cross_node_bytes, wire.exchange.intra_node_bytes], dtype=torch.float64)
    moved = reduced(moved)
    return {"losses": (mean / world).tolist(), "load_max_over_mean": float(pairs.max() / pairs.mean()),
            "cross_node_bytes_per_step": float(moved[0]) / world / len(steps),
            "same_node_bytes_per_step": float(moved[1]) / world / len(steps)}


def worker(rank: int, world: int, nodes: int, port: int, args, folder: str, result_file: str) -> None:
    import deepspeed

    import grace_ds.deepspeed as grace_deepspeed
    from grace_ds.logical_nodes import join_logical_node
    from grace_ds.planners import make_plan
    from grace_ds.routing_profile import RoutingProfile

    device, backend = join_logical_node(rank, world, nodes, port, args.device)
    deepspeed.init_distributed(dist_backend=backend)
    wire = WireBytes(Topology.uniform(nodes, world // nodes).node_of_gpu.tolist())
    wire.install()
    names = ("plan_contiguous.json", "plan_grace.json", "profile.safetensors", "checkpoint")
    paths = {name: str(Path(folder, name)) for name in names}
    try:
        every = list(batches(args, world, rank, device))
        before, after = every[:args.replan_at], every[args.replan_at:]
        engine, runtime = engine_under(paths["plan_contiguous.json"], args, device, profiling=True)
        first = train_steps(engine, runtime, before, wire, "uninterrupted (before the re-plan)", world)
        started = time.perf_counter()
        engine.save_checkpoint(paths["checkpoint"], tag=TAG)
        grace_deepspeed.save_profile(engine, paths["profile.safetensors"])
        saved_s = time.perf_counter() - started
        planned_s = 0.0
        if rank == 0:
            started = time.perf_counter()
            profile = RoutingProfile.load(paths["profile.safetensors"])
            make_plan("grace", profile, Topology.uniform(nodes, world // nodes),
                      replica_slots=args.replica_slots).save(paths["plan_grace.json"])
            planned_s = time.perf_counter() - started
        dist.barrier()
        rest = train_steps(engine, runtime, after, wire, "uninterrupted (after)", world)
        results = [{"run": "uninterrupted", "before": first, **rest}]
        del engine
        for run, plan, states, noise in (("resumed/same-plan", "plan_contiguous.json", True, False),
                                         ("replanned", "plan_grace.json", True, False),
                                         ("replanned/fresh", "plan_grace.json", False, False),
                                         ("resumed/noise", "plan_contiguous.json", True, True)):
            torch.manual_seed(args.seed)
            engine, runtime = engine_under(paths[plan], args, device)
            started = time.perf_counter()
            engine.load_checkpoint(paths["checkpoint"], tag=TAG, load_optimizer_states=states)
            loaded_s = time.perf_counter() - started
            if noise:
                perturb(engine.module)
                engine.optimizer.refresh_fp32_params()  # ZeRO steps from its fp32 masters: move them too
            results.append({"run": run, "plan": plan, "optimizer_states": states, "load_s": loaded_s,
                            **train_steps(engine, runtime, after, wire, run, world)})
            del engine
        times = torch.tensor([saved_s, planned_s], dtype=torch.float64)
        times = reduced(times, dist.ReduceOp.MAX)
        if rank == 0:
            Path(result_file).write_text(json.dumps({"results": results, "planning_s": float(times[1]),
                                                     "save_checkpoint_and_profile_s": float(times[0])}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def compare(results: list[dict], replan_at: int) -> None:
    """Each resumed run against the uninterrupted one over the steps after the re-plan."""
    reference = results[0]["losses"]
    for r in results[1:]:
        gaps = [abs(a - b) for a, b in zip(r["losses"], reference)]
        parts = parting_step(r["losses"], reference)
        r.update({"max_loss_difference": max(gaps), "first_10_steps_max_loss_difference": max(gaps[:10]),
                  "parting_step": None if parts is None else replan_at + parts})


def plot(results: list[dict], replan_at: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(13, 4.4))
    color = dict(zip(RUNS, ("black", "tab:blue", "tab:green", "tab:red", "tab:grey")))
    reference = results[0]
    whole = reference["before"]["losses"] + reference["losses"]
    curves.plot(range(1, len(whole) + 1), whole, label="uninterrupted (contiguous plan)", linewidth=1,
                color=color["uninterrupted"])
    after = range(replan_at + 1, replan_at + len(reference["losses"]) + 1)
    for r in results[1:]:
        if r["run"] != "resumed/noise":
            curves.plot(after, r["losses"], label=r["run"], linewidth=1, linestyle="--", color=color[r["run"]])
        gap = [max(abs(a - b), 1e-12) for a, b in zip(r["losses"], reference["losses"])]
        gaps.semilogy(after, gap, label=r["run"], color=color[r["run"]],
                      linestyle=":" if r["run"] == "resumed/noise" else "-")
    for axis in (curves, gaps):
        axis.axvline(replan_at + 0.5, color="grey", linewidth=0.8)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    curves.set(xlabel="step", ylabel="training loss (mean over ranks)", title=f"Re-planned after step {replan_at}")
    gaps.set(xlabel="step", ylabel="|loss difference| (floor 1e-12)",
             title="Each resumed run against the uninterrupted one\n(dotted: one-rounding control)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    print(f"\n{'run':20s} {'xnode MB':>9s} {'in-node MB':>10s} {'load max/mean':>13s} {'max |dloss|':>12s} "
          f"{'10 steps':>10s} {'parts at':>8s} {'load s':>7s}")
    for r in report["results"]:
        gap = (f"{r['max_loss_difference']:12.2e} {r['first_10_steps_max_loss_difference']:10.2e} "
               f"{r['parting_step'] if r['parting_step'] is not None else 'never':>8}"
               if "max_loss_difference" in r else f"{'(reference)':>12s} {'':>10s} {'':>8s}")
        print(f"{r['run']:20s} {r['cross_node_bytes_per_step'] / 1e6:9.3f} {r['same_node_bytes_per_step'] / 1e6:10.3f} "
              f"{r['load_max_over_mean']:13.3f} {gap} {r.get('load_s', 0.0):7.2f}")
    print(f"checkpoint + profile saved in {report['save_checkpoint_and_profile_s']:.2f} s, "
          f"re-planned in {report['planning_s']:.2f} s")


def main() -> None:
    from grace_ds.logical_nodes import free_port
    from grace_ds.planners import make_plan
    from grace_ds.routing_profile import RoutingProfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for replan_training.json and replan_loss.png")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps in all")
    p.add_argument("--replan-at", type=int, default=40, help="steps under the contiguous plan before the re-plan")
    add_run_arguments(p)
    args = p.parse_args()
    if not 0 < args.replan_at < args.steps:
        p.error(f"--replan-at ({args.replan_at}) must lie between 0 and --steps ({args.steps})")
    world = world_of(p, args)
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        # The starting plan needs no profile: the contiguous layout (any profile of the right shape will do).
        config = load_model().config
        experts, layers, k = config.num_experts, config.num_hidden_layers, config.num_experts_per_tok
        picks = ((torch.arange(experts)[:, None, None] + torch.arange(k)) % experts).expand(experts, layers, k)
        uniform = RoutingProfile.from_topk_ids(picks, experts)  # token t picks experts t .. t+k-1
        make_plan("contiguous", uniform, Topology.uniform(args.nodes, args.gpus_per_node)).save(
            Path(folder, "plan_contiguous.json"))
        result_file = str(Path(folder, "results.json"))
        mp.spawn(worker, args=(world, args.nodes, free_port(), args, folder, result_file), nprocs=world, join=True)
        report = json.loads(Path(result_file).read_text())
    compare(report["results"], args.replan_at)
    report["setting"] = {**run_record(args.device), "ranks": world, "nodes": args.nodes, "steps": args.steps,
                         "replan_at": args.replan_at,
                         "tokens_per_rank_per_step": args.sequences_per_rank * args.sequence_length,
                         "lr": args.lr, "clip": args.clip, "zero_stage": args.zero_stage,
                         "replica_slots": args.replica_slots, "seconds": round(time.time() - started, 1),
                         "load_average_1min_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]}
    (args.out / "replan_training.json").write_text(json.dumps(report, indent=1))
    plot(report["results"], args.replan_at, args.out / "replan_loss.png")
    print_table(report)
    print(f"\n-> {args.out / 'replan_training.json'}, {args.out / 'replan_loss.png'}")


if __name__ == "__main__":
    main()
