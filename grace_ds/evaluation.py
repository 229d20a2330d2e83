"""Every policy side by side on a routing trace: plan on the first half of the tokens, replay the second
half (or another domain's trace), one row per (topology, policy)."""
from __future__ import annotations

import time
from pathlib import Path

from grace_ds.planners import POLICIES, make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.simulate import simulate_trace, summarize
from grace_ds.topology import Topology
from grace_ds.trace import RoutingTrace


def evaluate_policies(trace_path: str | Path, nodes_list: list[int], gpus_list: list[int], replica_slots: int = 1,
                      test_trace: str | Path | None = None, policies: tuple[str, ...] = POLICIES,
                      show_progress: bool = False, variants: dict[str, tuple[str, dict]] | None = None) -> list[dict]:
    """Rows per (topology, policy); `variants` adds rows labelled by their key, planned by (policy, options),
    e.g. {"grace (copies objective)": ("grace", {"objective": "copies"})}."""
    trace = RoutingTrace.load(trace_path)
    half = trace.num_tokens // 2
    profile = RoutingProfile.from_topk_ids(trace.topk_ids[:half], trace.num_experts, trace.model_name,
                                           trace.layer_names)
    test = RoutingTrace.load(test_trace) if test_trace else trace
    replay = test.topk_ids[test.num_tokens // 2:]
    planners = {p: (p, {}) for p in policies} | dict(variants or {})
    combos = [(n, g, p) for n in nodes_list for g in gpus_list for p in planners]
    from tqdm import tqdm

    rows = []
    for nodes, gpus, policy in tqdm(combos, desc="plan + replay", disable=not show_progress, leave=False):
        topology = Topology.uniform(nodes, gpus)
        start = time.perf_counter()
        plan = make_plan(planners[policy][0], profile, topology, replica_slots, **planners[policy][1])
        plan_s = time.perf_counter() - start
        summary = summarize(simulate_trace(plan, replay, "tar"))
        rows.append({"profile": trace.model_name, "replay": test.model_name, "topology": f"{nodes}x{gpus}",
                     "policy": policy, "plan_seconds": plan_s, **summary})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios are against the contiguous policy of the same topology and replay."""
    base = {(r["topology"], r["replay"]): r for r in rows if r["policy"] == "contiguous"}
    lines = ["| profile -> replay | topology | policy | GPU copies/token | vs contiguous | cross-node/token (hier) "
             "| cross-node/token (flat) | max/mean GPU load | modeled layer us (hier) | modeled layer us (flat) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base.get((r["topology"], r["replay"]))
        ratio = f"{r['gpu_copies_per_token'] / ref['gpu_copies_per_token']:.3f}" if ref else "-"
        lines.append(f"| {r['profile']} -> {r['replay']} | {r['topology']} | {r['policy']} | "
                     f"{r['gpu_copies_per_token']:.3f} | {ratio} | {r['cross_node_copies_per_token']:.3f} | "
                     f"{r['cross_node_copies_per_token_flat']:.3f} | {r['max_over_mean_gpu_load']:.3f} | "
                     f"{r['modeled_layer_time_us']:,.0f} | {r['modeled_layer_time_us_flat']:,.0f} |")
    return "\n".join(lines)
