"""What a DeepSpeed job reports: routing statistics recorded on its MoE layers (`attach_recorder`,
`save_profile`) and online re-plans logged to the active W&B run."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.models import find_moe_blocks
from grace_ds.models.convert import top_k_of
from grace_ds.routing_stats import RoutingStats
from grace_ds.runtime import GraceRuntime


def log_replan(record: dict) -> None:
    if faults.job_rank() != 0:
        return
    try:
        import wandb
    except ImportError:
        wandb = None
    if wandb is not None and wandb.run is not None:
        wandb.log({f"grace_moe/online/{k}": v for k, v in record.items() if isinstance(v, (int, float, bool))})
    if record.get("moves"):
        effect = (f", modeled layer time {record['modeled_time_before_us']:.0f} -> "
                  f"{record['modeled_time_after_us']:.0f} us" if "modeled_time_after_us" in record else "")
        print(f"[grace_moe] step {record['step']}: drift {record['drift']:.3f}, moved {record['moves']} expert "
              f"copies ({record['bytes_moved'] / 2**20:.1f} MiB) in {record['transfer_s']:.2f} s{effect}", flush=True)


def attach_recorder(model: torch.nn.Module, runtime: GraceRuntime | None = None) -> RoutingStats:
    """Profiling hooks on a model's MoE layers: transformers sparse MoE blocks (plain or converted to
    GRACE), or deepspeed.moe.layer.MoE layers (GraceMoE layers report through their runtime)."""
    from deepspeed.moe.layer import MoE

    from grace_ds.deepspeed_moe import GraceMoE

    blocks = find_moe_blocks(model)
    if blocks:
        num_experts = (runtime.plan.num_experts if runtime is not None
                       else int(blocks[0][1].experts.gate_up_proj.shape[0]))
        recorder = RoutingStats(len(blocks), num_experts, top_k_of(model), model_name=type(model).__name__,
                                layer_names=[name for name, _ in blocks])
        if runtime is not None:
            runtime.observers.append(recorder.observe)
        else:
            recorder.attach_to_routers(blocks)
        return recorder
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise GraceInputError(f"no supported MoE layer in {type(model).__name__} to profile")
    first = layers[0][1]
    recorder = RoutingStats(len(layers), first.num_experts, first.deepspeed_moe.gate.k,
                            model_name=type(model).__name__, layer_names=[name for name, _ in layers])
    native = [m for _, m in layers if not isinstance(m, GraceMoE)]
    if len(native) not in (0, len(layers)):
        raise GraceInputError("profiling a model that mixes GraceMoE and DeepSpeed MoE layers is not supported")
    if native:
        recorder.attach_to_deepspeed_gates(native)
        return recorder
    # GraceMoE layers report (plan layer, picks) through their runtimes; map plan layers to our order.
    index_of = {(id(m.deepspeed_moe._runtime), m.deepspeed_moe.layer): i for i, (_, m) in enumerate(layers)}
    for runtime_of_layer in {id(m.deepspeed_moe._runtime): m.deepspeed_moe._runtime for _, m in layers}.values():
        key = id(runtime_of_layer)
        runtime_of_layer.observers.append(
            lambda plan_layer, ids, slots, key=key: recorder.observe(index_of[(key, plan_layer)], ids))
    return recorder


def save_profile(engine, path: str | os.PathLike | None = None) -> Path:
    """Reduce the engine's recorder over all ranks and write the profile (rank 0 writes)."""
    recorder = getattr(engine, "grace_recorder", None)
    if recorder is None:
        raise GraceInputError("profiling is off: set grace_moe.profiling to true")
    target = path or getattr(getattr(engine, "grace_config", None), "profile_out", None)
    if target is None:
        raise GraceInputError("no path for the profile: pass one or set grace_moe.profile_out")
    profile = recorder.to_profile(getattr(engine, "grace_group", None))
    if faults.job_rank() == 0:
        profile.save(target)
    return Path(target)
