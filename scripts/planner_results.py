"""Writes docs/planner-results.md (+ .json): every policy on the shared routing data.

Routing traces: plan on the first half of the tokens, replay the second half with the tar router
(hidden 2048, ffn 1024, bf16, 25 Gbit/s between nodes, one replica slot per GPU per layer).
Cross-domain: plan on olmoe_arxiv, replay olmoe_wikipedia. DeepSeek-V3 loads: balance only.
Usage: python scripts/planner_results.py [--shared ../shared] [--out docs]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from tqdm import tqdm

from grace_ds.bench.provenance import run_record
from grace_ds.evaluation import evaluate_policies, format_table
from grace_ds.files import atomic_write_text
from grace_ds.planners import make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.simulate import simulate_loads
from grace_ds.topology import Topology

TOPOLOGIES = [(2, 2), (2, 4), (4, 4)]
# The grace tuner minimising GPU copies (not modeled time) under a looser balance limit on the profile.
COPIES_VARIANT = {"grace (copies objective)": ("grace", {"objective": "copies", "balance_limit": 1.2})}


def deepseek_rows(shared: Path) -> list[dict]:
    rows = []
    files = sorted((shared / "data" / "expert_load" / "deepseek_v3").glob("*.json"))
    jobs = [(f, p) for f in files for p in ("contiguous", "eplb", "eplb-hierarchical", "grace")]
    for path, policy in tqdm(jobs, desc="DeepSeek-V3 loads", leave=False):
        profile = RoutingProfile.from_logical_counts(path, top_k=8)
        plan = make_plan(policy, profile, Topology.uniform(4, 8), replica_slots=1)
        row = {"loads": path.stem, "policy": policy}
        for router in ("modulo", "tar"):
            layers = simulate_loads(plan, profile, router)
            row[f"max_over_mean_{router}"] = sum(r["max_over_mean_gpu_load"] for r in layers) / len(layers)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    routing = args.shared / "data" / "routing"
    sections, raw = [], {}
    for name in ("olmoe_arxiv", "olmoe_wikipedia", "mixtral_arxiv"):
        topologies = TOPOLOGIES if name != "mixtral_arxiv" else [(2, 2)]  # 8 experts: no room for 2x4, 4x4
        rows = []
        for nodes, gpus in topologies:
            rows += evaluate_policies(routing / f"{name}.safetensors", [nodes], [gpus], 1, show_progress=True,
                                      variants=COPIES_VARIANT if name.startswith("olmoe") else None)
        raw[name] = rows
        sections.append(f"### {name} (plan: first half, replay: second half)\n\n{format_table(rows)}\n")
    rows = evaluate_policies(routing / "olmoe_arxiv.safetensors", [2], [2], 1,
                             test_trace=routing / "olmoe_wikipedia.safetensors", show_progress=True)
    raw["olmoe_arxiv_to_wikipedia"] = rows
    sections.append("### Cross-domain: plan on olmoe_arxiv, replay olmoe_wikipedia (2x2)\n\n" + format_table(rows) + "\n")
    ds = deepseek_rows(args.shared)
    raw["deepseek_v3"] = ds
    table = ["| loads | policy | max/mean GPU load (even split, `modulo`) | max/mean GPU load (`tar`) |", "|---|---|---|---|"]
    table += [f"| {r['loads']} | {r['policy']} | {r['max_over_mean_modulo']:.3f} | {r['max_over_mean_tar']:.3f} |" for r in ds]
    sections.append("### DeepSeek-V3 production loads, 4 nodes x 8 GPUs, 32 redundant slots (1 per GPU)\n\n"
                    + "\n".join(table) + "\n")
    header = (f"# Planner results on the shared data\n\nProduced by `python scripts/planner_results.py` on "
              f"{datetime.date.today()} ({platform.machine()}, {platform.python_version()}); raw rows in "
              f"`planner-results.json`. Modeled times are the simulator's cost model (`grace-ds simulate --explain`), "
              f"hidden 2048, ffn 1024, bf16, 25 Gbit/s between nodes, per layer for the replayed tokens in one batch.\n")
    atomic_write_text(args.out / "planner-results.md", header + "\n" + "\n".join(sections))
    raw["run"] = run_record("cpu")  # commit, command and hardware beside the rows
    atomic_write_text(args.out / "planner-results.json", json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.out / 'planner-results.md'}")


if __name__ == "__main__":
    main()
