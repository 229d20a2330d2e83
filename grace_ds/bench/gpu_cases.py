"""The GPU benchmark's cases: the shapes, the traces each replays, the batches, the plans built in the parent
(first half of each trace; the second half is replayed), the variants' labels and the fixed-cost batch."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from grace_ds.bench import model as bench_model
from grace_ds.bench.layers import LayerShape
from grace_ds.exchange import CommunicationConfig
from grace_ds.exchange.config import NODE_GROUPS_SUFFIX
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace

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


FIXED_COST_BATCH = "fixed-cost"


def fixed_cost_ids(shape: LayerShape) -> torch.Tensor:
    """[ceil(E / k), k] top-k ids of a GPU's fixed-cost batch: token t picks experts t*k .. t*k + k - 1
    (mod E), so every expert gets a pair and no token picks one twice."""
    tokens = -(-shape.num_experts // shape.top_k)
    return (torch.arange(tokens).view(-1, 1) * shape.top_k + torch.arange(shape.top_k)) % shape.num_experts


TAIL_FORWARDS = 9
# Recorded with each run: the hierarchical exchange's split sizes, all sent before any row (runs without
# it: hop 2's waited for hop 1's rows, which the cost model then counts as waited for).
HIERARCHICAL_SPLIT_SIZES = "hop 2's with hop 1's"
NODE_GROUPS = NODE_GROUPS_SUFFIX  # a variant's suffix: its in-node stages over a process group of each node
FIXED_COST_NAMES = {"deepspeed-native": "deepspeed", "megatron-alltoall": "megatron", "deepspeed-autoep": "autoep",
                    "grace-layer/contiguous/flat": "layer", "grace-layer/contiguous/hierarchical": "hierarchical",
                    "grace-layer/contiguous/gather": "gather", "grace-layer/contiguous/gather-ring": "gather_ring",
                    f"grace-layer/contiguous/hierarchical{NODE_GROUPS}": "hierarchical_node_groups",
                    f"grace-layer/contiguous/gather{NODE_GROUPS}": "gather_node_groups"}


def communication(label: str | None) -> CommunicationConfig | None:
    """The exchange a variant's mode label (flat, gather-ring, hierarchical-node-groups, ...) runs; None for
    the baselines."""
    return CommunicationConfig.from_label(label) if label else None


def base_mode(label: str | None) -> str | None:
    """The runtime's communication mode of a variant's label; None for the baselines."""
    return label and communication(label).mode.value


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

