"""DeepSpeed checkpoints of GRACE layers across placement plans: each slot loads its own logical expert.

DeepSpeed files a GRACE layer's experts by PHYSICAL slot id (`layer_{L}_expert_{rank * slots_per_gpu +
slot}_...`), its own MoE by logical expert id, so `attach_checkpointing(engine)`:
- on save_checkpoint, writes the layout record (grace_ds.checkpoint_layout; one writer, then a barrier);
- on load_checkpoint, reads it (or tells the layout from the files). Same layout as served: DeepSpeed
  loads as it always did. Another layout: during that one call DeepSpeedEngine.load_moe_state_dict is
  replaced by one that fills every slot from the file of its logical expert (the saved primary's;
  replicas from the same file) and restored afterwards, and the optimizer states are remapped the same
  way (grace_ds.optimizer_state_remap: torch optimizers and DeepSpeed's bf16 optimizer without ZeRO,
  ZeRO 1 and 2; other optimizers stop with one GraceInputError). With load_optimizer_states=False or
  load_module_only=True the fp32 master weights are refreshed from the loaded weights, so the next step
  trains the loaded experts.
`export_deepspeed_checkpoint` writes a GRACE checkpoint in DeepSpeed MoE's own layout.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from grace_ds.checkpoint_layout import (LAYOUT_FILE, LayerLayout, plan_layer_layout, read_record,
                                        saved_expert_parallel_size, saved_layout, unrecorded,
                                        write_layout)
from grace_ds.checkpoint_layout import difference as layout_difference
from grace_ds.errors import GraceInputError
from grace_ds.files import atomic_write_bytes, atomic_write_text
from grace_ds.optimizer_state_remap import (Source, expert_parallel_rank, optimizer_states_by_layout,
                                            parameter_order, per_parameter_groups, remappable,
                                            zero_states_across_sizes)

EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_EXPERT_KEY = re.compile(r"^(.*\.?deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)$")


def moe_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """DeepSpeed's MoE layers (GRACE ones included) in moe_layer_id order: DeepSpeed's own walk."""
    from deepspeed.moe.layer import MoE

    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def _grace_layer(module: torch.nn.Module):
    """(runtime, plan layer) of a GRACE layer (GraceMoE, GraceExpertsMoE), None for DeepSpeed's own."""
    from grace_ds.runtime import GraceRuntime

    inner = getattr(module, "deepspeed_moe", None)
    runtime = getattr(inner, "_runtime", None)
    return (runtime, inner.layer) if isinstance(runtime, GraceRuntime) else None


def served_layout(model: torch.nn.Module) -> list[LayerLayout]:
    out = []
    for _, module in moe_layers(model):
        grace = _grace_layer(module)
        if grace is None:
            out.append(LayerLayout("deepspeed", int(module.num_experts), int(module.num_local_experts)))
            continue
        runtime, layer = grace
        out.append(plan_layer_layout(runtime.plan, layer))
    return out


def _expert_file(directory: Path, layer_id: int, file_id: int, mp_rank: int = 0) -> Path:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return Path(DeepSpeedEngine._get_expert_ckpt_name(str(directory.parent), layer_id, file_id, directory.name,
                                                      checkpoint_mp_rank=mp_rank))


def _layer_sources(module: torch.nn.Module, layout: LayerLayout, saved: LayerLayout, layer_id: int) -> list[int | None]:
    """File id to fill each local expert slot from (None: an empty slot, nothing to read)."""
    from deepspeed.utils import groups

    rank = groups._get_expert_parallel_rank(module.expert_group_name)
    if layout.kind == "deepspeed":
        local = module.num_local_experts
        wanted = list(range(rank * local, (rank + 1) * local))
    else:
        wanted = list(layout.slot_expert[rank])
    if saved.num_experts != layout.num_experts:
        raise GraceInputError(f"MoE layer {layer_id}: the checkpoint has {saved.num_experts} experts, "
                              f"the model {layout.num_experts}")
    files = saved.file_of_expert()
    missing = sorted({e for e in wanted if e >= 0} - set(files))
    if missing:
        raise GraceInputError(f"MoE layer {layer_id}: the checkpoint holds no copy of experts {missing}")
    return [files[e] if e >= 0 else None for e in wanted]


def expert_sources(model: torch.nn.Module, saved: list[LayerLayout], served: list[LayerLayout]) -> dict[str, Source]:
    """Every expert parameter this rank holds -> (the saver's expert-parallel rank, its name there) of its
    logical expert's saved primary copy: where its optimizer state is read from."""
    out = {}
    for layer_id, (name, module) in enumerate(moe_layers(model)):
        was = saved[layer_id]
        prefix = f"{name}.{EXPERTS_PREFIX}" if name else EXPERTS_PREFIX
        slots = module.deepspeed_moe.experts.deepspeed_experts
        for local, file_id in enumerate(_layer_sources(module, served[layer_id], was, layer_id)):
            if file_id is None:
                continue  # an empty slot has no parameters
            saver_rank, saver_slot = divmod(file_id, was.slots_per_gpu)
            for suffix, _ in slots[str(local)].named_parameters():
                out[f"{prefix}{local}.{suffix}"] = (saver_rank, f"{prefix}{saver_slot}.{suffix}")
    return out


def _remapped_loader(saved: list[LayerLayout], served: list[LayerLayout]) -> Callable:
    """A DeepSpeedEngine.load_moe_state_dict that reads every slot from its logical expert's file."""

    def load_moe_state_dict(checkpoint_path, tag, state_dict, old_moe_load, model=None, mpu=None, num_experts=1,
                            checkpoint_engine=None, autoep_layers=None, folding_spec=None, checkpoint_mp_rank=None):
        if old_moe_load or autoep_layers:
            raise GraceInputError("a checkpoint of DeepSpeed's legacy or AutoEP expert format cannot be loaded "
                                  "under another GRACE layout")
        if checkpoint_mp_rank is None:
            checkpoint_mp_rank = 0 if mpu is None else mpu.get_model_parallel_rank()
        for layer_id, (name, module) in enumerate(moe_layers(model)):
            cache: dict[int, dict[str, torch.Tensor]] = {}
            slots = module.deepspeed_moe.experts.deepspeed_experts
            for local, source in enumerate(_layer_sources(module, served[layer_id], saved[layer_id], layer_id)):
                if source is None:  # an empty slot keeps its (weightless) state
                    prefix = f"{name}.{EXPERTS_PREFIX}{local}." if name else f"{EXPERTS_PREFIX}{local}."
                    state_dict.update({prefix + k: v for k, v in slots[str(local)].state_dict().items()})
                    continue
                if source not in cache:
                    path = _expert_file(Path(checkpoint_path, str(tag)), layer_id, source, checkpoint_mp_rank)
                    cache[source] = checkpoint_engine.load(str(path), map_location=torch.device("cpu"))
                state_dict.update(_renumbered(cache[source], source, local))

    return load_moe_state_dict


def _renumbered(expert_state: dict[str, torch.Tensor], file_id: int, new_id: int) -> dict[str, torch.Tensor]:
    """An expert file's tensors (`<layer>.deepspeed_moe.experts.deepspeed_experts.<file_id>.<name>`) under
    expert id `new_id` (a local slot when loading, a logical expert when exporting)."""
    out = {}
    for key, value in expert_state.items():
        match = _EXPERT_KEY.match(key)
        if match is None or int(match.group(2)) != file_id:
            raise GraceInputError(f"expert file {file_id} holds key {key!r}, not one of expert {file_id}")
        out[f"{match.group(1)}{new_id}{match.group(3)}"] = value
    return out


@contextlib.contextmanager
def expert_files_by_layout(saved: list[LayerLayout], served: list[LayerLayout]) -> Iterator[None]:
    """During the block, DeepSpeed's engines fill expert slots from `saved`'s files by logical expert."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.__dict__["load_moe_state_dict"]  # the staticmethod object itself
    DeepSpeedEngine.load_moe_state_dict = staticmethod(_remapped_loader(saved, served))
    try:
        yield
    finally:
        DeepSpeedEngine.load_moe_state_dict = original


def _tag_of(load_dir: str, tag) -> str | None:
    """DeepSpeed's rule: no tag means the one in `<load_dir>/latest`."""
    if tag is not None:
        return str(tag)
    latest = Path(load_dir, "latest")
    return latest.read_text().strip() if latest.is_file() else None


def attach_checkpointing(engine) -> None:
    """engine.save_checkpoint records the served layout; engine.load_checkpoint loads by logical expert."""
    save, load = engine.save_checkpoint, engine.load_checkpoint

    @functools.wraps(save)
    def save_with_layout(save_dir, tag=None, *args, **kwargs):
        if not save_dir:
            return save(save_dir, tag, *args, **kwargs)  # DeepSpeed's own error
        tag = str(f"global_step{engine.global_steps}" if tag is None else tag)  # DeepSpeed's default tag
        writer = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
        order = _optimizer_order(engine)  # every rank: a collective
        if writer == 0:
            write_layout(Path(save_dir, tag, LAYOUT_FILE), served_layout(engine.module), order, dist.get_world_size())
        dist.barrier()
        return save(save_dir, tag, *args, **kwargs)

    @functools.wraps(load)
    def load_by_layout(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                       load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        call = functools.partial(load, load_dir, tag, load_module_strict=load_module_strict,
                                 load_optimizer_states=load_optimizer_states,
                                 load_lr_scheduler_states=load_lr_scheduler_states,
                                 load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        resolved = _tag_of(load_dir, tag)
        if resolved is None or not Path(load_dir, resolved).is_dir():
            return call()  # DeepSpeed's own answer (a warning and (None, None), or its error)
        served = served_layout(engine.module)
        record = saved_layout(Path(load_dir, resolved), served)  # the record read once
        saved, saved_world = record.layers, record.world_size
        resized = saved_world not in (None, dist.get_world_size())
        difference = layout_difference(saved, served) or (
            f"saved by a job of {saved_world} ranks, this one has {dist.get_world_size()}" if resized else "")
        optimizer_states = load_optimizer_states and not load_module_only
        if not difference:
            result = call()
        elif optimizer_states:
            # Decided from files, the plan and the config alone: every rank stops here, before any collective.
            reason = remappable(engine) or unrecorded(saved)
            if reason:
                raise GraceInputError(
                    f"{Path(load_dir, resolved)}: {difference}; its optimizer states follow the saved physical "
                    f"slots and are not remapped for {reason}: pass load_optimizer_states=False (expert weights "
                    "remapped, optimizer state fresh) or load_module_only=True, or load under the plan it was saved with")
            order = record.optimizer_order
            sources, saver_ep_size = expert_sources(engine.module, saved, served), saved_expert_parallel_size(saved)
            states = (zero_states_across_sizes(engine, sources, saver_ep_size)
                      if resized and per_parameter_groups(engine.optimizer) is None else
                      optimizer_states_by_layout(engine, sources, saver_ep_size, str(load_dir), resolved, order))
            with expert_files_by_layout(saved, served), states:
                result = call()
        else:
            with expert_files_by_layout(saved, served):
                result = call()
        refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
        if not optimizer_states and refresh is not None:
            refresh()  # DeepSpeed's bf16 optimizer without ZeRO keeps stale fp32 masters otherwise
        return result

    engine.save_checkpoint, engine.load_checkpoint = save_with_layout, load_by_layout


def _optimizer_order(engine) -> dict[int, list[str]] | None:
    """A per-parameter optimizer's parameter names in index order, per expert-parallel rank (ZeRO's
    partitions name their parameters themselves)."""
    if engine.optimizer is None or per_parameter_groups(engine.optimizer) is None or not moe_layers(engine.module):
        return None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (expert_parallel_rank(), parameter_order(engine)))
    return dict(gathered)


def export_deepspeed_checkpoint(directory: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """A GRACE checkpoint tag directory (with its layout record) as DeepSpeed MoE's own layout in
    `out_dir` (a tag directory, named in `<its parent>/latest`): one file per logical expert (its
    primary copy), the model-state files copied. Optimizer files are left out (they follow the slots):
    load with load_optimizer_states=False. Returns the files written."""
    directory, out_dir = Path(directory), Path(out_dir)
    if not (directory / LAYOUT_FILE).is_file():
        raise GraceInputError(f"{directory}: no {LAYOUT_FILE}: not a GRACE checkpoint saved by grace_ds")
    saved = read_record(directory / LAYOUT_FILE).layers
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model_state in sorted(directory.glob("*mp_rank_*_model_states.pt")):
        if not model_state.name.startswith("layer_"):
            atomic_write_bytes(out_dir / model_state.name, model_state.read_bytes())
            written.append(out_dir / model_state.name)
    for layer_id, layout in enumerate(saved):
        for expert, file_id in sorted(layout.file_of_expert().items()):
            source = _expert_file(directory, layer_id, file_id)
            if not source.is_file():
                raise GraceInputError(f"{source}: missing (the layout record names it for expert {expert})")
            state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only
            target = _expert_file(out_dir, layer_id, expert)
            buffer = io.BytesIO()
            torch.save(_renumbered(state, file_id, expert), buffer)
            atomic_write_bytes(target, buffer.getvalue())
            written.append(target)
    atomic_write_text(out_dir.parent / "latest", out_dir.name)  # as DeepSpeed's save: loads without a tag
    return written
