"""Back to a plain transformers checkpoint from a model whose MoE blocks GRACE converted.

A converted model holds, on each rank, only its plan's slots of every MoE block (replicas included),
under module names transformers does not know (`experts.deepspeed_moe.experts.deepspeed_experts.<slot>`
for training, `experts.slots` for serving). Its own `save_pretrained` would write this rank's slots under
those names. Here every logical expert's primary copy is gathered from the rank that holds it into the
block's fused tensors (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`), so the state
dict has exactly the unmodified model's names and shapes, and `AutoModelForCausalLM.from_pretrained`
loads the directory as the unmodified model with the trained weights.

The gathers are collectives of each runtime's process group: every rank of the job calls these functions.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.models.convert import find_moe_blocks, is_converted


def _converted_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks with GRACE experts. What is refused here every rank refuses alike (it reads the model's
    structure and the plan, the same everywhere), before any gather: none is left waiting for a peer."""
    blocks = [(name, block) for name, block in find_moe_blocks(model) if is_converted(block.experts)]
    if not blocks:
        raise GraceInputError(f"{type(model).__name__} has no MoE block with GRACE experts: nothing to gather "
                              f"(an unconverted transformers model saves with its own save_pretrained)")
    for name, block in blocks:
        plan, layer = block.experts._runtime.plan, block.experts.layer
        if not bool((plan.slot_expert[layer] >= 0).any(1).all()):
            raise GraceInputError(f"{name}: some GPU of the plan holds no expert of plan layer {layer}; exporting "
                                  f"needs every GPU to hold one (each learns the experts' shape from its own)")
    return blocks


def _gathered_experts(blocks: list[tuple[str, nn.Module]],
                      device: torch.device | str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(unmodified parameter name, [E, ...] tensor) per fused expert tensor of every converted block, one
    block at a time (a caller that drops them holds one block's experts at a time)."""
    for name, block in blocks:
        experts = block.experts
        runtime, layer = experts._runtime, experts.layer
        plan, slots = runtime.plan, runtime.slot_modules[layer]
        held = runtime.local_slots(layer).tolist()
        # Each logical expert's primary (one per expert: PlacementPlan.validate), by expert: (GPU, slot).
        gpu, slot = torch.nonzero(plan.slot_is_primary[layer], as_tuple=True)
        order = torch.argsort(plan.slot_expert[layer][gpu, slot])
        gpu, slot = gpu[order], slot[order]
        occupied = next(s for s, e in enumerate(held) if e >= 0)
        for index, param_name in enumerate(("gate_up_proj", "down_proj")):
            with torch.no_grad():
                example = slots.slot_weights(occupied)[index]
                # Every slot of this rank (empty ones zero), in the weights' dtype: all ranks send the same
                # shape, and the primaries are then picked by the plan, which every rank knows.
                local = torch.zeros((len(held), *example.shape), dtype=example.dtype,
                                    device=faults.collective_device(runtime.group))
                for s, expert in enumerate(held):
                    if expert >= 0:
                        local[s] = slots.slot_weights(s)[index].detach()
                # Position p of the group serves plan GPU p % num_gpus (GraceRuntime checks it): the first
                # num_gpus positions hold every GPU once.
                every = faults.all_gather_tensor(local, f"export of {name} (gathering experts)", runtime.group) \
                    if faults.distributed() else local.unsqueeze(0)
                full = every[gpu, slot]
            yield f"{name}.experts.{param_name}", full.to(example.device if device is None else device)


def logical_expert_weights(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Every converted MoE block's fused expert tensors by the unmodified model's names
    (`model.layers.3.mlp.experts.gate_up_proj` [E, 2I, H], `...down_proj` [E, H, I]), each logical expert
    from its primary copy, in the weights' dtype; on `device` (None: where the weights are). Collective."""
    return dict(_gathered_experts(_converted_blocks(model), device))


def _unmodified(model: nn.Module, blocks: list[tuple[str, nn.Module]],
                experts: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    grace_prefixes = tuple(f"{name}.experts." for name, _ in blocks)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith(grace_prefixes)}
    state.update(experts)
    _check_against_fresh_model(model, state)
    return state


def unmodified_state_dict(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The whole model's state dict as the unmodified model has it: dense parameters and buffers as they are,
    the converted blocks' experts from logical_expert_weights (on `device`, None: where the weights are).
    Collective."""
    blocks = _converted_blocks(model)
    return _unmodified(model, blocks, _gathered_experts(blocks, device))


def _check_against_fresh_model(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The names and shapes must be those of the model's class built afresh from its config (on the meta
    device: no memory), so nothing GRACE or DeepSpeed added, and nothing dropped, reaches a checkpoint."""
    config = getattr(model, "config", None)
    if config is None:
        return  # not a transformers model: no class to build from a config
    with torch.device("meta"):
        fresh = {key: tuple(value.shape) for key, value in type(model)(config).state_dict().items()}
    got = {key: tuple(value.shape) for key, value in state.items()}
    if got != fresh:
        extra, missing = sorted(set(got) - set(fresh)), sorted(set(fresh) - set(got))
        shapes = sorted(key for key in set(got) & set(fresh) if got[key] != fresh[key])
        raise GraceInputError(f"{type(model).__name__}: the exported state dict does not match the unmodified model "
                              f"(extra {extra[:5]}, missing {missing[:5]}, other shapes {shapes[:5]})")


def save_pretrained(model_or_engine: Any, directory: str | os.PathLike, **kwargs: Any) -> None:
    """Write `directory` as transformers' save_pretrained writes the unmodified model (config and weights,
    trained values, every expert): `AutoModelForCausalLM.from_pretrained(directory)` then loads it
    without GRACE. Takes the model or a DeepSpeed engine (its `module`). Collective: every rank of the job
    calls it; the job's first rank writes (its expert-parallel group gathers every expert to it), the
    others only take part in the gathers; all return once the files are written. kwargs go to
    transformers' save_pretrained (max_shard_size, variant, push_to_hub, ...)."""
    model = getattr(model_or_engine, "module", model_or_engine)
    if not callable(getattr(model, "save_pretrained", None)):
        raise GraceInputError(f"{type(model).__name__} is not a transformers model (no save_pretrained)")
    blocks = _converted_blocks(model)  # refused alike on every rank, before any gather
    writer = faults.job_rank() == 0
    experts = _gathered_experts(blocks, "cpu")  # one copy of the whole model's experts, on the host
    failure: Exception | None = None
    if writer:
        try:
            model.save_pretrained(directory, state_dict=_unmodified(model, blocks, experts), is_main_process=True,
                                  **kwargs)
        except Exception as error:  # the others wait for the outcome: they are told, then it is raised here
            failure = error
    else:
        for _ in experts:  # take part in every gather, keep nothing
            pass
    if faults.distributed():  # in place of a barrier: every rank returns once the files are written, or raises
        outcome = [None if failure is None
                   else (isinstance(failure, GraceInputError), f"{type(failure).__name__}: {failure}")]
        faults.guarded("export (waiting for the checkpoint to be written)", None, dist.broadcast_object_list,
                       outcome, src=0)
        if failure is None and outcome[0] is not None:
            input_error, message = outcome[0]
            raise (GraceInputError if input_error else RuntimeError)(f"rank 0 could not write {directory}: {message}")
    if failure is not None:
        raise failure
