"""Replica routers: pick, for every (token, logical expert) pair, the physical copy that serves it.

The gate's choice is never changed; only which copy of the chosen expert computes it. Policies:
  tar     GRACE's locality tiers: a copy on the token's GPU, else one on its node, else any copy;
          among several, copies are weighted by the plan's weights (inverse predicted load).
  wrr     weighted choice among all copies, no locality.
  static  SGLang-style fixed table: same GPU, else same node, else a fixed fair spread by source GPU.
  modulo  vLLM-style: (token, k) position modulo the copy count; no locality, no weights.
Weighted choices are a deterministic smooth weighted round-robin (SWRR) by default, or seeded sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from grace_ds.errors import GraceInputError
from grace_ds.plan import PlacementPlan

ROUTER_POLICIES = ("tar", "wrr", "static", "modulo")
SCHEDULE_LENGTH = 64  # SWRR steps kept per (source GPU, expert); the schedule repeats after that


@dataclass
class LayerCopies:
    """Copies of each logical expert in one layer: R = most copies of any expert.

    copy_slot [E, R] physical slot ids (-1 pad); copy_gpu [E, R] (-1 pad); copy_weight [E, R] (0 pad);
    copy_count [E]."""

    copy_slot: torch.Tensor
    copy_gpu: torch.Tensor
    copy_weight: torch.Tensor
    copy_count: torch.Tensor

    @classmethod
    def from_slots(cls, slot_expert: torch.Tensor, slot_weight: torch.Tensor, slot_is_primary: torch.Tensor,
                   num_experts: int) -> "LayerCopies":
        """From one layer's slot_expert / slot_weight / slot_is_primary [P, S]."""
        slots_per_gpu = slot_expert.shape[1]
        experts = slot_expert.reshape(-1)
        used = (experts >= 0).nonzero().flatten()
        # Primaries first, then by slot id: copy 0 is always the primary.
        order = torch.argsort(experts[used] * 2 + (~slot_is_primary.reshape(-1)[used]).long(), stable=True)
        slots = used[order]
        owners = experts[slots]
        count = torch.bincount(owners, minlength=num_experts)
        width = max(int(count.max()), 1)
        rank = torch.arange(slots.numel()) - (torch.cumsum(count, 0) - count)[owners]
        copy_slot = torch.full((num_experts, width), -1, dtype=torch.int64)
        copy_slot[owners, rank] = slots
        copy_gpu = torch.where(copy_slot >= 0, copy_slot // slots_per_gpu, torch.full_like(copy_slot, -1))
        copy_weight = torch.zeros(num_experts, width, dtype=torch.float64)
        copy_weight[owners, rank] = slot_weight.reshape(-1)[slots].double()
        return cls(copy_slot, copy_gpu, copy_weight, count)

    @classmethod
    def from_plan(cls, plan: PlacementPlan, layer: int) -> "LayerCopies":
        return cls.from_slots(plan.slot_expert[layer], plan.slot_weight[layer], plan.slot_is_primary[layer],
                              plan.num_experts)


def expected_copy_loads(copies: LayerCopies, expert_load: torch.Tensor, policy: str,
                        node_of_gpu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs each copy [E, R] and each GPU [P] serve in expectation when expert_load [E] arrives evenly
    from every GPU (data parallel) and the router follows its weights (modulo: an even spread; static:
    its fixed pick)."""
    num_gpus = node_of_gpu.numel()
    if policy == "modulo":
        valid = (copies.copy_slot >= 0).double()
        share = (valid / valid.sum(-1, keepdim=True)).unsqueeze(0).expand(num_gpus, -1, -1)
    else:
        weights = candidate_weights(copies, policy, torch.arange(num_gpus), node_of_gpu)
        share = weights / weights.sum(-1, keepdim=True)  # [P_src, E, R]
    per_copy = (share * expert_load.view(1, -1, 1).double() / num_gpus).sum(0)
    valid = copies.copy_gpu >= 0
    gpu_load = torch.zeros(num_gpus, dtype=torch.float64).index_add_(0, copies.copy_gpu[valid], per_copy[valid])
    return per_copy, gpu_load


def candidate_weights(copies: LayerCopies, policy: str, source_gpus: torch.Tensor,
                      node_of_gpu: torch.Tensor) -> torch.Tensor:
    """[len(source_gpus), E, R] weights of the copies a token on each source GPU may use (0 = not allowed)."""
    valid = copies.copy_slot >= 0
    base = torch.where(valid, copies.copy_weight, torch.zeros_like(copies.copy_weight))
    base = base.unsqueeze(0).expand(source_gpus.numel(), -1, -1)
    if policy == "wrr":
        return base.clone()
    gpu = copies.copy_gpu.unsqueeze(0)
    src = source_gpus.view(-1, 1, 1)
    on_gpu = valid & (gpu == src)
    on_node = valid & (node_of_gpu[copies.copy_gpu.clamp(min=0)].unsqueeze(0) == node_of_gpu[source_gpus].view(-1, 1, 1))
    tier = torch.where(on_gpu.any(-1, keepdim=True), on_gpu,
                       torch.where(on_node.any(-1, keepdim=True), on_node, valid.unsqueeze(0).expand_as(on_gpu)))
    if policy == "tar":
        return torch.where(tier, base, torch.zeros_like(base))
    if policy == "static":
        # One fixed copy per (source GPU, expert): spread sources over the allowed copies in turn.
        allowed = tier.long()
        rank_in_tier = torch.cumsum(allowed, -1) - 1
        pick = src % allowed.sum(-1, keepdim=True).clamp(min=1)
        chosen = tier & (rank_in_tier == pick)
        return chosen.double()
    raise GraceInputError(f"router policy must be one of {ROUTER_POLICIES}, got {policy!r}")


def swrr_schedule(weights: torch.Tensor, length: int = SCHEDULE_LENGTH) -> torch.Tensor:
    """Smooth weighted round-robin over the last dim: weights [..., R] -> copy index [..., length].

    Each step adds every weight to its credit, picks the largest credit and takes the total off it,
    so over any window the picks follow the weights to within one pick per copy."""
    total = weights.sum(-1, keepdim=True)
    credit = torch.zeros_like(weights)
    picks = []
    for _ in range(length):
        credit += weights
        # Ties go to the lowest index; zero-weight copies can never win (-inf).
        pick = torch.where(weights > 0, credit, torch.full_like(credit, -torch.inf)).argmax(-1)
        credit.scatter_add_(-1, pick.unsqueeze(-1), -total)
        picks.append(pick)
    return torch.stack(picks, -1)


def ordinal_within_group(keys: torch.Tensor) -> torch.Tensor:
    """For each entry of keys [n], how many earlier entries share its key (0, 1, 2, ... per key)."""
    if keys.numel() == 0:
        return keys.clone()
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    index = torch.arange(keys.numel(), device=keys.device)
    group_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    ordinal = torch.empty_like(keys)
    ordinal[order] = index - group_start
    return ordinal


class ReplicaRouter:
    """Routes logical picks of one plan to physical slots, layer by layer.

    For the runtime, `source_gpus` is this rank alone; the simulator builds every source GPU.
    Tables are [sources, E, SCHEDULE_LENGTH] per layer, built once and kept on `device`."""

    def __init__(self, plan: PlacementPlan, policy: str = "tar", source_gpus: list[int] | None = None,
                 sampling: str = "swrr", seed: int = 0, device: torch.device | str = "cpu") -> None:
        if policy not in ROUTER_POLICIES:
            raise GraceInputError(f"router policy must be one of {ROUTER_POLICIES}, got {policy!r}")
        if sampling not in ("swrr", "random"):
            raise GraceInputError(f"router sampling must be 'swrr' or 'random', got {sampling!r}")
        self.plan, self.policy, self.sampling = plan, policy, sampling
        self.device = torch.device(device)
        sources = torch.arange(plan.num_gpus) if source_gpus is None else torch.tensor(source_gpus)
        self.source_gpus = sources
        self._row_of_source = torch.full((plan.num_gpus,), -1, dtype=torch.int64)
        self._row_of_source[sources] = torch.arange(sources.numel())
        self._row_of_source_host = self._row_of_source  # int lookups without waiting for the device
        self._row_of_source = self._row_of_source.to(self.device)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._layers: dict[int, dict[str, torch.Tensor]] = {}
        self._node_of_gpu = plan.topology.node_of_gpu

    def tables(self, layer: int) -> dict[str, torch.Tensor]:
        """Routing tables of one layer, built on first use and kept on the router's device."""
        if layer not in self._layers:
            copies = LayerCopies.from_plan(self.plan, layer)
            tables = {"copy_slot": copies.copy_slot, "copy_count": copies.copy_count}
            if self.policy != "modulo":
                weights = candidate_weights(copies, self.policy, self.source_gpus, self._node_of_gpu)
                tables["weights"] = weights
            if self.policy != "modulo" and (self.sampling == "swrr" or self.policy == "static"):
                pick = swrr_schedule(weights)  # [sources, E, L] copy index
                slots = torch.gather(copies.copy_slot.unsqueeze(0).expand(weights.shape[0], -1, -1), 2, pick)
                # Stagger sources so that they do not all start on the same copy.
                shift = (torch.arange(weights.shape[0]) * SCHEDULE_LENGTH) // max(self.plan.num_gpus, 1)
                steps = torch.arange(SCHEDULE_LENGTH).view(1, -1) + shift.view(-1, 1)
                tables["schedule"] = torch.gather(slots, 2, (steps % SCHEDULE_LENGTH).unsqueeze(1).expand_as(slots))
            self._layers[layer] = {k: v.to(self.device) for k, v in tables.items()}
        return self._layers[layer]

    def peek(self, layer: int, topk_ids: torch.Tensor, source_gpu: int | torch.Tensor) -> torch.Tensor:
        """The slots `route` gives these picks, leaving the random draws where they were: the next `route`
        of the same picks returns the same slots (an observer sees what the layer will get)."""
        state = self._generator.get_state()
        try:
            return self.route(layer, topk_ids, source_gpu)
        finally:
            self._generator.set_state(state)

    def route(self, layer: int, topk_ids: torch.Tensor, source_gpu: int | torch.Tensor) -> torch.Tensor:
        """topk_ids [T, k] logical ids, source_gpu (int or [T]) -> physical slot ids [T, k]."""
        tables = self.tables(layer)
        num_tokens, top_k = topk_ids.shape
        experts = topk_ids.long()
        if self.policy == "modulo":
            position = torch.arange(num_tokens * top_k, device=experts.device).view(num_tokens, top_k)
            which = position % tables["copy_count"][experts]
            return tables["copy_slot"][experts, which]
        if isinstance(source_gpu, int):
            row = int(self._row_of_source_host[source_gpu])
            if row < 0:
                raise GraceInputError(f"router was built without tables for source GPU {source_gpu}")
            rows = torch.full((num_tokens, top_k), row, device=experts.device)
        else:
            rows = self._row_of_source[source_gpu.long()].view(-1, 1).expand(-1, top_k)
            if (rows < 0).any():
                raise GraceInputError("router was built without tables for this source GPU")
        if self.sampling == "random" and self.policy != "static":
            probs = tables["weights"][rows.reshape(-1), experts.reshape(-1)]
            which = torch.multinomial(probs.cpu().float(), 1, generator=self._generator).view(num_tokens, top_k)
            return tables["copy_slot"][experts, which.to(experts.device)]
        # The n-th pair of a (source, expert) group in this batch takes step n of the SWRR schedule.
        num_experts = self.plan.num_experts
        ordinal = ordinal_within_group((rows * num_experts + experts).reshape(-1)).view(num_tokens, top_k)
        return tables["schedule"][rows, experts, ordinal % SCHEDULE_LENGTH]
