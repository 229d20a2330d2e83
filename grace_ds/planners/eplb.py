"""DeepSeek's EPLB, reimplemented from its description (../shared/docs/anchors.md): affinity-blind
replication of the heaviest experts and balanced packing of the copies onto GPUs.

global:        replicate over all slots, pack copies onto all GPUs.
hierarchical:  pack contiguous expert groups onto nodes, replicate inside each node, pack onto its GPUs.
One change: two copies of one expert never share a GPU (EPLB may do that; it never helps).
"""
from __future__ import annotations

import torch

from grace_ds.plan import PlacementPlan
from grace_ds.planners.assemble import assemble_plan, slot_capacity
from grace_ds.routing_profile import RoutingProfile
from grace_ds.topology import Topology


def replicate_experts(load: torch.Tensor, num_copies: int, max_copies: int) -> torch.Tensor:
    """load [n] -> copies per expert [n] summing to num_copies: each extra copy goes to the expert with
    the highest load per copy (at most max_copies each)."""
    count = torch.ones_like(load, dtype=torch.int64)
    for _ in range(num_copies - load.numel()):
        per_copy = load.double() / count
        per_copy[count >= max_copies] = -1.0
        if float(per_copy.max()) < 0:
            break
        count[int(per_copy.argmax())] += 1
    return count


def balanced_packing(item_load: torch.Tensor, item_key: torch.Tensor, capacities: list[int]) -> list[list[int]]:
    """Greedy longest-first packing: each item (heaviest first) goes to the lightest pack that still has
    room and holds no item with the same key. Returns item indices per pack."""
    packs: list[list[int]] = [[] for _ in capacities]
    totals = [0.0] * len(capacities)
    keys: list[set[int]] = [set() for _ in capacities]
    for item in torch.argsort(item_load, descending=True, stable=True).tolist():
        key = int(item_key[item])
        open_packs = [p for p in range(len(capacities)) if len(packs[p]) < capacities[p] and key not in keys[p]]
        if not open_packs:  # only when a key has more items than packs; callers cap copies to avoid it
            open_packs = [p for p in range(len(capacities)) if len(packs[p]) < capacities[p]]
        pack = min(open_packs, key=lambda p: (totals[p], len(packs[p])))
        packs[pack].append(item)
        totals[pack] += float(item_load[item])
        keys[pack].add(key)
    return packs


def _replicate_and_pack(experts: list[int], load: torch.Tensor, gpus: list[int], capacity: int) -> dict[int, list[int]]:
    """Fill the slots of `gpus` with copies of `experts`; returns GPU -> experts (primary first per expert)."""
    expert_ids = torch.tensor(experts, dtype=torch.int64)
    count = replicate_experts(load[expert_ids], capacity * len(gpus), max_copies=len(gpus))
    owners = torch.repeat_interleave(expert_ids, count)
    copy_load = load[owners].double() / torch.repeat_interleave(count, count)
    packs = balanced_packing(copy_load, owners, [capacity] * len(gpus))
    return {gpu: [int(owners[i]) for i in pack] for gpu, pack in zip(gpus, packs)}


def _layer(gpu_lists: dict[int, list[int]], num_gpus: int) -> tuple[list[list[int]], list[list[bool]]]:
    seen: set[int] = set()
    experts, primary = [], []
    for gpu in range(num_gpus):
        experts.append(gpu_lists[gpu])
        flags = []
        for e in gpu_lists[gpu]:
            flags.append(e not in seen)
            seen.add(e)
        primary.append(flags)
    return experts, primary


def default_num_groups(num_experts: int, num_nodes: int) -> int:
    """DeepSeek-V3 routes over 8 expert groups; use 8 where it divides the experts and the nodes divide it."""
    return 8 if num_experts % 8 == 0 and 8 % num_nodes == 0 else num_nodes


def plan_eplb(profile: RoutingProfile, topology: Topology, replica_slots: int = 1,
              hierarchical: bool = False, num_groups: int | None = None) -> PlacementPlan:
    capacity = slot_capacity(profile.num_experts, topology, replica_slots)
    num_experts, num_nodes = profile.num_experts, topology.num_nodes
    groups = num_groups or default_num_groups(num_experts, num_nodes)
    use_hierarchy = (hierarchical and num_nodes > 1 and num_experts % groups == 0 and groups % num_nodes == 0
                     and len(set(topology.gpus_per_node)) == 1)
    layers = []
    for li in range(profile.num_layers):
        load = profile.expert_load[li]
        if not use_hierarchy:
            lists = _replicate_and_pack(list(range(num_experts)), load, list(range(topology.num_gpus)), capacity)
        else:
            group_size = num_experts // groups
            group_load = load.view(groups, group_size).sum(1)
            node_groups = balanced_packing(group_load, torch.arange(groups), [groups // num_nodes] * num_nodes)
            lists = {}
            for node, members in enumerate(node_groups):
                experts = [g * group_size + i for g in sorted(members) for i in range(group_size)]
                lists.update(_replicate_and_pack(experts, load, topology.gpus_of_node(node), capacity))
        layers.append(_layer(lists, topology.num_gpus))
    name = "eplb-hierarchical" if hierarchical else "eplb"
    return assemble_plan(layers, profile, topology, name, replica_slots,
                         {"hierarchical_applied": use_hierarchy, "num_groups": groups})
