"""Hierarchical grouping: experts into node groups, then each node's experts into GPU groups.

Modes per level:
  uniform   equal sizes (by GPU count at the node level), most co-activation inside groups.
  spectral  the paper: spectral clustering; nodes fully non-uniform (bounded only by slots), GPUs
            controlled non-uniform, sizes in [E - d, E + d], d = max(1, round(E * r)).
  balanced  ours: loads (not counts) balanced to within load_slack, sizes as in spectral, then as much
            co-activation inside groups as a local search finds.
"""
from __future__ import annotations

import torch

from grace_ds.planners.grouping import lpt_labels, balanced_labels, repair_sizes, spectral_labels
from grace_ds.topology import Topology

GROUPING_MODES = ("uniform", "spectral", "balanced")
REFINE_SAMPLE_TOKENS = 2048


def _proportional_sizes(total: int, shares: list[int]) -> list[int]:
    """Largest-remainder split of `total` in proportion to `shares`."""
    whole = sum(shares)
    exact = [total * s / whole for s in shares]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(shares)), key=lambda i: -(exact[i] - sizes[i]))[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _size_bounds(mode: str, total: int, shares: list[int], caps: list[int], r: float) -> tuple[list[int], list[int]]:
    sizes = _proportional_sizes(total, shares)
    if mode == "uniform":
        return sizes, sizes
    spread = [max(1, round(s * r)) for s in sizes]
    lo = [max(0, s - d) for s, d in zip(sizes, spread)]
    hi = [min(c, s + d) for s, d, c in zip(sizes, spread, caps)]
    return lo, hi


def split_group(members: list[int], affinity: torch.Tensor | None, load: torch.Tensor, shares: list[int],
                caps: list[int], mode: str, r: float, load_slack: float, seed: int,
                fully_non_uniform: bool = False, hits: torch.Tensor | None = None) -> list[list[int]]:
    """Split `members` into len(shares) groups (sizes / loads in proportion to shares, at most caps)."""
    count = len(shares)
    if count == 1:
        return [list(members)]
    index = torch.tensor(members, dtype=torch.int64)
    sub_load = load[index].double()
    sub_aff = affinity[index][:, index].double() if affinity is not None else torch.zeros(len(members), len(members))
    if fully_non_uniform:
        lo, hi = [min(s, 1) for s in _proportional_sizes(len(members), shares)], list(caps)
    else:
        lo, hi = _size_bounds(mode, len(members), shares, caps, r)
    has_affinity = float(sub_aff.sum()) > 0
    if mode == "balanced":
        total = sum(shares)
        sub_hits = None if hits is None else hits[:, index]
        labels = balanced_labels(sub_aff, sub_load, count, lo, hi, [s / total for s in shares], load_slack, seed,
                                 sub_hits)
    else:
        start = spectral_labels(sub_aff, count, seed) if has_affinity else lpt_labels(sub_load, count)
        labels = repair_sizes(start, sub_aff, count, lo, hi)
    return [[members[i] for i in (labels == g).nonzero().flatten().tolist()] for g in range(count)]


def group_hierarchically(affinity: torch.Tensor | None, load: torch.Tensor, topology: Topology, capacity: int,
                         node_mode: str, gpu_mode: str, r: float = 0.15, load_slack: float = 0.05,
                         seed: int = 0, sample_topk_ids: torch.Tensor | None = None) -> list[list[int]]:
    """Primary experts per GPU [P lists] for one layer. `capacity` bounds the experts of one GPU.
    sample_topk_ids [S, k]: sampled routings that the balanced mode minimises group touches on."""
    for mode in (node_mode, gpu_mode):
        if mode not in GROUPING_MODES:
            raise ValueError(f"grouping mode must be one of {GROUPING_MODES}, got {mode!r}")
    num_experts = load.shape[0]
    hits = None
    if sample_topk_ids is not None:
        # A few thousand tokens pin the exact objective well; more only slow the search.
        sample = sample_topk_ids[:REFINE_SAMPLE_TOKENS].long()
        hits = torch.zeros(sample.shape[0], num_experts, dtype=torch.bool)
        hits.scatter_(1, sample, True)
    node_caps = [g * capacity for g in topology.gpus_per_node]
    node_groups = split_group(list(range(num_experts)), affinity, load, list(topology.gpus_per_node), node_caps,
                              node_mode, r, load_slack, seed, fully_non_uniform=node_mode == "spectral", hits=hits)
    gpu_experts: list[list[int]] = []
    for node, members in enumerate(node_groups):
        gpus = topology.gpus_per_node[node]
        gpu_experts.extend(split_group(sorted(members), affinity, load, [1] * gpus, [capacity] * gpus,
                                       gpu_mode, r, load_slack, seed, hits=hits))
    return gpu_experts
