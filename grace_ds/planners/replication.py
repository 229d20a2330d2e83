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

import numpy as np
import torch

from grace_ds.planners.assemble import predict_loads
from grace_ds.routing import LayerCopies, expected_copy_loads
from grace_ds.topology import Topology

RECEIVER_CHOICES = ("least-loaded", "spread-nodes")
SEARCH_ITERATIONS = 1  # fixed-point steps per trial, warm-started from the last plan's loads
REFRESH_EVERY = 16  # greedy copies between full re-predictions of every expert


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
                                          copy_loads=trial_loads, start_gpu_load=load)
            if float(trial_load.max()) < w_max * (1 - 1e-6):
                lists, load, copy_loads, kept = trial, trial_load, trial_loads, True
                break
        if not kept:
            break
        rounds += 1
    primary = [[i < len(gpu_experts[g]) for i in range(len(lists[g]))] for g in range(num_gpus)]
    return lists, primary


def expert_gpu_loads(expert_load: float, copy_gpus: np.ndarray, gpu_weight: np.ndarray,
                     node_of_gpu: np.ndarray) -> np.ndarray:
    """[..., P]: pairs of one expert each GPU serves under the locality-aware router, tokens arriving
    evenly from every GPU, for copy sets copy_gpus [..., R] (the rule of routing.candidate_weights, for
    one expert and many candidate copy sets at once, in numpy)."""
    num_gpus = node_of_gpu.shape[0]
    sets = np.atleast_2d(copy_gpus)  # [M, R]
    sources = np.arange(num_gpus)[None, :, None]
    weight = gpu_weight[sets][:, None, :]  # [M, 1, R]
    local = sources == sets[:, None, :]  # [M, P, R]
    same_node = node_of_gpu[None, :, None] == node_of_gpu[sets][:, None, :]
    allowed = np.where(local.any(2, keepdims=True), local, np.where(same_node.any(2, keepdims=True), same_node, True))
    share = allowed * weight
    per_copy = (share / share.sum(2, keepdims=True)).sum(1) * expert_load / num_gpus  # [M, R]
    out = np.zeros((sets.shape[0], num_gpus))
    for r in range(sets.shape[1]):  # copies of one expert sit on distinct GPUs: no collisions per column
        out[np.arange(sets.shape[0]), sets[:, r]] += per_copy[:, r]
    return out.reshape(np.shape(copy_gpus)[:-1] + (num_gpus,))


def replicate_greedy(gpu_experts: list[list[int]], expert_load: torch.Tensor, topology: Topology,
                     capacity: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Ours: one copy at a time into the free slots, each the best single move.

    While it can, a copy of one of the three hottest experts of the heaviest GPU (onto the least-loaded
    free GPU of some node) that lowers the heaviest predicted load most; after that, the copy that
    keeps most tokens on their own node (an expert's first copy on a node) without raising the
    heaviest load. Loads are predicted for the locality-aware router; candidates are scored exactly
    for the expert that changes, with the other experts' loads held (refreshed every few copies)."""
    lists = [list(g) for g in gpu_experts]
    num_gpus, num_experts = topology.num_gpus, expert_load.shape[0]
    node_of_gpu = topology.node_of_gpu.numpy()
    gpus_per_node = np.asarray(topology.gpus_per_node)
    load_e = expert_load.double().numpy()
    copies: list[list[int]] = [[] for _ in range(num_experts)]
    for gpu, experts in enumerate(lists):
        for e in experts:
            copies[e].append(gpu)

    def refresh() -> tuple[np.ndarray, np.ndarray]:
        """Weights from a full prediction, then every expert's per-GPU load [E, P] in one pass."""
        _, predicted = predict_loads(expert_load, lists, topology, iterations=SEARCH_ITERATIONS + 1)
        predicted = predicted.numpy()
        weight = 1.0 / np.maximum(predicted, max(predicted.mean() * 1e-3, 1e-12))
        width = max(len(c) for c in copies)
        copy_gpu = torch.tensor([c + [-1] * (width - len(c)) for c in copies])
        valid = copy_gpu >= 0
        layer = LayerCopies(copy_slot=torch.where(valid, copy_gpu, -1), copy_gpu=copy_gpu,
                            copy_weight=torch.where(valid, torch.from_numpy(weight)[copy_gpu.clamp(min=0)], 0.0),
                            copy_count=valid.sum(1))
        per_copy, _ = expected_copy_loads(layer, expert_load, "tar", topology.node_of_gpu)
        contrib = torch.zeros(num_experts, num_gpus, dtype=torch.float64)
        contrib.scatter_add_(1, copy_gpu.clamp(min=0), torch.where(valid, per_copy, 0.0))
        return weight, contrib.numpy()

    node_gpus = [topology.gpus_of_node(n) for n in range(topology.num_nodes)]
    gpu_weight, contrib = refresh()
    since_refresh = 0
    while True:
        free = np.array([len(lists[g]) < capacity for g in range(num_gpus)])
        if not free.any():
            break
        load = contrib.sum(0)
        current_max = load.max()
        heaviest = int(load.argmax())
        hot = sorted(lists[heaviest], key=lambda e: -contrib[e, heaviest])[:3]
        best = None  # (new max, -kept on node, expert, receiver, new contrib)
        pool = hot if num_gpus > 1 else []
        for phase in ("balance", "locality"):
            if phase == "locality":
                if best is not None:
                    break
                # Experts with the most pairs crossing nodes for lack of a copy on the source's node.
                missing = np.array([gpus_per_node[[n for n in range(len(gpus_per_node))
                                                   if n not in set(node_of_gpu[copies[e]].tolist())]].sum()
                                    for e in range(num_experts)])
                pool = [int(e) for e in np.argsort(-load_e * missing)[:3] if missing[e] > 0]
            for e in pool:
                held = set(copies[e])
                nodes_held = set(node_of_gpu[copies[e]].tolist())
                receivers = []
                for gpus in node_gpus:  # the least-loaded free GPU of each node that lacks this expert
                    options = [g for g in gpus if free[g] and g not in held]
                    if options:
                        receivers.append(min(options, key=lambda g: load[g]))
                if not receivers:
                    continue
                trial = np.array([copies[e] + [r] for r in receivers])
                new = expert_gpu_loads(load_e[e], trial, gpu_weight, node_of_gpu)  # [M, P]
                new_max = (load - contrib[e] + new).max(1)
                for i, receiver in enumerate(receivers):
                    node = node_of_gpu[receiver]
                    kept = 0.0 if node in nodes_held else load_e[e] * gpus_per_node[node]
                    ok = (new_max[i] < current_max * (1 - 1e-9) if phase == "balance"
                          else kept > 0 and new_max[i] <= current_max * (1 + 1e-9))
                    if ok and (best is None or (new_max[i], -kept) < best[:2]):
                        best = (new_max[i], -kept, e, receiver, new[i])
        if best is None:
            break
        _, _, e, receiver, new = best
        lists[receiver].append(e)
        copies[e].append(receiver)
        contrib[e] = new
        since_refresh += 1
        if since_refresh >= REFRESH_EVERY:
            gpu_weight, contrib = refresh()
            since_refresh = 0
    primary = [[i < len(gpu_experts[g]) for i in range(len(lists[g]))] for g in range(num_gpus)]
    return lists, primary
