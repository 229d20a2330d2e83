"""Online re-planning on real devices: GRACE layers with real expert weights serve a routing stream
that changes domain, with no re-planning (offline), GRACE's bounded online re-planning, and periodic
EPLB rebalancing (SGLang / vLLM style), each through grace_ds.online's replanner (weights really move,
point to point in chunks, and the plan switches at a step boundary).

Per step: every rank serves its share of `--step-tokens` tokens through the trace's layers (routing
replayed from the trace, hidden states random); the step's MoE time is the slowest rank's (CUDA events
on a GPU; median of --repeats passes, the first one observed by the replanner). Every `--check-every`
steps and at each switch the outputs are compared with a dense reference computed from all experts'
weights. Writes one JSON under --out.

    python scripts/bench_online.py --device cuda --nodes 2                    # every GPU, OLMoE shape
    python scripts/bench_online.py --device cpu --world 4 --nodes 2 --small   # gloo smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from grace_ds import faults
from grace_ds.bench.layers import Stopwatch
from grace_ds.bench.online_common import (POLICY_KINDS, add_replanning_options, cycled, first_plan_policy,
                                          online_settings)
from grace_ds.bench.provenance import ROOT, run_record
from grace_ds.experts import SlotExperts
from grace_ds.logical_nodes import free_port, join_logical_node
from grace_ds.online import OnlineReplanner
from grace_ds.plan_agreement import broadcast_plan
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace

POLICIES = ("grace-offline", "grace-online", "eplb-periodic")


def expert_weights(layers: int, experts: int, hidden: int, inter: int, dtype, device) -> list[tuple]:
    """Every layer's fused weights (gate_up [E, 2I, H], down [E, H, I]), the same on every rank."""
    generator = torch.Generator(device=device).manual_seed(1234)
    out = []
    for _ in range(layers):
        gate_up = torch.randn(experts, 2 * inter, hidden, generator=generator, device=device, dtype=torch.float32)
        down = torch.randn(experts, hidden, inter, generator=generator, device=device, dtype=torch.float32)
        out.append(((gate_up / hidden ** 0.5).to(dtype), (down / inter ** 0.5).to(dtype)))
    return out


def dense_reference(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """sum_j w_j * expert_{ids_j}(x) for every token, expert by expert from the full weights (float32)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in ids.unique().tolist():
        token, slot = (ids == expert).nonzero(as_tuple=True)
        gate, up = F.linear(hidden[token].float(), gate_up[expert].float()).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert].float())
        out.index_add_(0, token, y * weights[token, slot].unsqueeze(-1))
    return out


def serve(policy: str, rank: int, world: int, topology: Topology, stream: torch.Tensor, first: torch.Tensor,
          weights: list[tuple], args, device, group, transfer_group) -> dict:
    num_experts = int(max(first.max(), stream.max())) + 1
    plan = None
    if rank == 0:  # one rank plans: threaded BLAS may break ties differently elsewhere
        profile = RoutingProfile.from_topk_ids(first, num_experts)
        plan = make_plan(first_plan_policy(policy), profile, topology, 1)
    plan = broadcast_plan(plan, "initial plan", group)
    runtime = GraceRuntime(plan, rank=rank, group=group, communication=args.mode, device=device)
    for layer, (gate_up, down) in enumerate(weights):
        runtime.slot_modules[layer] = SlotExperts.from_fused(gate_up, down, runtime.local_slots(layer), F.silu)
    replanner = None
    if POLICY_KINDS[policy] is not None:
        settings = online_settings(policy, args, transfer_chunk_bytes=args.chunk_mb << 20)
        replanner = OnlineReplanner(runtime, settings, group, transfer_group)
    per_rank = stream.shape[1] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    generator = torch.Generator(device=device).manual_seed(rank)
    hidden_size = weights[0][0].shape[2]
    step_ms, errors, in_flight = [], {}, []
    watch = Stopwatch(device)
    for step, tokens in enumerate(stream):
        ids = tokens[mine].to(device)
        hidden = torch.randn(per_rank, hidden_size, generator=generator, device=device).to(weights[0][0].dtype)
        mix = torch.softmax(torch.randn(per_rank, ids.shape[-1], generator=generator, device=device), -1)
        in_flight.append(replanner is not None and replanner.pending is not None)
        switched = replanner is not None and step > 0 and any(r.get("switch_step") == step for r in replanner.history)
        passes = []
        observers = runtime.observers
        for attempt in range(args.repeats):  # the first pass is the served one (observed); repeats time it again
            runtime.observers = observers if attempt == 0 else []
            faults.guarded(f"step {step} barrier", group, dist.barrier, group=group)
            started = watch.start()
            with torch.no_grad():
                outs = [runtime.route_and_compute(layer, hidden, ids[:, layer], mix, runtime.slot_modules[layer])
                        for layer in range(ids.shape[1])]
            watch.stop(started)
            passes += watch.milliseconds()
        runtime.observers = observers
        step_ms.append(statistics.median(passes))
        if step % args.check_every == 0 or switched:
            worst = 0.0
            for layer, out in enumerate(outs):
                ref = dense_reference(hidden, ids[:, layer], mix, *weights[layer])
                worst = max(worst, float((out.float() - ref).abs().max() / ref.abs().max()))
            errors[step] = worst
        if replanner is not None:
            replanner.end_step()
    slowest = torch.tensor(step_ms, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    worst = torch.tensor([max(errors.values())], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    history = replanner.history if replanner is not None else []
    if replanner is not None:
        replanner.detach()
    return {"step_ms": slowest.tolist(), "max_relative_error": float(worst), "errors_here": errors,
            "in_flight": in_flight, "history": history}


def worker(rank: int, world: int, args, port: int, result_file: str) -> None:
    device, _ = join_logical_node(rank, world, args.nodes, port, args.device)
    try:
        topology = Topology.uniform(args.nodes, world // args.nodes)
        group = faults.fault_group(args.fault_timeout_s)
        transfer_group = faults.fault_group(args.fault_timeout_s)
        faults.all_reduce(torch.zeros(1, device=device), "set-up", transfer_group)  # NCCL: all ranks first
        traces = Path(args.traces)
        plan_domain = RoutingTrace.load(traces / f"{args.plan_trace}.safetensors").topk_ids.long()
        serve_domain = RoutingTrace.load(traces / f"{args.serve_trace}.safetensors").topk_ids.long()
        half = plan_domain.shape[0] // 2
        first = plan_domain[:half]
        # Longer streams than a trace replay it again (same domain, same routing statistics).
        before = cycled(plan_domain[half:], args.steps_before * args.step_tokens)
        after = cycled(serve_domain, args.steps_after * args.step_tokens)
        tokens = torch.cat([before, after])
        stream = tokens.view(-1, args.step_tokens, *tokens.shape[1:])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        hidden, inter = (64, 32) if args.small else (2048, 1024)
        weights = expert_weights(stream.shape[2], int(max(first.max(), stream.max())) + 1, hidden, inter, dtype, device)
        report = {"settings": {k: v for k, v in vars(args).items()}, "world": world, "drift_step": args.steps_before,
                  "hidden": hidden, "inter": inter, "dtype": str(dtype), "policies": {}}
        if device.type == "cuda":
            report["device"] = torch.cuda.get_device_name(device)
        for policy in POLICIES:
            result = serve(policy, rank, world, topology, stream, first, weights, args, device, group, transfer_group)
            report["policies"][policy] = result
            if rank == 0:
                s = summarize(result, args.steps_before)
                print(f"{policy:<15} before {s['step_ms_before_drift']:.2f} ms, after {s['step_ms_after_drift']:.2f} ms, "
                      f"settled {s['step_ms_settled']:.2f} ms, moved {s['copies_moved']} copies "
                      f"({s['bytes_moved'] / 2**30:.2f} GiB), max error {result['max_relative_error']:.2e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rank == 0:
            for policy, result in report["policies"].items():
                result["summary"] = summarize(result, args.steps_before)
            Path(result_file).write_text(json.dumps(report, indent=1, default=str) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def summarize(result: dict, drift_step: int) -> dict:
    ms = result["step_ms"]
    settle = drift_step + (len(ms) - drift_step) // 2
    moves = [r for r in result["history"] if r.get("moves")]
    return {"step_ms_before_drift": statistics.median(ms[1:drift_step]),
            "step_ms_after_drift": statistics.median(ms[drift_step:]),
            "step_ms_settled": statistics.median(ms[settle:]),
            "step_ms_with_transfer_in_flight": (statistics.median([m for m, f in zip(ms, result["in_flight"]) if f])
                                                if any(result["in_flight"]) else None),
            "replans": len(moves), "copies_moved": sum(r["moves"] for r in moves),
            "bytes_moved": sum(r["bytes_moved"] for r in moves),
            "transfer_s_mean": statistics.mean([r["transfer_s"] for r in moves]) if moves else 0.0,
            "switch_wait_s_mean": statistics.mean([r["transfer_wait_s"] for r in moves]) if moves else 0.0,
            "planning_s_mean": statistics.mean([r.get("planning_s", 0.0) for r in moves]) if moves else 0.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--world", type=int, default=None, help="ranks (default: every GPU)")
    add_replanning_options(parser, step_tokens=2048, window_steps=8, sample_tokens=512)
    parser.add_argument("--traces", default=str(ROOT.parent / "shared" / "data" / "routing"))
    parser.add_argument("--plan-trace", default="olmoe_arxiv")
    parser.add_argument("--serve-trace", default="olmoe_wikipedia")
    parser.add_argument("--steps-before", type=int, default=16, help="steps of the planning domain first")
    parser.add_argument("--steps-after", type=int, default=32, help="steps of the other domain")
    parser.add_argument("--chunk-mb", type=int, default=16)
    parser.add_argument("--check-every", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per step (median kept)")
    parser.add_argument("--fault-timeout-s", type=float, default=300.0)
    parser.add_argument("--small", action="store_true", help="hidden 64, intermediate 32 (smoke runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = parser.parse_args(argv)
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = str(Path(tmp) / "online.json")
        mp.spawn(worker, args=(world, args, free_port(), result_file), nprocs=world, join=True)
        report = json.loads(Path(result_file).read_text())
    report["run"] = run_record(args.device)
    name = f"bench-online-{args.nodes}x{world // args.nodes}.json"
    (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out / name}")
    return report


if __name__ == "__main__":
    main()
