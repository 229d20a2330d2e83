"""Dynamic replication (the method page's phase 2) under a per-GPU slot budget.

Each round takes the GPU with the highest predicted load (the heaviest group), n_replica =
min(max(1, floor(rho)), P - 1) with rho = W_max / mean(W), and copies its hottest experts, the
shortest prefix whose load reaches W_max * n / (n + 1), to the n least-loaded GPUs with a free slot.
Two corrections to the paper: loads are predicted for the locality-aware router (a replica serves its
own GPU's tokens and its node's, not an even split), and a round is kept only if it lowers the heaviest
predicted load; failing that, single copies of the three hottest experts are tried. The paper does one
round; we go on while slots are free and a round helps (`max_rounds` caps it).
"""
from __future__ import annotations

import math

import torch

from grace_ds.planners.assemble import predict_loads
from grace_ds.topology import Topology

RECEIVER_CHOICES = ("least-loaded", "spread-nodes")
SEARCH_ITERATIONS = 2  # weight/load fixed-point steps while searching; the final plan uses more


def replicate_hot_experts(gpu_experts: list[list[int]], expert_load: torch.Tensor, topology: Topology,
                          capacity: int, max_rounds: int | None = None,
                          receivers: str = "least-loaded") -> tuple[list[list[int]], list[list[bool]]]:
    """gpu_experts: primaries per GPU. Returns (copies per GPU, primary flags); replicas are appended."""
    lists = [list(g) for g in gpu_experts]
    node_of_gpu = topology.node_of_gpu.tolist()
    num_gpus = topology.num_gpus
    rounds = 0
    copy_loads: list[list[float]] = []
    _, load = predict_loads(expert_load, lists, topology, iterations=SEARCH_ITERATIONS, copy_loads=copy_loads)
    while (max_rounds is None or rounds < max_rounds) and num_gpus > 1:
        heaviest = int(load.argmax())
        w_max, mean = float(load[heaviest]), float(load.mean())
        free = [g for g in range(num_gpus) if g != heaviest and len(lists[g]) < capacity]
        if mean <= 0 or not free:
            break
        n_replica = min(max(1, math.floor(w_max / mean)), num_gpus - 1)
        hot_order = [e for _, e in sorted(zip(copy_loads[heaviest], lists[heaviest]), key=lambda x: -x[0])]
        target, hot, total = w_max * n_replica / (n_replica + 1), [], 0.0
        by_expert = dict(zip(lists[heaviest], copy_loads[heaviest]))
        for e in hot_order:
            hot.append(e)
            total += by_expert[e]
            if total >= target:
                break

        def rank(g: int, expert: int) -> tuple:
            nodes_with_copy = {node_of_gpu[x] for x in range(num_gpus) if expert in lists[x]}
            spread = 0 if node_of_gpu[g] not in nodes_with_copy else 1
            return (spread if receivers == "spread-nodes" else 0, float(load[g]))

        attempts = [(hot, sorted(free, key=lambda g: rank(g, hot[0]))[:n_replica])]
        for e in hot_order[:3]:
            for g in sorted((g for g in free if e not in lists[g]), key=lambda g: rank(g, e))[:2]:
                attempts.append(([e], [g]))
        kept = False
        for experts, chosen in attempts:
            trial = [list(g) for g in lists]
            for g in chosen:
                room = capacity - len(trial[g])
                for e in experts:
                    if room > 0 and e not in trial[g]:
                        trial[g].append(e)
                        room -= 1
            if trial == lists:
                continue
            trial_loads: list[list[float]] = []
            _, trial_load = predict_loads(expert_load, trial, topology, iterations=SEARCH_ITERATIONS,
                                          copy_loads=trial_loads)
            if float(trial_load.max()) < w_max * (1 - 1e-6):
                lists, load, copy_loads, kept = trial, trial_load, trial_loads, True
                break
        if not kept:
            break
        rounds += 1
    primary = [[i < len(gpu_experts[g]) for i in range(len(lists[g]))] for g in range(num_gpus)]
    return lists, primary
