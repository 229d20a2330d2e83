"""The layout record of a DeepSpeed checkpoint of GRACE layers (`grace_layout.json` in the tag directory).

DeepSpeed files a GRACE layer's experts by physical slot, so a checkpoint means something only together
with the layout it was saved under. The record keeps it: per DeepSpeed MoE layer, in DeepSpeed's
moe_layer_id order, which logical expert each file (slot) holds and which copy is the primary, and for
optimizers that keep a state per parameter their parameter names in index order per expert-parallel
rank. Without a record the layout is told from the files (`saved_layout`). Pure reading and writing:
grace_ds.deepspeed_checkpoint applies it to engines.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from grace_ds.errors import GraceInputError
from grace_ds.files import atomic_write_text, read_json

LAYOUT_FILE = "grace_layout.json"
LAYOUT_FORMAT = "grace_ds.checkpoint_layout"
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class LayerLayout:
    """One DeepSpeed MoE layer's expert files. kind "grace": slot_expert [gpus][slots] (-1 empty) and
    slot_is_primary, file id = gpu * slots_per_gpu + slot; kind "deepspeed": file id = logical expert
    (slots_per_gpu = DeepSpeed's experts per rank, None when unknown)."""

    kind: str
    num_experts: int
    slots_per_gpu: int | None = None
    slot_expert: tuple[tuple[int, ...], ...] | None = None
    slot_is_primary: tuple[tuple[bool, ...], ...] | None = None

    def file_experts(self) -> list[int]:
        """Logical expert held by each file id (-1: an empty slot)."""
        if self.kind == "deepspeed":
            return list(range(self.num_experts))
        return [expert for row in self.slot_expert for expert in row]

    def file_of_expert(self) -> dict[int, int]:
        """Logical expert -> the file to read it from (its primary copy's)."""
        if self.kind == "deepspeed":
            return {e: e for e in range(self.num_experts)}
        primary = [flag for row in self.slot_is_primary for flag in row]
        return {e: file for file, (e, first) in enumerate(zip(self.file_experts(), primary)) if e >= 0 and first}

    def same_files(self, other: "LayerLayout") -> bool:
        """Whether both lay out the same expert in every file (and, where both are known, as many per rank:
        the optimizer files follow ranks)."""
        known = self.slots_per_gpu is not None and other.slots_per_gpu is not None
        return self.file_experts() == other.file_experts() and (not known or self.slots_per_gpu == other.slots_per_gpu)

    def describe(self) -> str:
        if self.kind == "deepspeed":
            return f"DeepSpeed's layout (file id = logical expert, {self.num_experts} experts)"
        gpus = len(self.slot_expert)
        copies = sum(e >= 0 for e in self.file_experts())
        return f"a GRACE plan ({gpus} GPUs x {self.slots_per_gpu} slots, {copies} copies of {self.num_experts} experts)"

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_experts": self.num_experts, "slots_per_gpu": self.slots_per_gpu,
                "slot_expert": self.slot_expert, "slot_is_primary": self.slot_is_primary}

    @classmethod
    def from_json(cls, entry: dict, source: str) -> "LayerLayout":
        try:
            rows = entry.get("slot_expert")
            flags = entry.get("slot_is_primary")
            slots = entry.get("slots_per_gpu")
            layout = cls(str(entry["kind"]), int(entry["num_experts"]), None if slots is None else int(slots),
                         None if rows is None else tuple(tuple(int(e) for e in row) for row in rows),
                         None if flags is None else tuple(tuple(_flag(f) for f in row) for row in flags))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise GraceInputError(f"{source}: malformed layer entry {str(entry)[:200]} ({error})") from None
        problem = layout._problem()
        if problem:
            raise GraceInputError(f"{source}: {problem}")
        return layout

    def _problem(self) -> str:
        """'' for a layout a load can follow, else what is wrong with it."""
        if self.kind not in ("grace", "deepspeed") or self.num_experts < 1:
            return f"layer kind {self.kind!r} with {self.num_experts} experts (kinds: grace, deepspeed; >= 1 expert)"
        if self.slots_per_gpu is not None and self.slots_per_gpu < 1:
            return f"slots_per_gpu {self.slots_per_gpu}"
        if self.kind == "deepspeed":
            return ""
        rows, flags = self.slot_expert, self.slot_is_primary
        if not rows or flags is None or [len(r) for r in rows] != [len(f) for f in flags] \
                or {len(r) for r in rows} != {self.slots_per_gpu}:
            return f"a GRACE layer needs slot_expert and slot_is_primary of [GPUs][{self.slots_per_gpu}] alike"
        experts = self.file_experts()
        primary = [flag for row in flags for flag in row]
        if any(not -1 <= e < self.num_experts for e in experts) or any(f and e < 0 for e, f in zip(experts, primary)):
            return f"slot experts must be -1 (empty) or below {self.num_experts}, primaries only in held slots"
        primaries = sorted(e for e, f in zip(experts, primary) if f)
        if primaries != list(range(self.num_experts)):
            return f"every expert needs exactly one primary copy (primaries held: {primaries[:20]})"
        return ""


def plan_layer_layout(plan, layer: int) -> LayerLayout:
    """The files a GRACE layer serving `plan`'s layer `layer` saves (plan: a PlacementPlan)."""
    return LayerLayout("grace", plan.num_experts, plan.slots_per_gpu,
                       tuple(tuple(row) for row in plan.slot_expert[layer].tolist()),
                       tuple(tuple(row) for row in plan.slot_is_primary[layer].tolist()))


def describe_checkpoint(directory: str | os.PathLike, plan=None) -> list[str]:
    """Lines on a checkpoint tag folder saved by a grace_ds engine: each MoE layer's layout, the saving
    job's size, which optimizer files are there and whether their parameter order is recorded; with a
    PlacementPlan, what loading under it would remap (`grace-ds checkpoint-info`)."""
    directory = Path(directory)
    record = directory / LAYOUT_FILE
    if not record.is_file():
        raise GraceInputError(f"{directory}: no {LAYOUT_FILE}: not a checkpoint saved by a grace_ds engine")
    saved = read_record(record)
    layouts, order, world = saved.layers, saved.optimizer_order, saved.world_size
    zero_files = sorted(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    expert_rank_files = sorted(directory.glob("expp_rank_*_optim_states.pt"))
    lines = [f"{directory}: saved by {world if world is not None else 'an unrecorded number of'} ranks, "
             f"{len(layouts)} MoE layers"]
    lines += [f"  MoE layer {i}: {layout.describe()}" for i, layout in enumerate(layouts)]
    if zero_files:
        lines.append(f"  optimizer: ZeRO partitions, {len(zero_files)} files (one a rank)")
    elif expert_rank_files:
        recorded = "recorded" if order is not None else "NOT recorded: not remapped under another plan"
        lines.append(f"  optimizer: one file per expert-parallel rank ({len(expert_rank_files)}), "
                     f"parameter order {recorded}")
    else:
        lines.append("  optimizer: no optimizer files")
    if plan is not None:
        served = [plan_layer_layout(plan, layer) for layer in range(plan.num_layers)]
        if len(served) != len(layouts):
            raise GraceInputError(f"{directory}: {len(layouts)} MoE layers saved, the plan has {len(served)}")
        change = difference(layouts, served)
        if zero_files:
            states = ", and its optimizer states (ZeRO partitions: in a job of any size)"
        elif expert_rank_files and order is not None:
            states = ", and its optimizer states (per parameter, by name: in a job of any size)"
        else:
            states = ""
        lines.append("  under the plan: the same layout, loaded as saved" if not change else
                     f"  under the plan: {change}; every slot loads its logical expert's weights{states}")
    return lines


def write_layout(path: str | os.PathLike, layouts: list[LayerLayout],
                 optimizer_order: dict[int, list[str]] | None = None, world_size: int | None = None) -> None:
    """optimizer_order: a per-parameter optimizer's parameter names in index order, per expert-parallel rank;
    world_size: the saving job's ranks (DeepSpeed's optimizer files are per rank)."""
    record = {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "layers": [layout.to_json() for layout in layouts]}
    if optimizer_order is not None:
        record["optimizer_parameters"] = {str(rank): names for rank, names in sorted(optimizer_order.items())}
    if world_size is not None:
        record["world_size"] = world_size
    atomic_write_text(path, json.dumps(record, indent=1))


@dataclass(frozen=True)
class LayoutRecord:
    """What a checkpoint says of its layout: the MoE layers', the per-parameter optimizer's parameter names in
    index order per expert-parallel rank (None: not recorded), and the saving job's ranks (None: not recorded)."""
    layers: list[LayerLayout]
    optimizer_order: dict[int, list[str]] | None = None
    world_size: int | None = None


def read_record(path: str | os.PathLike) -> LayoutRecord:
    """The record file, read and checked once."""
    record = read_json(path, "checkpoint layout")
    if not isinstance(record, dict) or record.get("format") != LAYOUT_FORMAT:
        raise GraceInputError(f"{path}: not a {LAYOUT_FORMAT} record")
    if record.get("version") != LAYOUT_VERSION:
        raise GraceInputError(f"{path}: version {record.get('version')}, this grace_ds reads {LAYOUT_VERSION}")
    layers = record.get("layers")
    if not isinstance(layers, list):
        raise GraceInputError(f"{path}: 'layers' must be a list of MoE layer entries")
    return LayoutRecord([LayerLayout.from_json(entry, str(path)) for entry in layers],
                        _optimizer_order(record.get("optimizer_parameters"), path),
                        _world_size(record.get("world_size"), path))


def _optimizer_order(order, path) -> dict[int, list[str]] | None:
    if order is None:
        return None
    if not isinstance(order, dict) or any(not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                                          for names in order.values()):
        raise GraceInputError(f"{path}: optimizer_parameters must map expert-parallel ranks to lists of names")
    try:
        return {int(rank): names for rank, names in order.items()}
    except ValueError as error:
        raise GraceInputError(f"{path}: optimizer_parameters has a rank that is not a number ({error})") from None


def _world_size(world, path) -> int | None:
    if world is not None and (not isinstance(world, int) or isinstance(world, bool) or world < 1):
        raise GraceInputError(f"{path}: world_size must be a positive whole number, got {world!r}")
    return world


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"primary flag {value!r} is not true or false")
    return value


def saved_layout(directory: str | os.PathLike, served: list[LayerLayout]) -> LayoutRecord:
    """The layout a checkpoint tag directory was saved under: its record, or without one told from its files
    (no optimizer order, no job size)."""
    directory = Path(directory)
    if (directory / LAYOUT_FILE).is_file():
        record = read_record(directory / LAYOUT_FILE)
        if len(record.layers) != len(served):
            raise GraceInputError(f"{directory}: saved with {len(record.layers)} MoE layers, "
                                  f"the model has {len(served)}")
        return record
    inferred = []
    for layer_id, layout in enumerate(served):
        files = len(list(directory.glob(f"layer_{layer_id}_expert_*_mp_rank_00_model_states.pt")))
        if files == layout.num_experts:  # one file per logical expert: DeepSpeed's own MoE layout
            inferred.append(LayerLayout("deepspeed", layout.num_experts))
        elif files == len(layout.file_experts()):  # a grace_ds checkpoint from before the record
            inferred.append(layout)
        else:
            raise GraceInputError(f"{directory}: MoE layer {layer_id} has {files} expert files and no {LAYOUT_FILE}: "
                                  f"neither DeepSpeed's layout ({layout.num_experts} experts) nor the served one "
                                  f"({len(layout.file_experts())} slots)")
    return LayoutRecord(inferred)


def unrecorded(saved: list[LayerLayout]) -> str:
    """'' when every layer's experts per rank are known (what the optimizer files are cut by), else why not."""
    if any(layout.slots_per_gpu is None for layout in saved):
        return (f"a checkpoint without {LAYOUT_FILE} (DeepSpeed's own MoE's: its experts per rank, which its "
                "optimizer files follow, are not recorded)")
    return ""


def saved_expert_parallel_size(saved: list[LayerLayout]) -> int:
    """The saver's expert-parallel size (DeepSpeed writes one optimizer file per expert-parallel rank: one
    size for every layer)."""
    sizes = {len(layout.file_experts()) // layout.slots_per_gpu if layout.kind == "grace"
             else layout.num_experts // layout.slots_per_gpu for layout in saved if layout.slots_per_gpu}
    if len(sizes) > 1:
        raise GraceInputError(f"the checkpoint's MoE layers were saved with expert-parallel sizes {sorted(sizes)}: "
                              "its optimizer states can be remapped for one size only")
    return sizes.pop() if sizes else 1


def difference(saved: list[LayerLayout], served: list[LayerLayout]) -> str:
    """'' when every layer's files match the served layout, else what differs (first differing layer)."""
    for layer_id, (was, now) in enumerate(zip(saved, served)):
        if not was.same_files(now):
            text = f"MoE layer {layer_id} was saved under {was.describe()}, this engine serves {now.describe()}"
            if was.kind == now.kind == "grace" and len(was.slot_expert) == len(now.slot_expert):
                gpu = next(g for g, (a, b) in enumerate(zip(was.slot_expert, now.slot_expert)) if a != b)
                text += f" (GPU {gpu}'s slots held experts {list(was.slot_expert[gpu])}, now {list(now.slot_expert[gpu])})"
            return text
    return ""
