"""Training benchmark: the embedded OLMoE-architecture model trained through GRACE layers against DeepSpeed.

Every variant starts from the same weights and sees the same batches (byte sequences of the standard
library's training part); the GRACE plan is made from a profile of the model's routing on the held-out part.

  deepspeed-moe       each MoE block as deepspeed.moe.layer.MoE (DeepSpeed's contiguous experts, E/W a rank,
                      capacity padding with drop_tokens=False, its top-k gate)
  grace-contiguous    the same blocks as grace_ds.deepspeed_moe.GraceMoE with the contiguous plan (flat exchange)
  grace               GraceMoE with the GRACE plan: grouped, replicated experts, the hierarchical exchange
  transformers        the unmodified transformers model, data parallel (every rank holds every expert)
  transformers-grace  the same model converted by grace_ds.deepspeed.initialize (GRACE plan, hierarchical)
  <reference>/noise   the reference with every weight moved by about one float32 rounding: how far two runs
                      part from rounding alone (top-k choices between near-tied experts flip)

The first three share DeepSpeed's gate (top-k weights renormalised, its l_aux); the last two the model's own
router. Each pair should train alike: the report gives the largest loss difference over the run.

Measured per variant: median step time (forward, backward, optimizer step), bytes a rank sends per step through
torch.distributed's all_to_all_single (split into same-node and cross-node by the logical nodes) and all_reduce
(gradients; GRACE also sums replica gradients), and per-GPU expert load: (token, expert) pairs computed per step,
max/mean over GPUs. On a CPU the ranks emulate GPUs on shared cores: times compare variants on this machine,
not GPUs; bytes and loads are what a GPU run would move and compute.

    python scripts/bench_training.py --out docs/bench-training-2x2-cpu [--steps 200] [--nodes 2 --gpus-per-node 2]
Writes OUT/bench_training.json (with the commit, command and machine) and OUT/loss_curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grace_ds import faults
from grace_ds.bench.provenance import run_record
from grace_ds.bench.training_report import parting_step, plot, print_table
from grace_ds.bench.training_variants import REFERENCE, VARIANTS, WireBytes, engine_for, load_model
from grace_ds.topology import Topology


def batches(args, world: int, rank: int, device: torch.device):
    """Per step: this rank's [sequences_per_rank, sequence_length] byte ids; every variant gets the same."""
    from grace_ds.examples.corpus import stdlib_bytes

    data = stdlib_bytes("train")
    generator = torch.Generator().manual_seed(args.seed)
    mine = slice(rank * args.sequences_per_rank, (rank + 1) * args.sequences_per_rank)
    for _ in range(args.steps):
        starts = torch.randint(0, data.numel() - args.sequence_length, (world * args.sequences_per_rank,),
                               generator=generator)[mine]
        yield torch.stack([data[s:s + args.sequence_length] for s in starts.tolist()]).to(device)


def reduced(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A benchmark figure (on the host) all-reduced over the job."""
    return faults.all_reduced_on_host(tensor, "training benchmark (figures over ranks)", op=op)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_variant(variant: str, world: int, plans: dict[str, str], args, device: torch.device, wire: WireBytes) -> dict:
    from tqdm import tqdm

    rank = dist.get_rank()
    engine, runtime, blocks = engine_for(variant, world, plans, args, device)
    engine.train()
    experts = engine.module.config.num_experts
    counts = torch.zeros(experts, dtype=torch.float64)
    largest = []  # DeepSpeed's capacity per layer call comes from the largest local expert count
    losses, seconds = [], []
    wire.reset()
    steps = tqdm(batches(args, world, rank, device), total=args.steps, desc=variant, disable=rank != 0, leave=False)
    for ids in steps:
        synchronize(device)
        started = time.perf_counter()
        out = engine(ids, labels=ids)
        loss = out.loss + args.aux * sum(block.l_aux for block in blocks) if blocks else out.loss
        engine.backward(loss)
        engine.step()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
        for block in blocks:
            if block.exp_counts is not None and runtime is None:
                counts += block.exp_counts.detach().double().cpu()
                largest.append(float(block.exp_counts.max()))
    moved = torch.tensor([wire.exchange.cross_node_bytes, wire.exchange.intra_node_bytes, wire.all_reduce],
                         dtype=torch.float64) / args.steps
    mean_loss = torch.tensor(losses, dtype=torch.float64)
    mean_loss = reduced(mean_loss)  # the run's loss is the mean of the ranks' (DeepSpeed averages their gradients)
    result = {"variant": variant, "losses": (mean_loss / world).tolist(),
              "median_step_ms": statistics.median(seconds[args.warmup:]) * 1e3,
              "cross_node_bytes_per_step": float(moved[0]), "same_node_bytes_per_step": float(moved[1]),
              "all_reduce_bytes_per_step": float(moved[2])}
    pairs = torch.zeros(world, dtype=torch.float64)
    if runtime is not None:
        pairs[runtime.rank] = sum(t.pairs_computed for t in runtime.traffic) / args.steps
        result["replicas_apart"] = engine.max_replica_difference()
        result["mode_calls"] = dict(runtime.exchange.choice.mode_calls)
    elif blocks:  # DeepSpeed's contiguous experts: rank r computes experts r * E/W ... (r + 1) * E/W - 1
        counts = reduced(counts)  # every rank's tokens per expert
        pairs[rank] = float(counts.view(world, -1)[rank].sum()) / args.steps
        # drop_tokens=False pads every expert's rows from every rank to the largest count (its capacity).
        capacity = torch.tensor(largest, dtype=torch.float64)
        capacity = reduced(capacity, dist.ReduceOp.MAX)
        result["padded_rows_per_gpu_per_step"] = float(capacity.sum()) * (experts // world) * world / args.steps
    if runtime is not None or blocks:
        pairs = reduced(pairs)
        result["pairs_per_gpu_per_step"] = pairs.tolist()
        result["load_max_over_mean"] = float(pairs.max() / pairs.mean())
    step_ms = torch.tensor([result["median_step_ms"]], dtype=torch.float64)
    step_ms = reduced(step_ms, dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    result["median_step_ms"] = float(step_ms)
    del engine
    return result


def worker(rank: int, world: int, nodes: int, port: int, args, plans: dict[str, str], result_file: str) -> None:
    import deepspeed

    from grace_ds.logical_nodes import join_logical_node

    device, backend = join_logical_node(rank, world, nodes, port, args.device)
    deepspeed.init_distributed(dist_backend=backend)
    wire = WireBytes(Topology.uniform(nodes, world // nodes).node_of_gpu.tolist())
    wire.install()
    try:
        results = []
        for variant in args.variants:
            torch.manual_seed(args.seed)
            results.append(train_variant(variant, world, plans, args, device, wire))
            if rank == 0:
                r = results[-1]
                print(f"{variant:20s} {r['median_step_ms']:9.1f} ms/step  cross-node {r['cross_node_bytes_per_step'] / 1e6:8.2f} MB"
                      f"  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}", flush=True)
        if rank == 0:
            Path(result_file).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_plans(args, nodes: int, per_node: int, folder: Path) -> dict[str, str]:
    """Profile the model's routing on held-out text; the GRACE plan (replicas) and the contiguous one."""
    from grace_ds.examples.corpus import stdlib_bytes
    from grace_ds.planners import make_plan
    from grace_ds.profiling import profile_model

    profile = profile_model(load_model().eval(), stdlib_bytes("heldout"), args.sequence_length, 8, args.profile_tokens)
    topology = Topology.uniform(nodes, per_node)
    paths = {}
    for policy, replicas in (("grace", args.replica_slots), ("contiguous", 0)):
        paths[policy] = str(folder / f"plan_{policy}.json")
        make_plan(policy, profile, topology, replica_slots=replicas).save(paths[policy])
    return paths


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options the training benchmarks share: the layout, the device, the batches and the optimizer."""
    p.add_argument("--nodes", type=int, default=2, help="logical nodes")
    p.add_argument("--gpus-per-node", type=int, default=2, help="ranks per logical node")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sequences-per-rank", type=int, default=2, help="sequences in a rank's micro-batch")
    p.add_argument("--sequence-length", type=int, default=64, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="DeepSpeed gradient clipping (global norm)")
    # ZeRO 1-2 clip DeepSpeed's MoE by the exact global norm; without ZeRO its fp32 clipping averages the ranks'
    # own norms (grace_ds.deepspeed.initialize clips by the exact norm there too, so the runs would part).
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage")
    p.add_argument("--replica-slots", type=int, default=1, help="replica slots per GPU and layer in the GRACE plan")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")


def world_of(p: argparse.ArgumentParser, args) -> int:
    """The number of ranks, refused (p.error) when --device cuda has fewer GPUs."""
    world = args.nodes * args.gpus_per_node
    if args.device == "cuda" and torch.cuda.device_count() < world:
        p.error(f"{world} ranks need {world} GPUs, {torch.cuda.device_count()} visible")
    return world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for bench_training.json and loss_curves.png")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median step time")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    add_run_arguments(p)
    p.add_argument("--aux", type=float, default=0.01, help="weight of DeepSpeed's gate l_aux in the loss")
    p.add_argument("--profile-tokens", type=int, default=16384, help="held-out tokens profiled for the plans")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    world = world_of(p, args)
    from grace_ds.logical_nodes import free_port

    args.out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"profiling the embedded model's routing ({args.profile_tokens} held-out tokens), planning "
              f"{args.nodes} x {args.gpus_per_node}", flush=True)
        plans = make_plans(args, args.nodes, args.gpus_per_node, Path(tmp))
        result_file = str(Path(tmp, "results.json"))
        mp.spawn(worker, args=(world, args.nodes, free_port(), args, plans, result_file), nprocs=world, join=True)
        results = json.loads(Path(result_file).read_text())
    by_name = {r["variant"]: r for r in results}
    for r in results:
        reference = by_name.get(REFERENCE.get(r["variant"], ""))
        if reference is not None:
            r["compared_with"] = reference["variant"]
            r["max_loss_difference"] = max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
            r["parting_step"] = parting_step(r["losses"], reference["losses"])
    report = {"setting": {**run_record(args.device),
                          "ranks": world, "nodes": args.nodes, "steps": args.steps,
                          "tokens_per_rank_per_step": args.sequences_per_rank * args.sequence_length,
                          "lr": args.lr, "clip": args.clip, "zero_stage": args.zero_stage,
                          "replica_slots": args.replica_slots, "seconds": round(time.time() - started, 1),
                          # other work on the machine slows the emulated ranks (times only, not bytes or loads)
                          "load_average_1min_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]},
              "results": results}
    (args.out / "bench_training.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "loss_curves.png")
    print_table(results)
    print(f"\n-> {args.out / 'bench_training.json'}, {args.out / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
