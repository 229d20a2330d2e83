"""Inside every rank of the GPU benchmark: each case's variants built, run once eagerly (bytes, pairs),
timed round-robin with the fixed-cost batch, and the records filled; the worker that runs them all."""
from __future__ import annotations

import gc
import importlib.util
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from grace_ds import cost
from grace_ds.bench import model as bench_model
from grace_ds.bench.gpu_cases import (BATCHES, FIXED_COST_BATCH, HAVE_AUTOEP, HAVE_MEGATRON, NODE_GROUPS, POLICIES,
                                      SHAPES, TAIL_FORWARDS, TINY_SHAPES, base_mode, fixed_cost_ids, fixed_costs)
from grace_ds.bench.gpu_links import measure_links
from grace_ds.bench.layers import (GraceLayer, LayerShape, Stopwatch, autoep_layer, deepspeed_layer, host_tail_ms,
                                   keep, megatron_layer, release, replay_bias, round_robin, slowest_rank, summed,
                                   timed)
from grace_ds.bench.provenance import ROOT
from grace_ds.exchange import CommunicationConfig
from grace_ds.exchange.traffic import Traffic
from grace_ds.logical_nodes import join_logical_node
from grace_ds.plan import PlacementPlan
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import Topology


def run_case(case: dict, args, topology: Topology, rank: int, device: torch.device,
             dtype: torch.dtype) -> tuple[list[dict], dict[str, float]]:
    """(a record per variant and batch, the case's fixed costs for the cost model)."""
    shape = (TINY_SHAPES if args.tiny else SHAPES)[case["shape"]]
    world = topology.num_gpus
    replay = torch.load(case["replay"], weights_only=True).long()
    in_node_stages = topology.num_nodes > 1 and max(topology.gpus_per_node) > 1
    modes = ["flat", "hierarchical"] if in_node_stages else ["flat"]
    modes += ["gather"] if world > 1 else []  # timed on decode batches only: it gathers every token everywhere
    # The same exchanges with their in-node stages over a process group of each node (grace_ds.exchange.node_groups).
    modes += [f"{m}{NODE_GROUPS}" for m in ("hierarchical", "gather")] if in_node_stages and not args.no_node_groups else []
    variants = [("deepspeed-native", "deepspeed", None)]
    if HAVE_MEGATRON:
        variants.append(("megatron-alltoall", "megatron", None))
    if HAVE_AUTOEP:
        variants.append(("deepspeed-autoep", "autoep", None))
    variants += [(f"grace-layer/{p}/{m}", p, m) for p in POLICIES for m in modes]
    if topology.num_nodes > 1:  # at the fixed-cost batch only: the gather exchange over NCCL's ring, to compare
        variants.append(("grace-layer/contiguous/gather-ring", "contiguous", "gather-ring"))
    if args.variants:
        variants = [v for v in variants if any(v[0].startswith(prefix) for prefix in args.variants)]
    batches = []
    # Each variant's fixed cost, which calibrates the cost model, timed in the same rounds: the fewest
    # tokens that give every expert a pair from every GPU (a loop over experts launches its work then).
    fixed_ids = fixed_cost_ids(shape).to(device)
    torch.manual_seed(2000 + rank)
    batches.append((FIXED_COST_BATCH, fixed_ids.shape[0] * world,
                    torch.randn(fixed_ids.shape[0], shape.hidden, dtype=dtype, device=device), fixed_ids))
    for batch_name, total_tokens in BATCHES.items():
        if args.batches and batch_name not in args.batches:
            continue
        if args.tiny:
            total_tokens = max(total_tokens // 64, 2 * world)
        per_rank = total_tokens // world
        ids = replay[rank * per_rank:(rank + 1) * per_rank].to(device)
        torch.manual_seed(1000 + rank)
        x = torch.randn(per_rank, shape.hidden, dtype=dtype, device=device)
        batches.append((batch_name, per_rank * world, x, ids))
    row_bytes = shape.hidden * torch.finfo(dtype).bits // 8
    together = []
    for variant, kind, mode in variants:
        busy = Stopwatch(device)
        layer, runtime = make_layer(case, shape, kind, mode, topology, rank, device, dtype, busy)
        for batch_name, tokens, x, ids in batches:
            if batch_name == FIXED_COST_BATCH:
                if kind not in ("deepspeed", "megatron", "autoep", "contiguous"):
                    continue
            elif mode == "gather-ring" or (base_mode(mode) == "gather" and not batch_name.startswith("decode")):
                continue
            layer.bias = replay_bias(ids, shape.num_experts)
            record = {"case": case["case"], "shape": shape.name, "batch": batch_name, "tokens": tokens,
                      "variant": variant, "policy": kind if runtime is not None else None, "mode": mode}
            state = untimed_pass(layer, runtime, kind, x, ids, shape, topology, rank, row_bytes, dtype, busy)
            together.append((record, state, layer, runtime, x, busy))
    results = time_together(together, args, world, device)
    # With the fixed cost, the host time after each variant's last wait for the device: launches that
    # overlap the device's work once there is work to overlap (the median forward; slowest rank).
    tails_us = {}
    for record, state, layer, _, x, _ in together:
        if record["batch"] == FIXED_COST_BATCH:
            layer.bias = state["bias"]
            tails = slowest_rank(host_tail_ms(layer, x, TAIL_FORWARDS, device), device)
            tails_us[record["variant"]] = statistics.median(tails) * 1e3
    del together, layer
    release(device)
    fixed = {r["variant"]: r["median_ms"] * 1e3 for r in results if r["batch"] == FIXED_COST_BATCH}
    return [r for r in results if r["batch"] != FIXED_COST_BATCH], fixed_costs(fixed, tails_us)



def untimed_pass(layer, runtime, kind: str, x: torch.Tensor, ids: torch.Tensor, shape: LayerShape, topology: Topology,
                 rank: int, row_bytes: int, dtype: torch.dtype, busy: Stopwatch) -> dict:
    """One eager forward: bytes sent, pairs per GPU, the output, its expert time."""
    world = topology.num_gpus
    eager_out = None
    with torch.no_grad():
        if runtime is not None:
            runtime.traffic[0] = Traffic()
            runtime.measure = True
            eager_out = layer(x)
            runtime.measure = False
            traffic = runtime.traffic[0]
            sent = [traffic.cross_node_bytes, traffic.intra_node_bytes]
            per_gpu = torch.zeros(world, dtype=torch.float64)
            per_gpu[rank] = traffic.pairs_computed
        elif kind == "megatron":
            layer(x)
            routed = layer.routing_map.reshape(ids.shape[0], -1)
            if not torch.equal(routed, replay_bias(ids, shape.num_experts) > 0):
                raise RuntimeError("megatron's router did not take the replayed top-k")
            sent, per_gpu = pairs_traffic(ids, shape.num_experts, topology, rank, row_bytes)
        elif kind == "autoep":  # like megatron: one row per (token, expert) pair, experts in contiguous blocks
            layer(x)
            if not torch.equal(layer.selected_experts.sort(-1).values, ids.sort(-1).values):
                raise RuntimeError("AutoEP's router did not take the replayed top-k")
            sent, per_gpu = pairs_traffic(ids, shape.num_experts, topology, rank, row_bytes)
        else:
            layer(x)
            sent = deepspeed_traffic(layer.capacity, shape, topology, rank, dtype)
            per_gpu = torch.zeros(world, dtype=torch.float64)
    return {"sent": sent, "per_gpu": per_gpu, "eager_out": eager_out, "busy_ms": sum(busy.milliseconds()),
            "bias": layer.bias}


def time_together(together: list[tuple], args, world: int, device: torch.device) -> list[dict]:
    """Times the (record, state, layer, runtime, x, busy) entries round-robin (bench_layers.round_robin),
    then finishes them; warm-up forwards count in the busy time, not the median."""
    if not together:
        return []
    times: list[list[float]] = [[] for _ in together]
    forwards = [0] * len(together)
    busy_ms = [0.0] * len(together)
    replayed = [0] * len(together)  # graph replays in each entry's own forwards (a runtime serves several)

    def replays(runtime) -> int:
        return runtime.exchange.graphs.replays if runtime is not None and runtime.exchange.graphs else 0

    def run(i: int, iters: int, warmup: int) -> None:
        _, state, layer, runtime, x, busy = together[i]
        layer.bias = state["bias"]
        before = replays(runtime)
        times[i] += slowest_rank(timed(layer, x, iters, warmup, device), device)
        replayed[i] += replays(runtime) - before
        busy_ms[i] += sum(busy.milliseconds())
        forwards[i] += iters + warmup

    round_robin(len(together), args.iters, args.warmup, run)
    results = []
    for i, (record, state, layer, runtime, x, _) in enumerate(together):
        layer.bias = state["bias"]
        finish(results, record, state, times[i], busy_ms[i] / forwards[i], replayed[i] > 0, layer, runtime, x, world,
               device)
    return results


def finish(results: list[dict], record: dict, state: dict, times: list[float], busy_per_iter: float, graphed: bool,
           layer, runtime, x: torch.Tensor, world: int, device: torch.device) -> None:
    """Fills a record from its timed forwards and keeps it (every rank takes part: collectives); `graphed`:
    its forwards replayed CUDA graphs."""
    graph_error = None
    if graphed:  # replayed graphs record no events: the eager pass's expert time stands for them
        busy_per_iter = state["busy_ms"]
        with torch.no_grad():
            replayed = layer(x).float()
        eager_out = state["eager_out"].float()
        graph_error = float((replayed - eager_out).abs().max() / eager_out.abs().max())
    busy_all = torch.tensor([busy_per_iter], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(busy_all) for _ in range(world)]
    dist.all_gather(gathered, busy_all)
    totals = summed(state["sent"] + state["per_gpu"].tolist(), device)
    median = statistics.median(times)
    kind = record["policy"] or ("deepspeed" if record["variant"] == "deepspeed-native" else "pairs")
    record.update({
        "median_ms": median, "p10_ms": sorted(times)[len(times) // 10], "iters": len(times),
        "cross_node_bytes": totals[0], "intra_node_bytes": totals[1],
        "pairs_per_gpu": totals[2:] if kind != "deepspeed" else None,
        "gpu_busy_ms": [float(g) for g in torch.cat(gathered).tolist()],
        "capacity": layer.capacity if kind == "deepspeed" else None, "cuda_graph": graphed,
        "graph_vs_eager_error": graph_error,
    })
    record["idle_fraction"] = [max(0.0, 1 - b / median) for b in record["gpu_busy_ms"]]
    keep(results, record, dist.get_rank(), f"{record['case']:<40} {record['batch']:<14} {record['variant']}")


def make_layer(case: dict, shape: LayerShape, kind: str, mode: str | None, topology: Topology, rank: int,
               device: torch.device, dtype: torch.dtype, busy: Stopwatch):
    """(layer, GRACE runtime or None): DeepSpeed's native MoE, megatron-core's, or the GRACE layer
    under the plan of policy `kind`."""
    torch.manual_seed(7)
    if kind == "deepspeed":
        return deepspeed_layer(shape, topology.num_gpus, device, dtype, busy).eval(), None
    if kind == "megatron":
        return megatron_layer(shape, topology.num_gpus, device, dtype, busy).eval(), None
    if kind == "autoep":
        return autoep_layer(shape, topology.num_gpus, device, dtype, busy).eval(), None
    # gather-ring: the gather exchange over NCCL's ring all-gather / reduce-scatter instead of by node
    runtime = GraceRuntime(PlacementPlan.load(case["plans"][kind]), rank=rank,
                           communication=CommunicationConfig.from_label(mode), device=device)
    return GraceLayer(shape, runtime, device, dtype, busy).to(device).eval(), runtime


def profile_layer(case: dict, args, topology: Topology, rank: int, device: torch.device, dtype: torch.dtype) -> None:
    """torch.profiler over forwards of the GRACE layer (grace plan) in args.profile's exchange and batch
    ("flat:decode-256": 10 forwards; a prefill batch: 3): where the time goes. Rank 0 writes the op table
    (by self CPU time, then by device time) to profile_<exchange>_<batch>.txt and, on a GPU, the timeline
    (chrome://tracing, Perfetto) to profile_<exchange>_<batch>.json."""
    from torch.profiler import ProfilerActivity, profile

    mode, batch = args.profile.split(":")
    shape = (TINY_SHAPES if args.tiny else SHAPES)[case["shape"]]
    replay = torch.load(case["replay"], weights_only=True).long()
    per_rank = max(BATCHES[batch] // topology.num_gpus // (64 if args.tiny else 1), 1)
    ids = replay[rank * per_rank:(rank + 1) * per_rank].to(device)
    x = torch.randn(per_rank, shape.hidden, dtype=dtype, device=device)
    layer, _ = make_layer(case, shape, "grace", mode, topology, rank, device, dtype, Stopwatch(device))
    layer.bias = replay_bias(ids, shape.num_experts)
    timed(layer, x, 5, 5, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        for _ in range(3 if batch.startswith("prefill") else 10):
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if rank == 0:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        if device.type == "cuda":
            table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
            prof.export_chrome_trace(str(Path(args.out, f"profile_{mode}_{batch}.json")))
        Path(args.out, f"profile_{mode}_{batch}.txt").write_text(table)
    del layer
    release(device)


def deepspeed_traffic(capacity: int, shape: LayerShape, topology: Topology, rank: int, dtype: torch.dtype) -> list[float]:
    """[cross-node, intra-node] bytes this rank sends in DeepSpeed's dispatch and combine: [E/W, C, H] to
    every other rank each way."""
    rows = cost.capacity_rows_per_link(shape.num_experts, capacity, topology.num_gpus)[rank]
    row_bytes = shape.hidden * torch.finfo(dtype).bits // 8
    intra, cross = cost.split_by_node((2 * row_bytes * rows).tolist(), rank, topology.node_of_gpu.tolist())
    return [float(cross), float(intra)]


def pairs_traffic(topk_ids: torch.Tensor, num_experts: int, topology: Topology, rank: int,
                  row_bytes: int) -> tuple[list[float], torch.Tensor]:
    """A dispatcher that sends one copy per (token, expert) pair (megatron's alltoall, AutoEP) with experts
    in contiguous blocks: ([cross-node, intra-node] bytes this rank sends, dispatch and combine), pairs
    per GPU [P] of this rank's tokens."""
    world = topology.num_gpus
    dest = topk_ids.long().cpu() * world // num_experts
    rows = cost.pair_rows_per_link(dest, torch.full((dest.shape[0],), rank), world)[rank]
    intra, cross = cost.split_by_node((2 * row_bytes * rows).tolist(), rank, topology.node_of_gpu.tolist())
    return [float(cross), float(intra)], cost.pairs_per_gpu(dest, world)


def megatron_cpu_patch():
    """The checkout's patches/megatron_core_cpu.py, loaded from its file: it is test-only and not part of the
    installed package, and a script's children do not see the checkout's root as an import path."""
    spec = importlib.util.spec_from_file_location("patches.megatron_core_cpu", ROOT / "patches" / "megatron_core_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(rank: int, world: int, args, cases: list[dict], model_case: dict | None, port: int,
           result_file: str) -> None:
    nodes = args.nodes
    per_node = world // nodes
    device, backend = join_logical_node(rank, world, nodes, port, args.device)
    dtype = torch.bfloat16
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    if HAVE_MEGATRON and device.type == "cpu":
        megatron_cpu_patch().apply()  # the CPU smoke run only: megatron-core calls CUDA directly
    try:
        topology = Topology.uniform(nodes, per_node)
        links = measure_links(topology, rank, device, dtype, args.link_bytes)
        if rank == 0:
            print(f"measured: {json.dumps(links)}", flush=True)
        if args.profile:
            profile_layer(cases[0], args, topology, rank, device, dtype)
        results, fixed = [], {}
        for case in cases if not args.profile else []:
            case_results, fixed[case["case"]] = run_case(case, args, topology, rank, device, dtype)
            results += case_results
            if rank == 0:  # what is measured so far survives a run cut short by its time limit
                print(f"fixed costs of {case['case']}: {json.dumps(fixed[case['case']])}", flush=True)
                (args.out / "bench_gpu_partial.json").write_text(json.dumps({"links": links, "fixed_costs": fixed,
                                                                             "results": results}))
        if fixed:  # the first case's stand for the run (predict_layout reads them here)
            links.update(next(iter(fixed.values())))
        model_results = []
        if model_case is not None and not args.profile:
            replay = torch.load(model_case["replay"], weights_only=True).long()
            model_results = bench_model.run_model(model_case["plans"], replay, args, rank, world, device, dtype)
        if rank == 0:
            Path(result_file).write_text(json.dumps({"links": links, "fixed_costs": fixed, "results": results,
                                                     "model": model_results,
                                                     "model_trace": model_case and model_case["trace"]}))
        dist.barrier()
    finally:
        gc.collect()  # layers, runtimes and their CUDA graphs go before the communicators they use
        dist.destroy_process_group()

