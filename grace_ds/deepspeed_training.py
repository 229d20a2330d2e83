"""A DeepSpeed training engine over GRACE layers: replicas kept equal, one norm per logical expert.

`attach_training(engine, runtimes, monitor_interval_steps)` (grace_ds.deepspeed.initialize calls it) makes
five changes:
- after every optimizer step (and after load_checkpoint) the primaries' weights are copied into their
  replicas (GraceRuntime.sync_replica_weights), so every copy serves the same expert;
- fp32 without ZeRO: DeepSpeed clips by the mean over ranks of each rank's own gradient norm, which
  depends on where experts live; GRACE clips by the exact global norm (each dense parameter once, each
  logical expert once: replicas' gradients are zero, see grace_ds.replica_sync), as DeepSpeed's ZeRO
  and bf16 optimizers and torch's clip_grad_norm_ on one process do;
- save_checkpoint records the served layout and load_checkpoint fills every slot with its logical
  expert's weights and optimizer states under any saved layout (grace_ds.deepspeed_checkpoint);
- `engine.grace_runtimes` lists the runtimes, and `engine.max_replica_difference()` reports how far
  the copies of any expert are apart (0.0 after every step);
- with a DeepSpeed monitor enabled, GRACE's traffic and load go to it every few steps
  (`engine.grace_monitor`, grace_ds.training_monitor).
"""
from __future__ import annotations

import functools
import types

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.deepspeed_checkpoint import attach_checkpointing
from grace_ds.runtime import GraceRuntime
from grace_ds.training_monitor import TrainingMonitor


def runtimes_of(model: torch.nn.Module) -> list[GraceRuntime]:
    """Every GraceRuntime a model's GRACE layers use, in model order, each once."""
    found: dict[int, GraceRuntime] = {}
    for module in model.modules():
        runtime = getattr(module, "_runtime", None)
        if isinstance(runtime, GraceRuntime):
            found.setdefault(id(runtime), runtime)
    return list(found.values())


def attach_training(engine, runtimes: list[GraceRuntime], monitor_interval_steps: int) -> None:
    engine.grace_runtimes = runtimes
    monitor = getattr(engine, "monitor", None)
    engine.grace_monitor = (TrainingMonitor(engine, runtimes, monitor_interval_steps)
                            if monitor is not None and monitor.enabled and monitor_interval_steps > 0 else None)

    def sync_replicas() -> None:
        for runtime in runtimes:
            runtime.sync_replica_weights()

    step = engine.step

    @functools.wraps(step)
    def step_and_sync(*args, **kwargs):
        before = engine.global_steps
        result = step(*args, **kwargs)
        if engine.global_steps != before:  # an optimizer step ran (not a gradient-accumulation micro step)
            sync_replicas()
            if engine.grace_monitor is not None:
                engine.grace_monitor.after_step()
        return result

    attach_checkpointing(engine)  # under the sync below: replicas are synced after the remapped load too
    load = engine.load_checkpoint

    @functools.wraps(load)
    def load_and_sync(*args, **kwargs):
        result = load(*args, **kwargs)
        sync_replicas()  # ZeRO restores from its fp32 partitions, where replicas kept their own values
        return result

    engine.step, engine.load_checkpoint = step_and_sync, load_and_sync
    engine.clip_fp32_gradients = types.MethodType(_clip_by_global_norm, engine)
    engine.max_replica_difference = lambda: max((r.max_replica_difference() for r in runtimes), default=0.0)


def global_grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of every gradient of the job, each value counted once: dense gradients are the same on
    every rank (after DeepSpeed's data-parallel reduction) and count once; an expert parameter's gradient
    lives on its expert-parallel rank, repeated once per expert-parallel group (data parallel)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    with_grad = [p for p in parameters if p.grad is not None]
    device = with_grad[0].grad.device if with_grad else torch.device("cpu")
    dense = torch.zeros((), dtype=torch.float64, device=device)
    expert = torch.zeros((), dtype=torch.float64, device=device)
    distributed = faults.distributed()
    for param in with_grad:
        square = param.grad.detach().double().pow(2).sum()
        if is_moe_param(param):
            # One of as many equal copies as the expert's data-parallel group has ranks.
            expert += square / (groups._get_expert_data_parallel_world_size(param.group_name) if distributed else 1)
        else:
            dense += square
    if distributed:
        dist.all_reduce(expert)
    return (dense + expert).sqrt()


def _clip_by_global_norm(engine) -> None:
    """engine.clip_fp32_gradients for GRACE: torch's rule (coefficient max_norm / (norm + 1e-6), at most 1)
    over the exact global norm, which engine.get_global_grad_norm() then reports (DeepSpeed leaves it None here)."""
    parameters = [p for p in engine.module.parameters() if p.grad is not None]
    norm = global_grad_norm(parameters)
    engine._global_grad_norm = float(norm)
    coefficient = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
    for param in parameters:
        param.grad.mul_(coefficient.to(param.grad.dtype))
