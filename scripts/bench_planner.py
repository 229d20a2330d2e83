"""Planner run time at the Qwen3-30B-A3B shape (48 MoE layers x 128 experts, top-8) on 8 nodes x 8 GPUs.

Routing is synthetic here (Zipf-skewed expert popularity with topical clusters): this measures time
only, never placement quality. Times `make_plan` per policy, then (with --cli N) the whole
`grace-ds plan` command N times, start-up included, as a user runs it.
Usage: python scripts/bench_planner.py [--layers 48 --experts 128 ... --no-tune --cli 3]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from grace_ds.planners import POLICIES, make_plan
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology


def synthetic_topk_ids(tokens: int, layers: int, experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """[T, L, k]: each token has a topic; experts of its topic are favoured, popularity is Zipf-skewed."""
    gen = torch.Generator().manual_seed(seed)
    topics = 16
    popularity = 1.0 / torch.arange(1, experts + 1).double() ** 0.8
    out = torch.empty(tokens, layers, top_k, dtype=torch.int64)
    token_topic = torch.randint(topics, (tokens,), generator=gen)
    for layer in range(layers):
        perm = torch.randperm(experts, generator=gen)
        topic_of_expert = torch.randint(topics, (experts,), generator=gen)
        weights = popularity[perm].view(1, -1) * (1 + 4.0 * (topic_of_expert.view(1, -1) == token_topic.view(-1, 1)))
        out[:, layer] = torch.multinomial(weights.float(), top_k, generator=gen)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--no-tune", action="store_true", help="grace without per-layer candidate scoring")
    parser.add_argument("--cli", type=int, default=0, help="also time the grace-ds plan command this many times")
    args = parser.parse_args()
    trace = synthetic_topk_ids(args.tokens, args.layers, args.experts, args.top_k)
    profile = RoutingProfile.from_topk_ids(trace, args.experts, "synthetic-qwen3-30b-a3b-shape")
    topology = Topology.uniform(args.nodes, args.gpus_per_node)
    results = {}
    for policy in args.policies.split(","):
        start = time.perf_counter()
        options = {"tune": False} if policy == "grace" and args.no_tune else {}
        make_plan(policy, profile, topology, 1, **options)
        results[policy] = round(time.perf_counter() - start, 2)
        print(f"{policy:18s} {results[policy]:7.2f} s", flush=True)
    cli_seconds = []
    if args.cli:
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            profile.save(f"{tmp}/profile.safetensors")
            command = [sys.executable, "-m", "grace_ds.cli", "plan", "--profile", f"{tmp}/profile.safetensors",
                       "--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node), "--out", f"{tmp}/plan.json"]
            command += ["--no-tune"] if args.no_tune else []
            for _ in range(args.cli):
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                cli_seconds.append(round(time.perf_counter() - start, 2))
        print(f"grace-ds plan (whole command): {cli_seconds} s", flush=True)
    print(json.dumps({"cli_seconds": cli_seconds, "layers": args.layers, "experts": args.experts, "topology": topology.describe(),
                      "grace_tuned": not args.no_tune,
                      "plan_seconds": results, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
