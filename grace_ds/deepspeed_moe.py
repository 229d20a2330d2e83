"""GraceMoE: a deepspeed.moe.layer.MoE whose `deepspeed_moe` serves a placement plan.

The gate is DeepSpeed's own TopKGate, unchanged (weight [E, H]); its picks are logical experts. This
rank holds one copy of its expert module per occupied slot of the plan (replicas included); the GRACE
runtime routes each pick to a copy and moves tokens dropless (no capacity padding).
"""
from __future__ import annotations

import copy

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from grace_ds.errors import GraceInputError
from grace_ds.layer import GraceRuntime


class _EmptySlot(nn.Module):
    """An unused slot: no weights, one zero-size buffer so that DeepSpeed writes (and later finds) a
    checkpoint file for every slot id."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unused", torch.zeros(0))


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
            {str(s): copy.deepcopy(expert) if e >= 0 else _EmptySlot() for s, e in enumerate(self.held)})
        for module in self.experts.deepspeed_experts.values():
            for param in module.parameters():
                param.allreduce = False
                param.group_name = f"ep_size_{runtime.plan.num_gpus}"
        self.l_aux = torch.zeros(())
        self.exp_counts = torch.zeros(0)

    def _set_ep_group(self, group) -> None:
        if self.gate.ep_group is None:
            self.gate._set_ep_group(group)
        self._runtime.group = group

    def load_logical_experts(self, state_dicts: list[dict[str, torch.Tensor]]) -> None:
        """Fill each slot from the state dict of the logical expert it holds (state_dicts[e] for expert e)."""
        for slot, module in self.experts.deepspeed_experts.items():
            if self.held[int(slot)] >= 0:
                module.load_state_dict(state_dicts[self.held[int(slot)]])

    def _compute(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """A loop over this rank's slots: DeepSpeed experts are arbitrary modules."""
        out = rows.new_empty(rows.shape)
        for index in torch.unique(slot).tolist():
            mask = slot == index
            result = self.experts.deepspeed_experts[str(index)](rows[mask])
            out[mask] = result[0] if isinstance(result, tuple) else result
        return out

    def forward(self, hidden: torch.Tensor, used_token: torch.Tensor | None = None) -> torch.Tensor:
        model_dim = hidden.shape[-1]
        tokens = hidden.reshape(-1, model_dim)
        self.l_aux, _, _, indices, _, gates, self.exp_counts = self.gate(tokens, used_token, True, False)
        top_k_index = indices.T.long()  # [S, k]; -1 marks a dropped route (only with used_token)
        weights = torch.where(top_k_index >= 0, gates.T, torch.zeros_like(gates.T))
        out = self._runtime.route_and_compute(self.layer, tokens, top_k_index.clamp(min=0), weights, self._compute)
        return out.reshape(hidden.shape)


class GraceMoE(MoE):
    """Drop-in for deepspeed.moe.layer.MoE (same forward, returns (output, l_aux, exp_counts)), serving
    layer `layer` of the runtime's plan across the whole expert-parallel group."""

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int, runtime: GraceRuntime, layer: int,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 noisy_gate_policy: str | None = None, top2_2nd_expert_sampling: bool = False) -> None:
        # MoE.__init__ would build E / ep_size expert copies in DeepSpeed's contiguous layout; skip it.
        nn.Module.__init__(self)
        plan = runtime.plan
        if plan.num_experts != num_experts:
            raise GraceInputError(f"placement plan is for {plan.num_experts} experts, the layer has {num_experts}")
        if plan.top_k != k:
            raise GraceInputError(f"placement plan is for top_k={plan.top_k}, the layer routes k={k}")
        if not 0 <= layer < plan.num_layers:
            raise GraceInputError(f"layer {layer} is outside the plan's {plan.num_layers} layers")
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = plan.num_gpus
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.num_experts = num_experts
        # DeepSpeed's checkpoint files number experts rank * num_local_experts + local id: with every
        # rank counting slots_per_gpu, the file id is the physical slot id.
        self.num_local_experts = plan.slots_per_gpu
        # drop_tokens=False: dropless, as GRACE sends every pair.
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, False, True, None, top2_2nd_expert_sampling)
        self.deepspeed_moe = GraceMOELayer(gate, expert, runtime, layer)
