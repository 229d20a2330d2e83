"""transformers' Trainer over GRACE layers: `GraceTrainer`, or `GraceTrainerMixin` in front of another Trainer
subclass (TRL's SFTTrainer, ...), trains a transformers MoE model under the `grace_moe` section of the
DeepSpeed JSON given as `TrainingArguments(deepspeed=...)`, launched as any Trainer script is
(`deepspeed --num_nodes N --num_gpus G train.py --deepspeed ds.json`, torchrun, accelerate launch).

What it changes in Trainer, and why:
- construction: the model's MoE blocks get this rank's GRACE expert slots (grace_ds.deepspeed.convert_for_training)
  before Trainer builds its optimizer, so the optimizer holds the served slots, not the unmodified experts;
- `accelerator.prepare`: the optimizer's parameter groups (Trainer's AdamW with its decay groups, or the DeepSpeed
  config's optimizer) are split into DeepSpeed's MoE groups, which ZeRO needs, and the DeepSpeed engine it returns
  gets GRACE's training hooks (grace_ds.deepspeed.attach_to_engine: replicas kept equal, exact clipping, the
  checkpoint layout record) before Trainer resumes from a checkpoint; `checkpoint-N/` resumes under any plan;
- `save_model` (also each checkpoint's model files): the unmodified transformers checkpoint, every expert gathered
  (grace_ds.models.export), which `from_pretrained` loads without GRACE;
- `log`: each training log carries GRACE's traffic and load over the steps since the previous one
  (`grace_moe/forward_cross_node_MB_per_step`, `grace_moe/forward_same_node_MB_per_step`,
  `grace_moe/load_max_over_mean`), so every `report_to` integration (W&B, TensorBoard, ...) plots them.
Without a `grace_moe` section (or with `"enabled": false`) it is transformers' Trainer.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist
import transformers

from grace_ds import faults
from grace_ds.deepspeed import attach_to_engine, convert_for_training, moe_param_groups
from grace_ds.deepspeed_config import SECTION, GraceMoEConfig, split_config
from grace_ds.deepspeed_training import runtimes_of
from grace_ds.errors import GraceInputError
from grace_ds.models import find_moe_blocks
from grace_ds.models.export import save_pretrained
from grace_ds.runtime import GraceRuntime
from grace_ds.training_monitor import TrainingMonitor

__all__ = ["GraceTrainer", "GraceTrainerMixin", "LOG_PREFIX", "cpu_process_state"]

LOG_PREFIX = "grace_moe/"


class GraceTrainerMixin:
    """GRACE-MoE for a transformers Trainer class: `class MyTrainer(GraceTrainerMixin, SFTTrainer)`.
    After construction: `grace_config` (the section, or None), `grace_runtime` (the converted model's runtime,
    or None); after the engine is made: `grace_engine`, and `grace_monitor` behind the logged figures."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grace_config: GraceMoEConfig | None = None
        self.grace_runtime: GraceRuntime | None = None
        self.grace_engine = self.grace_monitor = None
        if not self.is_deepspeed_enabled:  # GRACE trains through DeepSpeed's engine and its MoE groups
            return
        plugin = self.accelerator.state.deepspeed_plugin
        _, self.grace_config = split_config(plugin.deepspeed_config)  # DeepSpeed itself ignores the section
        section = self.grace_config
        if section is None or not section.enabled or not (section.plan or section.profile):
            return
        if faults.distributed() and self.args.world_size != dist.get_world_size():
            raise GraceInputError(f"Trainer sees {self.args.world_size} process(es) of this {dist.get_world_size()}-rank "
                                  "job, so every rank would train on the same batches and write the same files (accelerate "
                                  "finds no device backend for DeepSpeed on CPU): call grace_ds.transformers_trainer."
                                  "cpu_process_state() before TrainingArguments and pass what it returns")
        if plugin.zero_stage == 3:
            raise GraceInputError("grace_moe: ZeRO stage 3 partitions every parameter across the job, while GRACE "
                                  "places each expert on its GPUs (DeepSpeed's MoE refuses stage 3 too): use stage 0-2")
        if self.args.save_on_each_node:
            raise GraceInputError("grace_moe: the exported checkpoint is written by the job's first rank alone; "
                                  "set save_on_each_node=False (output_dir on storage every node reads)")
        if not find_moe_blocks(self.model):
            raise GraceInputError(f"grace_moe: {type(self.model).__name__} has no transformers MoE block to serve "
                                  "(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3)")
        self.grace_runtime = convert_for_training(self.model, section)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        prepare = self.accelerator.prepare

        @functools.wraps(prepare)
        def prepare_with_grace(*objects: Any, **kwargs: Any):
            if getattr(self, "model", None) is not None and runtimes_of(self.model):
                for obj in objects:
                    _group_for_moe(obj)
            prepared = _without_section(self.accelerator, prepare, *objects, **kwargs)
            for obj in prepared if isinstance(prepared, tuple) else (prepared,):
                if _is_engine(obj) and obj is not self.grace_engine:
                    self._attach(obj)
            return prepared

        self.accelerator.prepare = prepare_with_grace

    def _attach(self, engine) -> None:
        attach_to_engine(engine, self.grace_config)
        self.grace_engine = engine
        runtimes = getattr(engine, "grace_runtimes", [])
        self.grace_monitor = TrainingMonitor(engine, runtimes, 0) if runtimes else None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Trainer logs training figures on every rank together ("loss" is gathered): the figures' reduction too.
        if self.grace_monitor is not None and "loss" in logs:
            logs = {**logs, **{LOG_PREFIX + name: value for name, value in self.grace_monitor.collect().items()
                               if not isinstance(value, list)}}
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The unmodified transformers checkpoint (collective: every rank calls it, as Trainer does)."""
        if self.grace_runtime is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_pretrained(self.model, output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class GraceTrainer(GraceTrainerMixin, transformers.Trainer):
    """transformers.Trainer with GRACE-MoE (see the module's docstring)."""


def cpu_process_state() -> dict[str, Any]:
    """DeepSpeed on CPU (DS_ACCELERATOR=cpu over gloo: emulated nodes, tests): accelerate finds no device backend
    there and gives Trainer one process of the job. This sets accelerate's process state up over gloo for the
    launched job (initialising distributed if needed) and returns TrainingArguments' keyword arguments that make
    Trainer use it: `TrainingArguments(..., **cpu_process_state())`. On GPUs nothing of this is needed."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    if PartialState._shared_state and (PartialState().backend != "gloo" or not faults.distributed()):
        AcceleratorState._reset_state(reset_partial_state=True)  # set up otherwise before: anew, as
        # TrainingArguments itself does
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


def _without_section(accelerator, prepare, *objects: Any, **kwargs: Any):
    """accelerate's prepare with the grace_moe section out of the DeepSpeed config for the call: accelerate fills
    every "auto" value of the config ("communication": "auto" too) and stops at any it has no value for."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = plugin.deepspeed_config if plugin is not None else {}
    section = config.pop(SECTION, None)
    try:
        return prepare(*objects, **kwargs)
    finally:
        if section is not None:
            config[SECTION] = section


def _is_engine(obj: Any) -> bool:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(obj, DeepSpeedEngine)


def _group_for_moe(obj: Any) -> None:
    """An optimizer on its way to DeepSpeed, its parameter groups split into DeepSpeed's MoE groups (in place):
    Trainer's own (a torch optimizer, no step taken yet) or the placeholder for the config's optimizer."""
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
