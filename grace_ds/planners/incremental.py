"""Incremental re-planning: change a served plan by a few expert copies, each the change that cuts the
modeled layer time most per copy moved, until the move budget is spent or nothing helps.

A move rewrites one slot of one GPU (its new expert's weights must travel there). Candidate moves per
layer, around the GPU with the highest predicted load: a copy of one of its three hottest experts into
a free slot elsewhere, or in place of the least useful replica of another GPU (1 copy moved); or its
hot primary swapped with a cold primary of a light GPU (2 copies moved). Each candidate is scored like
the GRACE tuner scores plans: grace_ds.cost's modeled time on the profile's sampled routings (without
samples: the heaviest predicted GPU load). Copy weights and predicted loads of every layer are then
refreshed for the new profile, which moves no weights. Slots keep their positions, so the moves are
exactly the slots whose expert differs between the old plan and the new one.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan
from grace_ds.planners.assemble import GpuExperts, GpuPrimary, base_slots, layer_slot_tensors, predict_loads
from grace_ds.planners.grace import SCORE_MODES, score_layer
from grace_ds.routing_profile import RoutingProfile

HOT_EXPERTS = 3  # hottest experts of the heaviest GPU tried per move
RECEIVERS = 8  # lightest GPUs tried as receivers
VICTIMS = 2  # least useful replicas / coldest primaries tried per receiver


@dataclass(frozen=True)
class Move:
    """Slot `slot` of GPU `gpu` in layer `layer` changes from old_expert (-1: empty) to new_expert."""

    layer: int
    gpu: int
    slot: int
    old_expert: int
    new_expert: int


@dataclass
class IncrementalResult:
    plan: PlacementPlan
    moves: list[Move]  # net: each slot whose expert differs from the served plan's
    cost_before: list[float]  # per layer: modeled layer time (us, flat + hierarchical) on the profile's sample
    cost_after: list[float]
    budget_exhausted: bool  # stopped at the move budget while a move still helped


def _layer_lists(plan: PlacementPlan, layer: int) -> tuple[GpuExperts, GpuPrimary]:
    experts, primary = [], []
    for gpu in range(plan.num_gpus):
        row = plan.slot_expert[layer, gpu].tolist()
        used = [i for i, e in enumerate(row) if e >= 0]
        if used != list(range(len(used))):
            raise GraceInputError(f"incremental re-planning: layer {layer} GPU {gpu} has an empty slot before a "
                                  "full one; plans from grace-ds keep slots packed")
        experts.append([row[i] for i in used])
        primary.append([bool(plan.slot_is_primary[layer, gpu, i]) for i in used])
    return experts, primary


class _Layer:
    """One layer's placement under search, with its cost on the profile."""

    def __init__(self, index: int, experts: GpuExperts, primary: GpuPrimary, load: torch.Tensor,
                 sample: torch.Tensor | None, plan: PlacementPlan, target: GpuExperts | None, mode: str) -> None:
        self.index, self.experts, self.primary, self.load, self.sample = index, experts, primary, load, sample
        self.plan, self.target, self.mode = plan, target, mode
        self.cost = self.evaluate(experts, primary)

    def evaluate(self, experts: GpuExperts, primary: GpuPrimary) -> float:
        if self.sample is None:
            return float(predict_loads(self.load, experts, self.plan.topology)[1].max())
        return score_layer(experts, primary, self.load, self.sample, self.plan.topology, self.plan.slots_per_gpu,
                           self.plan.num_experts, self.plan.top_k, self.mode, sampling="random")[0]

    def candidates(self) -> list[list[Move]]:
        topology = self.plan.topology
        copy_loads: list[list[float]] = []
        _, gpu_load = predict_loads(self.load, self.experts, topology, copy_loads=copy_loads)
        return self._around_heaviest(copy_loads, gpu_load) + self._towards_target(copy_loads, gpu_load)

    def _towards_target(self, copy_loads: list[list[float]], gpu_load: torch.Tensor) -> list[list[Move]]:
        """Slots rewritten to what the target plan holds there: on a GPU, one of its missing experts
        (hottest first) in place of a copy the target drops (least loaded first, only if another copy
        of it survives), or into a free slot; and exchanges of two such copies between two GPUs."""
        if self.target is None:
            return []
        capacity = self.plan.slots_per_gpu
        holders: dict[int, list[int]] = {}
        for gpu, experts in enumerate(self.experts):
            for e in experts:
                holders.setdefault(e, []).append(gpu)
        wanted = {g: set(t) - set(self.experts[g]) for g, t in enumerate(self.target)}
        found = []
        busy = sorted(range(len(self.experts)), key=lambda g: -float(gpu_load[g]) if wanted[g] else 0.0)[:RECEIVERS]
        for gpu in busy:
            held = self.experts[gpu]
            spare = [j for j, e in enumerate(held) if e not in self.target[gpu] and len(holders[e]) > 1]
            victims = sorted(spare, key=lambda j: copy_loads[gpu][j])[:1]
            adds = sorted(wanted[gpu], key=lambda e: -float(self.load[e]))[:HOT_EXPERTS]
            for expert in adds:
                if len(held) < capacity:
                    found.append([Move(self.index, gpu, len(held), -1, expert)])
                for j in victims:
                    found.append([Move(self.index, gpu, j, held[j], expert)])
                # An exchange: expert sits on `other`, which the target gives one of this GPU's drops.
                for other in holders.get(expert, []):
                    if expert in self.target[other]:
                        continue
                    i = self.experts[other].index(expert)
                    for j, e in enumerate(held):
                        if e not in self.target[gpu] and e in wanted[other]:
                            found.append([Move(self.index, gpu, j, e, expert), Move(self.index, other, i, expert, e)])
                            break
        return found

    def _around_heaviest(self, copy_loads: list[list[float]], gpu_load: torch.Tensor) -> list[list[Move]]:
        capacity = self.plan.slots_per_gpu
        heaviest = int(gpu_load.argmax())
        on_heaviest = self.experts[heaviest]
        hot = sorted(range(len(on_heaviest)), key=lambda i: -copy_loads[heaviest][i])[:HOT_EXPERTS]
        receivers = [g for g in torch.argsort(gpu_load).tolist() if g != heaviest][:RECEIVERS]
        found = []
        for i in hot:
            expert = on_heaviest[i]
            for gpu in receivers:
                held = self.experts[gpu]
                if expert in held:
                    continue
                if len(held) < capacity:
                    found.append([Move(self.index, gpu, len(held), -1, expert)])
                replicas = [j for j in range(len(held)) if not self.primary[gpu][j]]
                for j in sorted(replicas, key=lambda j: copy_loads[gpu][j])[:VICTIMS]:
                    found.append([Move(self.index, gpu, j, held[j], expert)])
                if self.primary[heaviest][i]:
                    primaries = [j for j in range(len(held)) if self.primary[gpu][j] and held[j] not in on_heaviest]
                    for j in sorted(primaries, key=lambda j: copy_loads[gpu][j])[:VICTIMS]:
                        found.append([Move(self.index, heaviest, i, expert, held[j]),
                                      Move(self.index, gpu, j, held[j], expert)])
        return found

    def applied(self, moves: list[Move]) -> tuple[GpuExperts, GpuPrimary]:
        experts = [list(g) for g in self.experts]
        primary = [list(g) for g in self.primary]
        for move in moves:
            if move.old_expert < 0:
                experts[move.gpu].append(move.new_expert)
                primary[move.gpu].append(False)
            else:
                experts[move.gpu][move.slot] = move.new_expert
                primary[move.gpu][move.slot] = False
        # An expert whose primary copy was overwritten promotes its first remaining copy.
        has_primary = {e for g, flags in zip(experts, primary) for e, f in zip(g, flags) if f}
        for gpu, held in enumerate(experts):
            for j, e in enumerate(held):
                if e not in has_primary:
                    primary[gpu][j] = True
                    has_primary.add(e)
        return experts, primary

    def best(self, budget: int, min_gain: float) -> tuple[float, list[Move], float] | None:
        """(gain per copy moved, moves, new cost) of the best candidate within `budget`, if it gains."""
        best = None
        for moves in self.candidates():
            if len(moves) > budget:
                continue
            cost = self.evaluate(*self.applied(moves))
            gain = (self.cost - cost) / len(moves)
            if gain > min_gain * self.cost and (best is None or gain > best[0]):
                best = (gain, moves, cost)
        return best


def aligned_target(plan: PlacementPlan, target: PlacementPlan, layer: int) -> GpuExperts:
    """The target's experts per GPU of `layer`, its nodes and GPUs renumbered to keep as many of the
    plan's copies in place as they can (node matching, then GPU matching inside matched nodes)."""
    source_of = target_gpu_of(plan, target, layer)
    return [sorted(e for e in target.slot_expert[layer, source_of[g]].tolist() if e >= 0) for g in range(plan.num_gpus)]


def target_gpu_of(plan: PlacementPlan, target: PlacementPlan, layer: int) -> list[int]:
    """[P]: which of the target's GPUs each of the plan's GPUs should become (see aligned_target)."""
    from scipy.optimize import linear_sum_assignment

    topology = plan.topology
    current = [set(plan.slot_expert[layer, g][plan.slot_expert[layer, g] >= 0].tolist()) for g in range(plan.num_gpus)]
    wanted = [set(target.slot_expert[layer, g][target.slot_expert[layer, g] >= 0].tolist()) for g in range(plan.num_gpus)]
    nodes = [topology.gpus_of_node(n) for n in range(topology.num_nodes)]
    overlap = np.zeros((len(nodes), len(nodes)))
    for a, gpus_a in enumerate(nodes):
        for b, gpus_b in enumerate(nodes):
            if len(gpus_a) != len(gpus_b):
                overlap[a, b] = -1e9  # a node's GPUs go to a node with as many GPUs
                continue
            held = set().union(*(current[g] for g in gpus_a))
            overlap[a, b] = sum(len(held & wanted[g]) for g in gpus_b)
    source_of = [0] * plan.num_gpus
    for a, b in zip(*linear_sum_assignment(-overlap)):
        gpus_a, gpus_b = nodes[a], nodes[b]
        inner = np.array([[len(current[ga] & wanted[gb]) for gb in gpus_b] for ga in gpus_a])
        for i, j in zip(*linear_sum_assignment(-inner)):
            source_of[gpus_a[i]] = gpus_b[j]
    return source_of


def align_plan(plan: PlacementPlan, target: PlacementPlan) -> PlacementPlan:
    """`target` renumbered to serve after `plan` with the fewest moved copies: GPUs matched as in
    aligned_target, and an expert a GPU keeps stays in its slot. Same placement, same predictions."""
    if target.slot_expert.shape != plan.slot_expert.shape:
        raise GraceInputError(f"cannot align a plan with slots {tuple(target.slot_expert.shape)} to one with "
                              f"{tuple(plan.slot_expert.shape)}")
    slot_expert = torch.full_like(target.slot_expert, -1)
    primary = torch.zeros_like(target.slot_is_primary)
    weight = torch.zeros_like(target.slot_weight)
    predicted = torch.zeros_like(target.predicted_gpu_load)
    for li in range(plan.num_layers):
        for gpu, source in enumerate(target_gpu_of(plan, target, li)):
            row = target.slot_expert[li, source]
            incoming = {e: s for s, e in enumerate(row.tolist()) if e >= 0}
            kept = [e if e in incoming else -1 for e in plan.slot_expert[li, gpu].tolist()]
            new = iter(e for e in incoming if e not in kept)
            # Packed slots: kept experts where they are, new ones in the gaps, in order.
            order = [e if e >= 0 else next(new, -1) for e in kept]
            order = [e for e in order if e >= 0] + [-1] * sum(1 for e in order if e < 0)
            for slot, expert in enumerate(order):
                if expert >= 0:
                    slot_expert[li, gpu, slot] = expert
                    primary[li, gpu, slot] = target.slot_is_primary[li, source, incoming[expert]]
                    weight[li, gpu, slot] = target.slot_weight[li, source, incoming[expert]]
            predicted[li, gpu] = target.predicted_gpu_load[li, source]
    return PlacementPlan(slot_expert, primary, weight, predicted, target.topology, target.num_experts, target.top_k,
                         target.policy, list(target.layer_names), target.model_name, dict(target.options))


def replan_incremental(plan: PlacementPlan, profile: RoutingProfile, max_moves: int, min_gain: float = 0.001,
                       target: PlacementPlan | None = None, mode: str = "both") -> IncrementalResult:
    """Change `plan` by at most `max_moves` expert copies (summed over layers) for the traffic in `profile`
    (same experts and layers); a move must cut its layer's modeled time by at least `min_gain` (relative)
    per copy moved. Moves are searched around each layer's heaviest GPU and towards `target` (default:
    a GRACE plan made from scratch for the profile, renumbered to match the plan), so repeated steps
    approach the fresh plan's quality while moving only copies that pay for themselves. `mode`: the
    communication mode whose modeled time counts (flat, hierarchical, or both summed)."""
    if mode not in SCORE_MODES:
        raise GraceInputError(f"incremental re-planning: mode must be one of {SCORE_MODES}, got {mode!r}")
    if max_moves < 0:
        raise GraceInputError(f"incremental re-planning: max_moves must be >= 0, got {max_moves}")
    if profile.num_layers != plan.num_layers or profile.num_experts != plan.num_experts:
        raise GraceInputError(f"incremental re-planning: profile has {profile.num_layers} layers x "
                              f"{profile.num_experts} experts, the plan {plan.num_layers} x {plan.num_experts}")
    if target is None and max_moves > 0:
        from grace_ds.planners.grace import plan_grace

        # Untuned: the moves are scored anyway, and tuning would cost more than the whole search.
        target = plan_grace(profile, plan.topology, plan.slots_per_gpu - base_slots(plan.num_experts, plan.topology),
                            tune=False)
    layers = []
    for li in range(plan.num_layers):
        sample = profile.sample_topk_ids[:, li] if profile.sample_topk_ids is not None else None
        wanted = aligned_target(plan, target, li) if target is not None else None
        layers.append(_Layer(li, *_layer_lists(plan, li), profile.expert_load[li].double(), sample, plan, wanted,
                             mode))
    before = [layer.cost for layer in layers]
    budget = max_moves
    # Best candidate of each layer; after a move only that layer's candidates change.
    heap = []
    for layer in layers:
        found = layer.best(budget, min_gain) if budget > 0 else None
        if found is not None:
            heapq.heappush(heap, (-found[0], layer.index, found[1], found[2]))
    exhausted = False
    while heap:
        _, li, chosen, cost = heapq.heappop(heap)
        if len(chosen) > budget:  # a swap that no longer fits: look for a single move instead
            found = layers[li].best(budget, min_gain) if budget > 0 else None
            if found is not None:
                heapq.heappush(heap, (-found[0], li, found[1], found[2]))
            else:
                exhausted = exhausted or budget < 2
            continue
        layer = layers[li]
        layer.experts, layer.primary = layer.applied(chosen)
        layer.cost = cost
        budget -= len(chosen)
        if budget == 0:
            exhausted = bool(heap) or layer.best(max_moves, min_gain) is not None
            break
        found = layer.best(budget, min_gain)
        if found is not None:
            heapq.heappush(heap, (-found[0], li, found[1], found[2]))
    new_plan = _rebuilt(plan, layers, profile)
    # Net moves: a slot rewritten twice in one search travels once (and not at all if it came back).
    return IncrementalResult(new_plan, moved_copies(plan, new_plan), before, [layer.cost for layer in layers],
                             exhausted)


def _rebuilt(plan: PlacementPlan, layers: list[_Layer], profile: RoutingProfile) -> PlacementPlan:
    """The plan with the searched placements, copy weights and predicted loads for the profile's loads."""
    parts = []
    for layer in layers:
        weights, predicted = predict_loads(layer.load, layer.experts, plan.topology)
        parts.append((*layer_slot_tensors(layer.experts, layer.primary, weights, plan.slots_per_gpu), predicted))
    slot_expert, primary, weight, predicted = (torch.stack(p) for p in zip(*parts))
    options = {**plan.options, "online_replans": int(plan.options.get("online_replans", 0)) + 1}
    return PlacementPlan(slot_expert, primary, weight, predicted, plan.topology, plan.num_experts, plan.top_k,
                         plan.policy, list(plan.layer_names), plan.model_name, options)


def moved_copies(old: PlacementPlan, new: PlacementPlan) -> list[Move]:
    """Every slot whose expert differs between two plans of one job (what serving `new` must receive)."""
    layer, gpu, slot = torch.nonzero(old.slot_expert != new.slot_expert, as_tuple=True)
    return [Move(int(li), int(g), int(s), int(old.slot_expert[li, g, s]), int(new.slot_expert[li, g, s]))
            for li, g, s in zip(layer, gpu, slot) if int(new.slot_expert[li, g, s]) >= 0]


def copies_to_receive(old: PlacementPlan, new: PlacementPlan) -> int:
    """Expert copies the GPUs must fetch to serve `new` after `old`, counted after renumbering `new`'s nodes
    and GPUs to keep most copies in place (a plan made from scratch may number them differently; a held
    expert is never fetched again, wherever its slot)."""
    total = 0
    for li in range(new.num_layers):
        for gpu, wanted in enumerate(aligned_target(old, new, li)):
            held = set(old.slot_expert[li, gpu].tolist())
            total += sum(1 for e in wanted if e not in held)
    return total
