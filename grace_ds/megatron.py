"""GRACE for megatron-core (0.19.x): a MoE layer that serves a placement plan where MoELayer stands.

megatron's own router (TopKRouter, logical experts, aux losses and all) picks experts; the plan's
replica router maps each pick to a physical copy; the GRACE exchange (flat or hierarchical) moves each
token once per GPU or node; this rank computes only the slots it holds (replicas included) as one
grouped GEMM. `grace_layer_spec` swaps it into a megatron layer spec; `sharded_state_dict` files every
slot under its logical expert with megatron's own names, so a checkpoint does not depend on the plan
(replicas are saved once, through their primary, and all copies load from it) and moves both ways
between this layer and megatron's MoELayer; megatron's optimizers file their states through the same
entries, so those follow the experts into any plan too.
Training: gradients flow to megatron's router and through the exchange; the slots are expert parameters
(allreduce=False: megatron's DDP reduces them over expert data parallel); a replica's gradient is summed
into its primary in the backward (grace_ds.replica_sync), and `runtime.sync_replica_weights()` after each
optimizer step copies the primaries back into their replicas.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from grace_ds.experts import SlotExperts
from grace_ds.runtime import GraceRuntime


def top_k_from_routing(probs: torch.Tensor, routing_map: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's dense router output (probs [T, E], routing_map bool [T, E]) -> (ids [T, k], weights
    [T, k]). A token with fewer than k routes (capacity drops) gets weight 0 on its padding picks."""
    # Stable sort puts each row's routed experts first, in expert order.
    ids = torch.argsort(routing_map.to(torch.uint8), dim=-1, descending=True, stable=True)[:, :top_k]
    weights = probs.gather(1, ids) * routing_map.gather(1, ids)
    return ids, weights


class GraceMegatronMoELayer(nn.Module):
    """forward(hidden [S, B, H]) -> (output [S, B, H], None), as megatron's MoELayer."""

    def __init__(self, config, submodules=None, layer_number: int | None = None, pg_collection=None,
                 runtime: GraceRuntime | None = None, plan_layer: int | None = None, **unused) -> None:
        super().__init__()
        if runtime is None:
            raise ValueError("GraceMegatronMoELayer needs the GRACE runtime (use grace_layer_spec)")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.config = config
        self.layer_number = layer_number
        self.plan_layer = (layer_number or 1) - 1 if plan_layer is None else plan_layer
        self._runtime = runtime
        plan = runtime.plan
        if config.num_moe_experts != plan.num_experts:
            raise ValueError(f"megatron config has {config.num_moe_experts} experts, the plan {plan.num_experts}")
        if not 0 <= self.plan_layer < plan.num_layers:
            raise ValueError(f"layer {layer_number} has no plan layer (the plan has {plan.num_layers})")
        self.router = submodules.router(config=config, pg_collection=pg_collection)
        if not config.gated_linear_unit:
            raise ValueError("GRACE's megatron experts are gated (SwiGLU-style); set gated_linear_unit")
        inter = config.moe_ffn_hidden_size or config.ffn_hidden_size
        self.experts = SlotExperts(runtime.local_slots(self.plan_layer), config.hidden_size, inter,
                                   config.activation_func, config.params_dtype,
                                   "cpu" if config.use_cpu_initialization else torch.cuda.current_device())
        runtime.slot_modules[self.plan_layer] = self.experts
        for param in self.experts.parameters():  # megatron's mark: reduced over expert data parallel
            param.allreduce = False
        expert_dp = getattr(pg_collection, "expt_dp", None)  # checkpoint replica ids, as SequentialMLP's
        self._expert_dp_rank = expert_dp.rank() if expert_dp is not None else 0
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            self.shared_experts = submodules.shared_experts(config=config, pg_collection=pg_collection,
                                                           gate=config.moe_shared_expert_gate)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        shape = hidden_states.shape
        probs, routing_map = self.router(hidden_states, padding_mask)
        ids, weights = top_k_from_routing(probs, routing_map, self.config.moe_router_topk)
        tokens = hidden_states.reshape(-1, shape[-1])
        out = self._runtime.route_and_compute(self.plan_layer, tokens, ids, weights.float(), self.experts)
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out, None

    # ---- weights --------------------------------------------------------------------------------
    def load_logical_experts(self, fc1: torch.Tensor, fc2: torch.Tensor) -> None:
        """Fill the slots from every logical expert's weights: fc1 [E, 2I, H], fc2 [E, H, I]."""
        self.experts.load_fused(fc1, fc2)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron dist-checkpointing entries under the names and shapes of megatron's own MoELayer
        (SequentialMLP experts; megatron declares TEGroupedMLP's the same), so checkpoints move both
        ways between it and GRACE: experts `{prefix}experts.experts.linear_fc1.weight` [E, 2I, H]
        (gate and up halves as megatron splits them) and `.linear_fc2.weight` [E, H, I], each slot at
        its logical expert's offset, or one key per expert with metadata `singleton_local_shards`. A
        replica carries a nonzero replica id, so it is loaded but never saved (its primary is).
        Each fused slot tensor is one ShardedTensorFactory over its parameter (`experts.gate_up_proj`,
        `experts.down_proj`), built into those per-slot entries: megatron's optimizer maps a parameter's
        states through the entry that holds the parameter, so the states (Adam's moments, ...) are filed
        per logical expert too and follow the experts into any plan."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint, sharded_state_dict_default

        out = sharded_state_dict_default(self.router, f"{prefix}router.", sharded_offsets, metadata)
        if self.shared_experts is not None:
            out.update(sharded_state_dict_default(self.shared_experts, f"{prefix}shared_experts.", sharded_offsets,
                                                  metadata))
        plan = self._runtime.plan
        slot_expert, primary = plan.slot_expert[self.plan_layer], plan.slot_is_primary[self.plan_layer]
        singleton = bool((metadata or {}).get("singleton_local_shards", False))
        rank = self._runtime.rank
        held = [(slot, expert, (0, _copy_index(slot_expert, primary, rank, slot), self._expert_dp_rank))
                for slot, expert in enumerate(slot_expert[rank].tolist()) if expert >= 0]  # one row each, in order

        def build(linear: str):
            def build_fn(key: str, data: torch.Tensor, replica_id, flattened_range) -> dict:
                key_prefix = key[: -len(f"{linear}.weight")]  # also under the optimizer's state prefixes
                return {f"slot{slot}.{name}": entry for row, (slot, expert, copy_id) in enumerate(held)
                        for name, entry in megatron_expert_tensors(key_prefix, linear, expert, plan.num_experts,
                                                                   data[row], sharded_offsets, copy_id,
                                                                   singleton).items()}
            return build_fn

        def merge(linear: str):
            def merge_fn(loaded: dict) -> torch.Tensor:
                rows = [torch.cat([loaded[f"slot{slot}.gate"], loaded[f"slot{slot}.up"]]) if linear == "linear_fc1"
                        else loaded[f"slot{slot}.weight"] for slot, _, _ in held]
                return torch.stack(rows)
            return merge_fn

        base = f"{prefix}experts.experts."
        for name, linear, data in (("gate_up_proj", "linear_fc1", self.experts.gate_up_proj),
                                   ("down_proj", "linear_fc2", self.experts.down_proj)):
            out[f"{prefix}experts.{name}"] = ShardedTensorFactory(f"{base}{linear}.weight", data, build(linear),
                                                                  merge(linear), (0, 0, self._expert_dp_rank))
        for slot, expert, copy_id in held:  # the linears' empty extra states, which megatron's layer asks for
            key_prefix = f"{base}{expert}." if singleton else base
            offsets = _expert_offsets(expert, plan.num_experts, sharded_offsets, singleton)
            for linear in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}experts.slot{slot}.{linear}._extra_state"] = make_sharded_object_for_checkpoint(
                    None, f"{key_prefix}{linear}._extra_state", offsets, copy_id)
        return out


def _expert_offsets(expert: int, num_experts: int, sharded_offsets: tuple, singleton: bool) -> tuple:
    """An expert's global offsets: along the expert axis, or none with one key per expert."""
    return tuple(sharded_offsets) if singleton else (*sharded_offsets, (len(sharded_offsets), expert, num_experts))


def megatron_expert_tensors(key_prefix: str, linear: str, expert: int, num_experts: int, data: torch.Tensor,
                            sharded_offsets: tuple, replica_id: tuple, singleton: bool) -> dict:
    """One expert's tensor of one linear as megatron's SequentialMLP files it (tensor parallel 1): linear_fc1
    [2I, H] as its gate and up halves (megatron's SwiGLU factory: the same key, offsets 0 and 1 of 2 along the
    rows; `_w` / `_v` keys with singleton shards), linear_fc2 [H, I] as it is. `data` may be the weight or an
    optimizer state of its shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = _expert_offsets(expert, num_experts, sharded_offsets, singleton)
    if singleton:
        key_prefix = f"{key_prefix}{expert}."
    axis = len(offsets)  # the first axis of the expert's own tensors

    def tensor(key: str, part: torch.Tensor, *extra) -> ShardedTensor:
        return ShardedTensor.from_rank_offsets(key, part, *offsets, *extra, replica_id=replica_id,
                                               prepend_axis_num=axis)

    key = f"{key_prefix}{linear}.weight"
    if linear == "linear_fc2":
        return {"weight": tensor(key, data)}
    gate, up = data.chunk(2, dim=0)
    if singleton:
        return {"gate": tensor(f"{key}_w", gate), "up": tensor(f"{key}_v", up)}
    return {"gate": tensor(key, gate, (axis, 0, 2)), "up": tensor(key, up, (axis, 1, 2))}


def _copy_index(slot_expert: torch.Tensor, primary: torch.Tensor, gpu: int, slot: int) -> int:
    """0 for the primary copy of the expert in (gpu, slot); 1, 2, ... for its replicas in (gpu, slot) order."""
    if bool(primary[gpu, slot]):
        return 0
    expert = int(slot_expert[gpu, slot])
    replicas = ((slot_expert == expert) & ~primary).flatten().nonzero().flatten().tolist()
    return 1 + replicas.index(gpu * slot_expert.shape[1] + slot)


def grace_layer_spec(layer_spec, runtime: GraceRuntime, plan_layer_of: dict[int, int] | None = None):
    """A megatron transformer-layer spec (e.g. get_gpt_layer_local_spec(num_experts=E)) whose MoE MLP
    is GRACE's: same router and shared-expert submodules, experts and dispatch from the plan.
    `plan_layer_of` maps megatron's 1-based layer numbers to plan layers (default: number - 1)."""
    moe = layer_spec.submodules.mlp
    submodules = moe.keywords["submodules"] if isinstance(moe, functools.partial) else moe.submodules

    def build(config, layer_number=None, pg_collection=None, **kwargs):
        plan_layer = plan_layer_of.get(layer_number) if plan_layer_of else None
        return GraceMegatronMoELayer(config, submodules, layer_number, pg_collection, runtime, plan_layer)

    spec = copy.deepcopy(layer_spec)
    spec.submodules.mlp = build
    return spec
