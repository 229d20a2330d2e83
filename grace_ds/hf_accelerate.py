"""accelerate's DeepSpeed path through GRACE: `GraceAccelerator` for training loops written with accelerate, and
the pieces grace_ds.transformers_trainer shares (checks, the prepare step, CPU set-up).

    accelerator = GraceAccelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config="ds.json"))  # JSON with grace_moe
    model = accelerator.convert(model)                  # this rank's expert slots, before the optimizer is built
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)   # model: DeepSpeed's engine
    ... accelerator.backward(loss); optimizer.step() ...
    accelerator.save_pretrained(model, "trained")       # the unmodified transformers checkpoint

`prepare` splits the optimizer's parameter groups into DeepSpeed's MoE groups (ZeRO needs them) and gives the
engine GRACE's training hooks (grace_ds.deepspeed.attach_to_engine); the `grace_moe` section is out of the config
during accelerate's own prepare, which fills every "auto" value of the JSON and stops at one it has no value
for ("communication": "auto").
"""
from __future__ import annotations

import os
from typing import Any, Callable

import accelerate
import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.deepspeed import attach_to_engine, convert_for_training, moe_param_groups
from grace_ds.deepspeed_config import SECTION, split_config
from grace_ds.deepspeed_training import runtimes_of
from grace_ds.errors import GraceInputError
from grace_ds.models import find_moe_blocks
from grace_ds.models.export import save_pretrained
from grace_ds.runtime import GraceRuntime
from grace_ds.training_monitor import TrainingMonitor

__all__ = ["GraceAccelerator", "convert_for_deepspeed_plugin", "cpu_process_state", "prepare_through_grace"]


class GraceAccelerator(accelerate.Accelerator):
    """accelerate.Accelerator with GRACE-MoE on its DeepSpeed plugin (see the module's docstring). Attributes:
    `grace_config` (the section or None), `grace_runtime` after `convert`, `grace_engine` after `prepare`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plugin = self.state.deepspeed_plugin
        if plugin is None:
            raise GraceInputError("GraceAccelerator trains through DeepSpeed: pass deepspeed_plugin=DeepSpeedPlugin("
                                  "hf_ds_config=...) with the grace_moe section in its JSON")
        _, self.grace_config = split_config(plugin.deepspeed_config)
        self.grace_runtime: GraceRuntime | None = None
        self.grace_engine = self._grace_monitor = None

    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with this rank's GRACE expert slots (in place); build the optimizer after this."""
        self.grace_runtime = convert_for_deepspeed_plugin(model, self.state.deepspeed_plugin, self.num_processes)
        return model

    def prepare(self, *args: Any, **kwargs: Any):
        return prepare_through_grace(self, super().prepare, self._attach, *args, **kwargs)

    def _attach(self, engine) -> None:
        attach_to_engine(engine, self.grace_config)
        self.grace_engine = engine
        runtimes = getattr(engine, "grace_runtimes", [])
        self._grace_monitor = TrainingMonitor(engine, runtimes, 0) if runtimes else None

    def grace_figures(self) -> dict[str, float]:
        """GRACE's traffic and load per optimizer step since the last call (collective: every rank calls it)."""
        if self._grace_monitor is None:
            return {}
        return {name: value for name, value in self._grace_monitor.collect().items() if not isinstance(value, list)}

    def save_pretrained(self, model: Any, directory: str | os.PathLike, **kwargs: Any) -> None:
        """The unmodified transformers checkpoint of a converted model or its engine (collective)."""
        save_pretrained(model, directory, **kwargs)


def convert_for_deepspeed_plugin(model: torch.nn.Module, plugin, processes: int) -> GraceRuntime | None:
    """Convert `model` under the plugin's `grace_moe` section (None: no section, or off); refuses by name what
    GRACE cannot train there."""
    _, section = split_config(plugin.deepspeed_config)
    if section is None or not section.enabled or not (section.plan or section.profile):
        return None
    if faults.distributed() and processes != dist.get_world_size():
        raise GraceInputError(f"accelerate sees {processes} process(es) of this {dist.get_world_size()}-rank job, so "
                              "every rank would train on the same batches and write the same files (it finds no device "
                              "backend for DeepSpeed on CPU): call grace_ds.hf_accelerate.cpu_process_state() first "
                              "(with Trainer: pass what it returns to TrainingArguments)")
    if plugin.zero_stage == 3:
        raise GraceInputError("grace_moe: ZeRO stage 3 partitions every parameter across the job, while GRACE "
                              "places each expert on its GPUs (DeepSpeed's MoE refuses stage 3 too): use stage 0-2")
    converted = runtimes_of(model)
    if converted:  # read rank by rank from its directory (grace_ds.deepspeed.load_for_training): converted then
        return converted[0]
    if not find_moe_blocks(model):
        raise GraceInputError(f"grace_moe: {type(model).__name__} has no transformers MoE block to serve "
                              "(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3)")
    return convert_for_training(model, section)


def prepare_through_grace(accelerator, prepare: Callable, on_engine: Callable, *objects: Any, **kwargs: Any):
    """accelerate's `prepare(*objects)` for a model with GRACE layers: optimizers first split into DeepSpeed's MoE
    groups, the section out of the config for the call, then `on_engine(engine)` for each new DeepSpeed engine."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if any(isinstance(obj, torch.nn.Module) and runtimes_of(obj) for obj in objects):
        for obj in objects:
            _group_for_moe(obj)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = plugin.deepspeed_config if plugin is not None else {}
    section = config.pop(SECTION, None)
    try:
        prepared = prepare(*objects, **kwargs)
    finally:
        if section is not None:
            config[SECTION] = section
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, DeepSpeedEngine) and runtimes_of(obj.module) and not hasattr(obj, "grace_runtimes"):
            on_engine(obj)
    return prepared


def cpu_process_state() -> dict[str, Any]:
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu over gloo: emulated nodes, tests): accelerate finds no device backend
    there and counts one process of the job. This sets accelerate's process state up over gloo for the launched
    job (initialising distributed if needed; in plain `python`, a job of this one process) and returns
    TrainingArguments' keyword arguments that make Trainer use it: `TrainingArguments(..., **cpu_process_state())`;
    an Accelerator made after it uses it as it is. On GPUs nothing of this is needed."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    if PartialState._shared_state and (PartialState().backend != "gloo" or not faults.distributed()):
        AcceleratorState._reset_state(reset_partial_state=True)  # set up otherwise before: anew, as
        # TrainingArguments itself does
    if not faults.distributed() and "WORLD_SIZE" not in os.environ:  # plain `python`: a job of this one process
        from grace_ds.logical_nodes import free_port

        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                            ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(name, value)
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments sets it while it builds the state
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return {"accelerator_config": {"use_configured_state": True}}


def _group_for_moe(obj: Any) -> None:
    """An optimizer on its way to DeepSpeed, its parameter groups split into DeepSpeed's MoE groups (in place):
    a torch optimizer (no step taken yet) or accelerate's placeholder for the config's optimizer."""
    from accelerate.utils import DummyOptim

    if isinstance(obj, DummyOptim):
        params = list(obj.params)
        obj.params = moe_param_groups(params if params and isinstance(params[0], dict) else [{"params": params}])
    elif isinstance(obj, torch.optim.Optimizer) and not any(g.get("moe") for g in obj.param_groups):
        if obj.state:
            raise GraceInputError("grace_moe: the optimizer has stepped before DeepSpeed started; build it afresh")
        groups = moe_param_groups(obj.param_groups)
        obj.param_groups.clear()
        for group in groups:
            obj.add_param_group(group)

