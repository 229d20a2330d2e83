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
import dataclasses
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model  # noqa: E402
from bench_layers import (GraceLayer, LayerShape, Stopwatch, autoep_layer, deepspeed_layer, host_tail_ms,  # noqa: E402
                          keep, megatron_layer, pairs_traffic, release, replay_bias, round_robin, slowest_rank,
                          summed, timed)
from grace_ds.dispatch import Traffic  # noqa: E402
from grace_ds.exchange import CommunicationConfig  # noqa: E402
from grace_ds.layer import GraceRuntime  # noqa: E402
from grace_ds.logical_nodes import free_port, join_logical_node  # noqa: E402
from grace_ds.node_groups import make_node_group  # noqa: E402
from grace_ds.plan import PlacementPlan  # noqa: E402
from grace_ds.planners import make_plan  # noqa: E402
from grace_ds.profile import RoutingProfile  # noqa: E402
from grace_ds.simulate import CostSettings, simulate_trace, with_host_overlap  # noqa: E402
from grace_ds.topology import LinkModel, Topology  # noqa: E402
from grace_ds.trace import RoutingTrace  # noqa: E402

# The paper's three models' MoE layers (bf16). DeepSeek-V2-Lite's two shared experts run as one
# SwiGLU of twice the width, beside the routed ones, in every variant alike.
SHAPES = {
    "olmoe": LayerShape("olmoe", 2048, 1024, 64, 8),
    "qwen3": LayerShape("qwen3", 2048, 768, 128, 8),
    "dsv2lite": LayerShape("dsv2lite", 2048, 1408, 64, 6, shared_inter=2 * 1408),
}
TINY_SHAPES = {name: LayerShape(name, 64, 32, s.num_experts, s.top_k, s.shared_inter and 64)
               for name, s in SHAPES.items()}
# Which recorded routing each shape replays (file, layer index in it, how ids are mapped).
REPLAYS = {
    "olmoe": [("olmoe_arxiv.safetensors", 1, "as-is"), ("embedded_heldout.safetensors", 2, "as-is")],
    "qwen3": [("olmoe_wikipedia.safetensors", 1, "split-2")],
    "dsv2lite": [("olmoe_arxiv.safetensors", 2, "first-6")],
}
# Tokens in the whole job per forward: prefill 256 x 128 = 512 x 64 = 32768 tokens reach a MoE layer
# alike; decode steps of 256 and 512 sequences.
BATCHES = {"prefill-32768": 32768, "decode-256": 256, "decode-512": 512}
POLICIES = ("contiguous", "eplb", "uniform-affinity", "grace")
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
HAVE_AUTOEP = importlib.util.find_spec("deepspeed.module_inject.auto_ep") is not None  # DeepSpeed >= 0.19
E2E_TRACE = "olmoe_arxiv.safetensors"


def map_ids(ids: torch.Tensor, mapping: str) -> torch.Tensor:
    """ids [T, k] of a 64-expert trace -> the shape's experts.
    split-2: expert e becomes 2e or 2e+1 by a hash of (token, e): 128 experts keeping the trace's skew
             and co-activation structure (no recorded 128-expert trace exists in ../shared/data);
    first-6: the first 6 of the 8 recorded experts (top-6)."""
    if mapping == "as-is":
        return ids
    if mapping == "first-6":
        return ids[:, :6]
    if mapping == "split-2":
        token = torch.arange(ids.shape[0]).view(-1, 1)
        half = ((token * 2654435761 + ids * 40503) >> 11) & 1
        return 2 * ids + half
    raise ValueError(mapping)


def prepare(args, topology: Topology, work: Path) -> list[dict]:
    """Plans (from the first half of each trace) and replayed ids (second half) for every case."""
    shapes = TINY_SHAPES if args.tiny else SHAPES
    cases = []
    for name in args.shapes:
        shape = shapes[name]
        for file, layer, mapping in REPLAYS[name]:
            path = Path(args.traces, file)
            if not path.is_file():
                print(f"skipping {name} x {file}: {path} not found", flush=True)
                continue
            trace = RoutingTrace.load(path)
            ids = map_ids(trace.topk_ids[:, layer].long(), mapping)
            half = ids.shape[0] // 2
            profile = RoutingProfile.from_topk_ids(ids[:half, None, :], shape.num_experts, model_name=file)
            case = f"{name}/{Path(file).stem}/L{layer}"
            plan_files = {}
            for policy in POLICIES:
                plan = make_plan(policy, profile, topology, args.replica_slots)
                plan_files[policy] = str(work / f"{case.replace('/', '_')}_{policy}.json")
                plan.save(plan_files[policy])
            replay_file = work / f"{case.replace('/', '_')}_replay.pt"
            torch.save(ids[half:].to(torch.int32).contiguous(), replay_file)
            cases.append({"case": case, "shape": name, "trace": file, "trace_layer": layer, "mapping": mapping,
                          "plans": plan_files, "replay": str(replay_file)})
            print(f"prepared {case}: plans {', '.join(POLICIES)}", flush=True)
    return cases


def prepare_model(args, topology: Topology, work: Path) -> dict | None:
    """Plans for the end-to-end model from the first half of the OLMoE arxiv trace (trace layer l for
    model layer l), and the second half to replay."""
    path = Path(args.traces, E2E_TRACE)
    if not args.e2e or not path.is_file():
        return None
    ids = RoutingTrace.load(path).topk_ids[:, :bench_model.LAYERS].long()
    half = ids.shape[0] // 2
    profile = RoutingProfile.from_topk_ids(ids[:half], 64, model_name=E2E_TRACE)
    plans = {}
    for policy in POLICIES:
        plans[policy] = str(work / f"model_{policy}.json")
        make_plan(policy, profile, topology, args.replica_slots).save(plans[policy])
    replay = work / "model_replay.pt"
    torch.save(ids[half:].to(torch.int32).contiguous(), replay)
    return {"plans": plans, "replay": str(replay), "trace": E2E_TRACE}


# ---- inside every rank -------------------------------------------------------------------------------

def measure_links(topology: Topology, rank: int, device: torch.device, dtype: torch.dtype, big_bytes: int) -> dict:
    """Cross-node (and same-node) all-to-all throughput and latency; bf16 GEMM rate. Same-node also over
    a process group of the node alone (`intra_node_group_*`): every collective over the world group
    touches the other nodes' ranks too, which a same-node exchange can avoid."""
    world = topology.num_gpus
    node = topology.node_of_gpu.tolist()
    out = {}

    def exchange(per_peer_bytes: int, same_node: bool, repeats: int, group=None) -> tuple[float, float]:
        """(median, best) ms of an all-to-all sending per_peer_bytes to every peer on the same node
        (same_node) or on the other nodes; over `group` (this node's ranks) when given."""
        rows = max(per_peer_bytes // 2, 1)
        members = [p for p in range(world) if group is None or node[p] == node[rank]]
        splits = [rows if (node[p] == node[rank]) == same_node and p != rank else 0 for p in members]
        send = torch.ones(sum(splits), dtype=dtype, device=device)
        buf = torch.empty(sum(splits), dtype=dtype, device=device)  # symmetric: receive what is sent
        watch = Stopwatch(device)
        for _ in range(repeats + 2):
            dist.barrier()
            started = watch.start()
            dist.all_to_all_single(buf, send, splits, splits, group=group)
            watch.stop(started)
        times = slowest_rank(watch.milliseconds()[2:], device)
        return statistics.median(times), min(times)

    if topology.num_nodes > 1:
        ms, best_ms = exchange(big_bytes, False, 5)
        # Bytes leaving one node per second: its GPUs' sends to every GPU of other nodes (all nodes
        # send at once, as in a dispatch). The median feeds the cost model, the best the floor.
        node_out = big_bytes * sum(1 for p in range(world) if node[p] != node[rank]) * topology.gpus_per_node[node[rank]]
        out["inter_node_GBps"] = node_out / (ms * 1e-3) / 1e9
        out["inter_node_peak_GBps"] = node_out / (best_ms * 1e-3) / 1e9
        out["inter_node_latency_us"] = exchange(1024, False, 20)[0] * 1e3
    if max(topology.gpus_per_node) > 1:
        ms = exchange(big_bytes, True, 5)[0]
        peers = sum(1 for p in range(world) if node[p] == node[rank] and p != rank)
        out["intra_node_GBps"] = big_bytes * max(peers, 1) / (ms * 1e-3) / 1e9
        out["intra_node_latency_us"] = exchange(1024, True, 20)[0] * 1e3
        if topology.num_nodes > 1:  # the group the runtime's node_groups use
            mine = make_node_group(topology, rank).group
            out["intra_node_group_GBps"] = big_bytes * max(peers, 1) / (exchange(big_bytes, True, 5, mine)[0] * 1e-3) / 1e9
            out["intra_node_group_latency_us"] = exchange(1024, True, 20, mine)[0] * 1e3
    # bf16 GEMM rate at an expert's shape: [tokens, H] x [H, 2I]. A CPU run only smoke-tests the path, and a CPU
    # without bf16 matrix units (no AMX / AVX512-BF16) takes minutes for one product at the GPU shape.
    tokens, hidden = (8192, 2048) if device.type == "cuda" else (256, 256)
    a = torch.randn(tokens, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, hidden, dtype=dtype, device=device)
    watch = Stopwatch(device)
    for _ in range(12):
        started = watch.start()
        a @ b
        watch.stop(started)
    ms = statistics.median(watch.milliseconds()[2:])
    out["gemm_tflops"] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / (ms * 1e-3) / 1e12
    # Every rank uses the same (slowest) figures.
    keys = sorted(out)
    values = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return dict(zip(keys, values.tolist()))


FIXED_COST_BATCH = "fixed-cost"


def fixed_cost_ids(shape: LayerShape) -> torch.Tensor:
    """[ceil(E / k), k] top-k ids of a GPU's fixed-cost batch: token t picks experts t*k .. t*k + k - 1
    (mod E), so every expert gets a pair and no token picks one twice."""
    tokens = -(-shape.num_experts // shape.top_k)
    return (torch.arange(tokens).view(-1, 1) * shape.top_k + torch.arange(shape.top_k)) % shape.num_experts


def run_case(case: dict, args, topology: Topology, rank: int, device: torch.device,
             dtype: torch.dtype) -> tuple[list[dict], dict[str, float]]:
    """(a record per variant and batch, the case's fixed costs for the cost model)."""
    shape = (TINY_SHAPES if args.tiny else SHAPES)[case["shape"]]
    world = topology.num_gpus
    replay = torch.load(case["replay"], weights_only=True).long()
    in_node_stages = topology.num_nodes > 1 and max(topology.gpus_per_node) > 1
    modes = ["flat", "hierarchical"] if in_node_stages else ["flat"]
    modes += ["gather"] if world > 1 else []  # timed on decode batches only: it gathers every token everywhere
    # The same exchanges with their in-node stages over a process group of each node (grace_ds.node_groups).
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


TAIL_FORWARDS = 9
# Recorded with each run: the hierarchical exchange's split sizes, all sent before any row (runs without
# it: hop 2's waited for hop 1's rows, which the cost model then counts as waited for).
HIERARCHICAL_SPLIT_SIZES = "hop 2's with hop 1's"
NODE_GROUPS = "-node-groups"  # a mode's suffix: its in-node stages over a process group of each node
FIXED_COST_NAMES = {"deepspeed-native": "deepspeed", "megatron-alltoall": "megatron", "deepspeed-autoep": "autoep",
                    "grace-layer/contiguous/flat": "layer", "grace-layer/contiguous/hierarchical": "hierarchical",
                    "grace-layer/contiguous/gather": "gather", "grace-layer/contiguous/gather-ring": "gather_ring",
                    f"grace-layer/contiguous/hierarchical{NODE_GROUPS}": "hierarchical_node_groups",
                    f"grace-layer/contiguous/gather{NODE_GROUPS}": "gather_node_groups"}


def base_mode(mode: str | None) -> str | None:
    """The runtime's communication mode of a benchmark mode (gather-ring, *-node-groups); None for the
    baselines."""
    return mode and mode.removesuffix(NODE_GROUPS).removesuffix("-ring")


def fixed_costs(fixed_us: dict[str, float], tails_us: dict[str, float] | None = None) -> dict[str, float]:
    """The cost model's fixed terms (LinkModel names) from the fixed-cost batch's times by variant:
    `<name>_overhead_us` the layer time, `<name>_host_tail_us` its host time after the last wait for
    the device (hierarchical: its own; its overhead is what the second hop adds to flat's)."""
    hierarchical, flat = "grace-layer/contiguous/hierarchical", "grace-layer/contiguous/flat"
    out = {f"{FIXED_COST_NAMES[v]}_overhead_us": t for v, t in fixed_us.items()
           if v in FIXED_COST_NAMES and not v.startswith(hierarchical)}
    out |= {f"{FIXED_COST_NAMES[v]}_host_tail_us": t for v, t in (tails_us or {}).items() if v in FIXED_COST_NAMES}
    for suffix in ("", NODE_GROUPS):  # what the second hop adds
        if hierarchical + suffix in fixed_us and flat in fixed_us:
            out[f"hop{suffix.replace('-', '_')}_overhead_us"] = max(fixed_us[hierarchical + suffix] - fixed_us[flat], 0.0)
    return out


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
        return runtime.gather_graphs.replays if runtime is not None and runtime.gather_graphs else 0

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
    """Bytes this rank sends in DeepSpeed's dispatch and combine: [E/W, C, H] to every other rank each way."""
    world = topology.num_gpus
    node = topology.node_of_gpu.tolist()
    block = shape.num_experts // world * capacity * shape.hidden * torch.finfo(dtype).bits // 8
    cross = sum(2 * block for p in range(world) if node[p] != node[rank])
    intra = sum(2 * block for p in range(world) if node[p] == node[rank] and p != rank)
    return [float(cross), float(intra)]


def worker(rank: int, world: int, args, cases: list[dict], model_case: dict | None, port: int,
           result_file: str) -> None:
    nodes = args.nodes
    per_node = world // nodes
    device, backend = join_logical_node(rank, world, nodes, port, args.device)
    dtype = torch.bfloat16
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    if HAVE_MEGATRON and device.type == "cpu":
        from patches import megatron_core_cpu

        megatron_core_cpu.apply()  # the CPU smoke run only: megatron-core calls CUDA directly
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


# ---- after the run: model, floor, table -------------------------------------------------------------

# The cost model's figure -> what a run measured for the runtime with node groups.
NODE_GROUP_FIGURES = {"hop_overhead_us": "hop_node_groups_overhead_us",
                      "hierarchical_host_tail_us": "hierarchical_node_groups_host_tail_us",
                      "gather_overhead_us": "gather_node_groups_overhead_us",
                      "fanout_bandwidth_GBps": "intra_node_group_GBps"}


def calibrated_links(links: dict, node_groups: bool = False) -> LinkModel:
    """The cost model's figures from a run's measurements; node_groups: those of the runtime whose in-node
    stages run over node groups (their fixed costs, the node group's same-node rate for those stages)."""
    defaults = LinkModel()
    if node_groups:
        links = {**links, **{name: links[measured] for name, measured in NODE_GROUP_FIGURES.items() if measured in links}}
    return LinkModel(
        intra_node_bandwidth_GBps=links.get("intra_node_GBps", defaults.intra_node_bandwidth_GBps),
        inter_node_bandwidth_Gbps=links.get("inter_node_GBps", defaults.inter_node_bandwidth_Gbps / 8) * 8,
        intra_node_latency_us=links.get("intra_node_latency_us", defaults.intra_node_latency_us),
        inter_node_latency_us=links.get("inter_node_latency_us", defaults.inter_node_latency_us),
        expert_tflops=links["gemm_tflops"],
        **{name: links.get(name, 0.0) for name in ("layer_overhead_us", "hop_overhead_us", "gather_overhead_us",
                                                    "layer_host_tail_us", "hierarchical_host_tail_us",
                                                    "fanout_bandwidth_GBps")})


def add_model_and_floor(report: dict, cases: list[dict], topology: Topology, args) -> None:
    """modeled_ms: the simulator with the measured figures (DeepSpeed: the same alpha-beta terms on its
    capacity-padded exchange and padded expert rows). floor_ms: cross-node bytes through one node's
    link at the best measured rate (dispatch, then combine) + the busiest GPU's expert FLOPs. Each case
    takes the fixed costs measured in its own rounds (runs before 2026-11-28: the run's, in links)."""
    links = calibrated_links(report["links"])
    case_figures = {case: {**report["links"], **fixed} for case, fixed in report.get("fixed_costs", {}).items()}
    case_links = {(case, groups): calibrated_links(figures, groups) for case, figures in case_figures.items()
                  for groups in (False, True)}
    shapes = TINY_SHAPES if args.tiny else SHAPES
    replays = {c["case"]: torch.load(c["replay"], weights_only=True).long() for c in cases}
    plans = {(c["case"], p): PlacementPlan.load(f) for c in cases for p, f in c["plans"].items()}
    inter_Bpus = links.inter_node_bandwidth_Gbps * 1e3 / 8
    peak_Bpus = report["links"].get("inter_node_peak_GBps", links.inter_node_bandwidth_Gbps / 8) * 1e3
    flops_rate = links.expert_tflops * 1e6  # flop per microsecond
    simulated: dict[tuple, object] = {}
    for r in report["results"]:
        figures = case_figures.get(r["case"], report["links"])
        node_groups = (r["mode"] or "").endswith(NODE_GROUPS)
        calibrated = Topology(topology.gpus_per_node, case_links.get((r["case"], node_groups), links))
        shape = shapes[r["shape"]]
        flops_per_pair = 6.0 * shape.hidden * shape.inter
        ids = replays[r["case"]][:r["tokens"]]
        world = topology.num_gpus
        node_bytes = r["cross_node_bytes"] / max(topology.num_nodes, 1)  # through one node's link, both phases
        if r["policy"] is not None:
            key = (r["case"], r["policy"], r["tokens"], node_groups)  # every mode's time out of one simulation
            if key not in simulated:
                plan = dataclasses.replace(plans[(r["case"], r["policy"])], topology=calibrated)
                waits = report["setting"].get("hierarchical_split_sizes") != HIERARCHICAL_SPLIT_SIZES
                cost = CostSettings(shape.hidden, shape.inter, 2, hierarchical_waits_for_first_stage=waits)
                simulated[key] = simulate_trace(plan, ids[:, None, :], "tar", cost)[0]
            metrics = simulated[key]
            r["modeled_ms"] = {"hierarchical": metrics.modeled_layer_time_us, "flat": metrics.modeled_layer_time_us_flat,
                               "gather": metrics.modeled_layer_time_us_gather}[base_mode(r["mode"])] / 1e3
            max_pairs = max(r["pairs_per_gpu"])
        else:  # the same alpha-beta terms over what DeepSpeed, megatron or AutoEP move and compute
            name = FIXED_COST_NAMES[r["variant"]]
            if r["variant"] == "deepspeed-native":  # every rank computes E/W experts x W ranks x C padded rows
                max_pairs = shape.num_experts // world * world * r["capacity"]
            else:  # one copy per (token, expert) pair, experts in contiguous blocks
                max_pairs = max(r["pairs_per_gpu"])
            overhead = figures.get(f"{name}_overhead_us", 0.0)
            # The fixed cost, when measured, holds the collectives' start-ups (as in the simulator).
            alpha = 0.0 if overhead > 0 else 2 * links.inter_node_latency_us
            exchange = node_bytes / inter_Bpus + alpha if topology.num_nodes > 1 else 0.0
            # Each waits for the device once, for split sizes or capacity, before any row moves.
            r["modeled_ms"] = with_host_overlap(overhead, figures.get(f"{name}_host_tail_us", 0.0), 0.0,
                                                exchange + max_pairs * flops_per_pair / flops_rate) / 1e3
        r["floor_ms"] = (node_bytes / peak_Bpus + max_pairs * flops_per_pair / flops_rate) / 1e3
        r["achieved_cross_node_GBps"] = node_bytes / (r["median_ms"] * 1e-3) / 1e9 if r["median_ms"] else 0.0
        r["model_error"] = r["modeled_ms"] / r["median_ms"] - 1


def print_table(report: dict) -> None:
    print(f"\n{'case':<38} {'batch':<14} {'variant':<34} {'ms':>9} {'model':>9} {'floor':>9} {'xnode MB':>9}")
    for r in report["results"]:
        print(f"{r['case']:<38} {r['batch']:<14} {r['variant']:<34} {r['median_ms']:9.3f} {r['modeled_ms']:9.3f} "
              f"{r['floor_ms']:9.3f} {r['cross_node_bytes'] / 1e6:9.1f}")




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/routing",
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
            add_model_and_floor(report, prepare(args, topology, Path(tmp)), topology, args)
            (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=1))
            print_table(report)
            return
        cases = [] if args.model_only else prepare(args, topology, Path(tmp))
        model_case = prepare_model(args, topology, Path(tmp))
        result_file = str(Path(tmp, "results.json"))
        mp.spawn(worker, args=(world, args, cases, model_case, free_port(), result_file), nprocs=world, join=True)
        report = json.loads(Path(result_file).read_text())
        report["setting"] = {"date": time.strftime("%Y-%m-%d"), "ranks": world, "nodes": args.nodes,
                             "gpus_per_node": world // args.nodes,
                             "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                             "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
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
