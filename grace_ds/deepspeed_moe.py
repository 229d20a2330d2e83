"""GraceMoE: a deepspeed.moe.layer.MoE whose `deepspeed_moe` serves a placement plan.

The gate is DeepSpeed's own TopKGate, unchanged (weight [E, H]); its picks are logical experts. This
rank holds one copy of its expert module per occupied slot of the plan (replicas included); the GRACE
runtime routes each pick to a copy and moves tokens without capacity padding. With drop_tokens=True the
gate's own capacity drops (decided per rank from its tokens, whatever the placement) are honoured.
Training: gradients flow to the gate and through the exchange as in DeepSpeed's layer; copies of a
replicated expert train as one (grace_ds.replica_sync).
"""
from __future__ import annotations

import copy

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn
from torch.func import functional_call

from grace_ds.errors import GraceInputError
from grace_ds.experts import EmptySlot, PerSlotExperts
from grace_ds.exchange.expert_compute import pairwise_weighted_sum
from grace_ds.runtime import GraceRuntime


def _mark_expert_parameters(module: nn.Module, ep_size: int) -> None:
    """DeepSpeed's marks of an expert parameter: reduced over its expert-data-parallel group, not all ranks."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = f"ep_size_{ep_size}"


class ModuleSlots:
    """This rank's per-slot expert modules as the runtime computes them: (rows [M, H], slot [M]) ->
    [M, H], plus what replica training needs (slot_tensors, copy_views, bind)."""

    def __init__(self, modules: nn.ModuleDict, held: list[int]) -> None:
        self.modules, self.held = modules, held
        self.occupied = [slot for slot, expert in enumerate(held) if expert >= 0]
        self._names = {slot: [name for name, _ in modules[str(slot)].named_parameters()] for slot in self.occupied}

    def slot_tensors(self) -> list[torch.Tensor]:
        return [param for slot in self.occupied for _, param in self.modules[str(slot)].named_parameters()]

    def _span(self, slot: int) -> slice:
        start = sum(len(self._names[s]) for s in self.occupied[:self.occupied.index(slot)])
        return slice(start, start + len(self._names[slot]))

    def copy_views(self, tensors: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
        return list(tensors[self._span(slot)])

    def bind(self, params: list[torch.Tensor]) -> "ModuleSlots":
        bound = ModuleSlots(self.modules, self.held)
        bound._params = params
        return bound

    def refill(self, *unused) -> None:
        raise GraceInputError("GraceMoE layers keep one module per expert: online re-planning moves fused "
                              "experts only (transformers models converted by grace_ds, the megatron-core layer)")

    capturable = False  # a Python loop over modules

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor:
        return pairwise_weighted_sum(self, rows, pair_row, pair_slot, pair_weight)

    def __call__(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """A loop over this rank's slots: DeepSpeed experts are arbitrary modules."""
        params = getattr(self, "_params", None)
        out = rows.new_empty(rows.shape)
        for index in torch.unique(slot).tolist():
            mask = slot == index
            module = self.modules[str(index)]
            if params is None:
                result = module(rows[mask])
            else:
                result = functional_call(module, dict(zip(self._names[index], params[self._span(index)])), (rows[mask],))
            out[mask] = result[0] if isinstance(result, tuple) else result
        return out


class GraceMOELayer(nn.Module):
    """Stands where DeepSpeed's MOELayer stands: forward(input, used_token) -> output; sets l_aux, exp_counts."""

    def __init__(self, gate: TopKGate, expert: nn.Module, runtime: GraceRuntime, layer: int) -> None:
        super().__init__()
        self.gate = gate
        self.layer = layer
        self._runtime = runtime
        held = runtime.local_slots(layer)
        self.held = held.tolist()  # logical expert per slot, -1 empty (a plain list: no state-dict entry)
        # Keys `experts.deepspeed_experts.<slot>` with <slot> this rank's slot index: DeepSpeed's MoE
        # checkpointing then files each copy under its physical slot id (rank * slots_per_gpu + slot),
        # and each rank loads back exactly its own slots. Empty slots hold no weights.
        self.experts = nn.Module()
        self.experts.deepspeed_experts = nn.ModuleDict(
            {str(s): copy.deepcopy(expert) if e >= 0 else EmptySlot() for s, e in enumerate(self.held)})
        _mark_expert_parameters(self.experts, runtime.plan.num_gpus)
        self.l_aux = torch.zeros(())
        self.exp_counts = torch.zeros(0)
        self.slots = ModuleSlots(self.experts.deepspeed_experts, self.held)
        runtime.slot_modules[layer] = self.slots

    def _set_ep_group(self, group) -> None:
        if self.gate.ep_group is None:
            self.gate._set_ep_group(group)
        self._runtime.group = group

    def load_logical_experts(self, state_dicts: list[dict[str, torch.Tensor]]) -> None:
        """Fill each slot from the state dict of the logical expert it holds (state_dicts[e] for expert e)."""
        for slot, module in self.experts.deepspeed_experts.items():
            if self.held[int(slot)] >= 0:
                module.load_state_dict(state_dicts[self.held[int(slot)]])

    def forward(self, hidden: torch.Tensor, used_token: torch.Tensor | None = None) -> torch.Tensor:
        model_dim = hidden.shape[-1]
        tokens = hidden.reshape(-1, model_dim)
        self.l_aux, _, _, indices, _, gates, self.exp_counts = self.gate(tokens, used_token, True, False)
        top_k_index = indices.T.long()  # [S, k]; -1 marks a dropped route (used_token, capacity drops)
        weights = torch.where(top_k_index >= 0, gates.T, torch.zeros_like(gates.T))
        out = self._runtime.route_and_compute(self.layer, tokens, top_k_index.clamp(min=0), weights, self.slots)
        return out.reshape(hidden.shape)


class GraceMoE(MoE):
    """Drop-in for deepspeed.moe.layer.MoE (same forward, returns (output, l_aux, exp_counts)), serving
    layer `layer` of the runtime's plan across the expert-parallel group.

    Takes DeepSpeed MoE's arguments: the gate's (k, capacity_factor, eval_capacity_factor, min_capacity,
    noisy_gate_policy, drop_tokens, use_rts, top2_2nd_expert_sampling) go to DeepSpeed's TopKGate as they
    are; use_residual builds DeepSpeed's Residual-MoE mixing; ep_size must be the plan's GPU count (the
    job may be a multiple of it: expert x data parallel). drop_tokens defaults to False (dropless, what
    GRACE serves); True keeps the gate's capacity drops, which it decides per rank. Refused, with the
    argument named: use_tutel, enable_expert_tensor_parallelism."""

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int, runtime: GraceRuntime, layer: int,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 noisy_gate_policy: str | None = None, top2_2nd_expert_sampling: bool = False, *,
                 ep_size: int | None = None, use_residual: bool = False, drop_tokens: bool = False,
                 use_rts: bool = True, use_tutel: bool = False,
                 enable_expert_tensor_parallelism: bool = False) -> None:
        # MoE.__init__ would build E / ep_size expert copies in DeepSpeed's contiguous layout; skip it.
        nn.Module.__init__(self)
        plan = runtime.plan
        if plan.num_experts != num_experts:
            raise GraceInputError(f"placement plan is for {plan.num_experts} experts, the layer has {num_experts}")
        if plan.top_k != k:
            raise GraceInputError(f"placement plan is for top_k={plan.top_k}, the layer routes k={k}")
        if not 0 <= layer < plan.num_layers:
            raise GraceInputError(f"layer {layer} is outside the plan's {plan.num_layers} layers")
        if ep_size is not None and ep_size != plan.num_gpus:
            raise GraceInputError(f"ep_size={ep_size}, but the placement plan spreads experts over {plan.num_gpus} "
                                  f"GPUs: plan for the expert-parallel group ({ep_size} GPUs)")
        if use_tutel:
            raise GraceInputError("use_tutel=True is not supported: GraceMoE moves tokens with its own exchange")
        if enable_expert_tensor_parallelism:
            raise GraceInputError("enable_expert_tensor_parallelism=True is not supported: GraceMoE holds whole "
                                  "expert copies (tensor-parallel experts would split each copy over ranks)")
        if noisy_gate_policy not in (None, "None", "Jitter", "RSample"):
            raise GraceInputError(f"noisy_gate_policy={noisy_gate_policy!r}: DeepSpeed knows None, 'Jitter', 'RSample'")
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = False
        self.ep_size = plan.num_gpus
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.num_experts = num_experts
        # DeepSpeed's checkpoint files number experts rank * num_local_experts + local id: with every
        # rank counting slots_per_gpu, the file id is the physical slot id.
        self.num_local_experts = plan.slots_per_gpu
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling)
        self.deepspeed_moe = GraceMOELayer(gate, expert, runtime, layer)
        if use_residual:  # as DeepSpeed's MoE: MoE.forward mixes the two by a learnt softmax coefficient
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)


class _SlotLayer(nn.Module):
    """Where DeepSpeed looks for an MoE layer's experts (`deepspeed_moe.experts.deepspeed_experts.<slot>`)
    and sets its expert-parallel group."""

    def __init__(self, runtime: GraceRuntime, layer: int, slots: PerSlotExperts) -> None:
        super().__init__()
        self.experts, self.layer, self._runtime = slots, layer, runtime
        _mark_expert_parameters(slots, runtime.plan.num_gpus)
        runtime.slot_modules[layer] = slots

    def _set_ep_group(self, group) -> None:
        self._runtime.group = group


class GraceExpertsMoE(MoE):
    """A transformers MoE block's experts as a DeepSpeed MoE layer, for training under deepspeed.initialize
    (grace_ds.deepspeed.initialize converts to it): forward(hidden [N, H], top_k_index [N, k],
    top_k_weights [N, k]) -> [N, H], as GraceExperts. DeepSpeed then treats the slots as its own experts:
    expert-parallel groups, expert gradients reduced over expert data parallel, ZeRO expert partitions,
    one checkpoint file per physical slot."""

    def __init__(self, runtime: GraceRuntime, layer: int, slots: PerSlotExperts) -> None:
        nn.Module.__init__(self)
        plan = runtime.plan
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = plan.num_gpus
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.num_experts = plan.num_experts
        self.num_local_experts = plan.slots_per_gpu  # checkpoint file id = physical slot id (as GraceMoE)
        self.layer = layer
        self.deepspeed_moe = _SlotLayer(runtime, layer, slots)
        self._runtime = runtime

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return self._runtime.route_and_compute(self.layer, hidden_states, top_k_index, top_k_weights,
                                               self.deepspeed_moe.experts)

    @classmethod
    def convert(cls, runtime: GraceRuntime, layer: int, experts: nn.Module) -> "GraceExpertsMoE":
        """From a transformers block's fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn)."""
        slots = PerSlotExperts.from_fused(experts.gate_up_proj, experts.down_proj, runtime.local_slots(layer),
                                          experts.act_fn)
        return cls(runtime, layer, slots)
