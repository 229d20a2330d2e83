"""transformers' Trainer over GRACE layers: `GraceTrainer`, or `GraceTrainerMixin` in front of another Trainer
subclass (TRL's SFTTrainer, ...), trains a transformers MoE model under the `grace_moe` section of the
DeepSpeed JSON given as `TrainingArguments(deepspeed=...)`, launched as any Trainer script is
(`deepspeed --num_nodes N --num_gpus G train.py --deepspeed ds.json`, torchrun, accelerate launch).

What it changes in Trainer, and why:
- construction: the model's MoE blocks get this rank's GRACE expert slots (grace_ds.deepspeed.convert_for_training)
  before Trainer builds its optimizer, so the optimizer holds the served slots, not the unmodified experts; given
  as its checkpoint directory (`GraceTrainer(model="DIR", ...)`), each rank reads only the dense weights and its
  slots' experts (grace_ds.models.rank_load), so a model larger than one GPU can be fine-tuned;
- `accelerator.prepare` (grace_ds.hf_accelerate.prepare_through_grace): the optimizer's parameter groups
  (Trainer's AdamW with its decay groups, or the DeepSpeed config's optimizer) are split into DeepSpeed's MoE
  groups, which ZeRO needs, and the DeepSpeed engine it returns gets GRACE's training hooks (replicas kept equal,
  exact clipping, the checkpoint layout record) before Trainer resumes from a checkpoint; `checkpoint-N/`
  resumes under any plan;
- `save_model` (also each checkpoint's model files): the unmodified transformers checkpoint, every expert gathered
  (grace_ds.models.export), which `from_pretrained` loads without GRACE;
- with `"profiling": true`: each `checkpoint-N/` also holds the run's routing so far (`routing_profile.safetensors`,
  every rank's tokens), so `grace-ds plan --profile checkpoint-N/routing_profile.safetensors` makes a plan from the
  run's own routing to resume under; `profile_out`, if set, gets the whole run's at the end;
- `log`: each training log carries GRACE's traffic and load over the training steps since the previous one
  (`grace_moe/forward_cross_node_MB_per_step`, `grace_moe/forward_same_node_MB_per_step`,
  `grace_moe/load_max_over_mean`; evaluation and prediction forwards are not counted), so every `report_to`
  integration (W&B, TensorBoard, ...) plots them.
Without a `grace_moe` section (or with `"enabled": false`) it is transformers' Trainer. On CPU (DeepSpeed's CPU
accelerator, gloo) pass `**cpu_process_state()` to TrainingArguments (grace_ds.hf_accelerate says why).
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from grace_ds.deepspeed import attach_to_engine, load_for_training
from grace_ds.deepspeed_config import GraceMoEConfig, split_config
from grace_ds.deepspeed_monitoring import save_profile
from grace_ds.errors import GraceInputError
from grace_ds.hf_accelerate import convert_for_deepspeed_plugin, cpu_process_state, prepare_through_grace
from grace_ds.models.export import save_pretrained
from grace_ds.runtime import GraceRuntime
from grace_ds.training_monitor import TrainingMonitor

__all__ = ["GraceTrainer", "GraceTrainerMixin", "LOG_PREFIX", "PROFILE_FILE", "cpu_process_state"]

LOG_PREFIX = "grace_moe/"
PROFILE_FILE = "routing_profile.safetensors"  # in each checkpoint-N/ of a run with grace_moe.profiling


class GraceTrainerMixin:
    """GRACE-MoE for a transformers Trainer class: `class MyTrainer(GraceTrainerMixin, SFTTrainer)`.
    After construction: `grace_config` (the section, or None), `grace_runtime` (the converted model's runtime,
    or None); after the engine is made: `grace_engine`, and `grace_monitor` behind the logged figures."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], (str, os.PathLike)):
            args = (_model_from_directory(args[0], kwargs.get("args", args[1] if len(args) > 1 else None)), *args[1:])
        elif isinstance(kwargs.get("model"), (str, os.PathLike)):
            kwargs["model"] = _model_from_directory(kwargs["model"], kwargs.get("args"))
        super().__init__(*args, **kwargs)
        self.grace_config: GraceMoEConfig | None = None
        self.grace_runtime: GraceRuntime | None = None
        self.grace_engine = self.grace_monitor = None
        if not self.is_deepspeed_enabled:  # GRACE trains through DeepSpeed's engine and its MoE groups
            return
        plugin = self.accelerator.state.deepspeed_plugin
        _, self.grace_config = split_config(plugin.deepspeed_config)  # DeepSpeed itself ignores the section
        section = self.grace_config
        serving = section is not None and section.enabled and bool(section.plan or section.profile)
        if serving and self.args.save_on_each_node:
            raise GraceInputError("grace_moe: the exported checkpoint is written by the job's first rank alone; "
                                  "set save_on_each_node=False (output_dir on storage every node reads)")
        self.grace_runtime = convert_for_deepspeed_plugin(self.model, plugin, self.args.world_size)
        if self.grace_runtime is not None and section.profiling:
            self.add_callback(_RoutingProfiles(self))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        prepare = self.accelerator.prepare
        self.accelerator.prepare = functools.wraps(prepare)(
            functools.partial(prepare_through_grace, self.accelerator, prepare, self._attach))

    def _attach(self, engine) -> None:
        attach_to_engine(engine, self.grace_config)
        self.grace_engine = engine
        self.grace_monitor = TrainingMonitor(engine, engine.grace_runtimes, 0)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # Trainer logs training figures on every rank together ("loss" is gathered): the figures' reduction too.
        if self.grace_monitor is not None and "loss" in logs:
            logs = {**logs, **{LOG_PREFIX + name: value for name, value in self.grace_monitor.collect().items()
                               if not isinstance(value, list)}}
        super().log(logs, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any):
        with self._forwards_uncounted():  # the logged figures are the training steps' alone
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        with self._forwards_uncounted():
            return super().predict(*args, **kwargs)

    @contextlib.contextmanager
    def _forwards_uncounted(self):
        runtimes = getattr(self.grace_engine, "grace_runtimes", [])
        counting = [runtime.count_traffic for runtime in runtimes]
        for runtime in runtimes:
            runtime.count_traffic = False
        try:
            yield
        finally:
            for runtime, flag in zip(runtimes, counting):
                runtime.count_traffic = flag

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


def _model_from_directory(directory: str | os.PathLike, args) -> torch.nn.Module:
    """A checkpoint directory in place of the model: with a grace_moe plan in args.deepspeed, each rank reads only
    the dense weights and its slots' experts (grace_ds.deepspeed.load_for_training); otherwise loaded whole."""
    section = split_config(args.deepspeed)[1] if args is not None and args.deepspeed else None
    if section is not None and section.enabled and (section.plan or section.profile):
        return load_for_training(directory, section)
    from grace_ds.profiling import load_model

    return load_model(directory)[0]


class GraceTrainer(GraceTrainerMixin, transformers.Trainer):
    """transformers.Trainer with GRACE-MoE (see the module's docstring)."""


class _RoutingProfiles(transformers.TrainerCallback):
    """The routing recorded so far into each checkpoint, and into `profile_out` at the end. Trainer calls these on
    every rank at the same step: the profile's reduction over ranks rides on that."""

    def __init__(self, trainer: GraceTrainerMixin) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        engine = self.trainer.grace_engine
        if engine is not None and getattr(engine, "grace_recorder", None) is not None:
            prefix = transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
            checkpoint = Path(args.output_dir, f"{prefix}-{state.global_step}")
            save_profile(engine, checkpoint / PROFILE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        engine = self.trainer.grace_engine
        recording = engine is not None and getattr(engine, "grace_recorder", None) is not None
        if recording and self.trainer.grace_config.profile_out:
            save_profile(engine)
