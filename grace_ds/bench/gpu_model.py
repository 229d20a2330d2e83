"""After a GPU benchmark run: each record's modeled time (grace_ds.cost with the run's measured figures) and
floor, and the printed table. Also what `--remodel` redoes on a run's measured JSON."""
from __future__ import annotations

import dataclasses

import torch

from grace_ds import cost
from grace_ds.bench.gpu_cases import (FIXED_COST_NAMES, HIERARCHICAL_SPLIT_SIZES, SHAPES, TINY_SHAPES, base_mode,
                                      communication)
from grace_ds.plan import PlacementPlan
from grace_ds.simulate import simulate_trace
from grace_ds.topology import LinkModel, Topology


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
    """modeled_ms: grace_ds.cost with the measured figures, through the simulator for the GRACE layer
    (DeepSpeed, megatron, AutoEP: cost.baseline_layer_us on their exchange and expert rows). floor_ms: cross-node bytes through one node's
    link at the best measured rate (dispatch, then combine) + the busiest GPU's expert FLOPs. Each case
    takes the fixed costs measured in its own rounds (runs before 2026-11-28: the run's, in links)."""
    links = calibrated_links(report["links"])
    case_figures = {case: {**report["links"], **fixed} for case, fixed in report.get("fixed_costs", {}).items()}
    case_links = {(case, groups): calibrated_links(figures, groups) for case, figures in case_figures.items()
                  for groups in (False, True)}
    shapes = TINY_SHAPES if args.tiny else SHAPES
    replays = {c["case"]: torch.load(c["replay"], weights_only=True).long() for c in cases}
    plans = {(c["case"], p): PlacementPlan.load(f) for c in cases for p, f in c["plans"].items()}
    peak_Bpus = report["links"].get("inter_node_peak_GBps", links.inter_node_bandwidth_Gbps / 8) * 1e3
    simulated: dict[tuple, object] = {}
    for r in report["results"]:
        figures = case_figures.get(r["case"], report["links"])
        node_groups = r["mode"] is not None and communication(r["mode"]).node_groups
        calibrated = Topology(topology.gpus_per_node, case_links.get((r["case"], node_groups), links))
        shape = shapes[r["shape"]]
        ids = replays[r["case"]][:r["tokens"]]
        world = topology.num_gpus
        node_bytes = r["cross_node_bytes"] / max(topology.num_nodes, 1)  # through one node's link, both phases
        if r["policy"] is not None:
            key = (r["case"], r["policy"], r["tokens"], node_groups)  # every mode's time out of one simulation
            if key not in simulated:
                plan = dataclasses.replace(plans[(r["case"], r["policy"])], topology=calibrated)
                waits = report["setting"].get("hierarchical_split_sizes") != HIERARCHICAL_SPLIT_SIZES
                settings = cost.CostSettings(shape.hidden, shape.inter, 2, hierarchical_waits_for_first_stage=waits)
                simulated[key] = simulate_trace(plan, ids[:, None, :], "tar", settings)[0]
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
            r["modeled_ms"] = cost.baseline_layer_us(node_bytes, max_pairs, shape.hidden, shape.inter, links,
                                                     topology.num_nodes > 1, figures.get(f"{name}_overhead_us", 0.0),
                                                     figures.get(f"{name}_host_tail_us", 0.0)) / 1e3
        r["floor_ms"] = cost.floor_us(node_bytes, peak_Bpus, max_pairs, shape.hidden, shape.inter,
                                      links.expert_tflops) / 1e3
        r["achieved_cross_node_GBps"] = node_bytes / (r["median_ms"] * 1e-3) / 1e9 if r["median_ms"] else 0.0
        r["model_error"] = r["modeled_ms"] / r["median_ms"] - 1


def print_table(report: dict) -> None:
    print(f"\n{'case':<38} {'batch':<14} {'variant':<34} {'ms':>9} {'model':>9} {'floor':>9} {'xnode MB':>9}")
    for r in report["results"]:
        print(f"{r['case']:<38} {r['batch']:<14} {r['variant']:<34} {r['median_ms']:9.3f} {r['modeled_ms']:9.3f} "
              f"{r['floor_ms']:9.3f} {r['cross_node_bytes'] / 1e6:9.1f}")


