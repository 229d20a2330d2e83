"""Find the sparse MoE blocks of a transformers 5.x model and give them GRACE experts.

In transformers 5.x every supported family keeps its routed experts fused in `block.experts`
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) and calls them as experts(hidden, top_k_index,
top_k_weights); the router (`block.gate`) returns (logits, top_k_weights, top_k_index). Shared experts
and dense layers are left as they are and stay on every rank.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from grace_ds.errors import GraceInputError
from grace_ds.experts import SlotExperts
from grace_ds.models.grace_experts import GraceExperts
from grace_ds.runtime import GraceRuntime

# Block class name -> model family, for the families tested here.
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV2Moe": "deepseek_v2",
    "DeepseekV3MoE": "deepseek_v3",
}


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, block) of each sparse MoE block, in model order (converted ones included)."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in SUPPORTED_BLOCKS:
            experts = getattr(module, "experts", None)
            if is_converted(experts):
                found.append((name, module))
                continue
            if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or experts.gate_up_proj.dim() != 3:
                raise GraceInputError(f"{name}: {type(module).__name__} has no fused experts.gate_up_proj [E, 2I, H]; "
                                      f"transformers 5.x is required")
            found.append((name, module))
        elif isinstance(getattr(module, "experts", None), nn.Module) and hasattr(module.experts, "gate_up_proj") \
                and type(module).__name__ not in SUPPORTED_BLOCKS and not is_converted(module.experts) \
                and not is_converted(module):  # a GRACE layer's own parts
            raise GraceInputError(f"{name}: MoE block {type(module).__name__} is not supported "
                                  f"(supported: {sorted(SUPPORTED_BLOCKS)})")
    return found


def is_converted(experts: nn.Module | None) -> bool:
    """Experts already served by GRACE (GraceExperts, or grace_ds.deepspeed_moe.GraceExpertsMoE)."""
    return isinstance(getattr(experts, "_runtime", None), GraceRuntime)


def top_k_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_experts_per_tok", "moe_top_k", "top_k"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise GraceInputError("cannot tell the model's top-k from its config (num_experts_per_tok)")


def _serving_experts(runtime: GraceRuntime, layer: int, experts: nn.Module) -> GraceExperts:
    return GraceExperts(runtime, layer, SlotExperts.from_fused(experts.gate_up_proj, experts.down_proj,
                                                               runtime.local_slots(layer), experts.act_fn))


def check_plan_fits(model: nn.Module, blocks: list[tuple[str, nn.Module]], plan) -> None:
    """The model has supported MoE blocks (`blocks`, from find_moe_blocks, not yet converted) and `plan` is
    for its expert count, MoE layer count and top-k."""
    if not blocks:
        raise GraceInputError(f"no supported sparse MoE block found in {type(model).__name__}")
    num_experts = int(blocks[0][1].experts.gate_up_proj.shape[0])
    plan.check_matches(num_experts, len(blocks), top_k_of(model), None, "placement plan")


def convert_model(model: nn.Module, runtime: GraceRuntime,
                  make_experts: Callable[[GraceRuntime, int, nn.Module], nn.Module] = _serving_experts) -> nn.Module:
    """Replace every MoE block's experts by GRACE experts holding this rank's slots; frees the rest.
    make_experts(runtime, plan layer, the block's experts): GraceExperts (serving) by default;
    grace_ds.deepspeed_moe.GraceExpertsMoE.convert for DeepSpeed training."""
    blocks = find_moe_blocks(model)
    if any(is_converted(block.experts) for _, block in blocks):
        raise GraceInputError("the model is already converted to GRACE experts")
    check_plan_fits(model, blocks, runtime.plan)
    for layer, (name, block) in enumerate(blocks):
        old = block.experts
        block.experts = make_experts(runtime, layer, old)
        del old
    return model
