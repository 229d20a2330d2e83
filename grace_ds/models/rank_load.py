"""A transformers MoE checkpoint read for one rank of a plan: the dense weights and this rank's experts only.

Converting a loaded model (grace_ds.models.convert) needs every expert in memory first, and DeepSpeed's
init_inference moves that whole model onto the rank's GPU before GRACE frees what the rank does not
serve: no model larger than one GPU could be served. Here the model is built on the meta device, its MoE
blocks get GRACE experts that hold this rank's slots (allocated on the device), and the safetensors files
are read tensor by tensor: dense weights whole, expert weights only for the logical experts in this rank's
slots. Checkpoint keys are mapped to the model's names by transformers' own conversion rules (the same
renamings and expert fusions from_pretrained applies), so Hub checkpoints (one tensor per expert) and
checkpoints of fused experts ([E, ...] tensors, read row by row) both load.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from grace_ds.errors import GraceInputError
from grace_ds.experts import SlotExperts
from grace_ds.models.convert import check_plan_fits, convert_model, find_moe_blocks
from grace_ds.models.grace_experts import GraceExperts
from grace_ds.models.safetensors_file import SafetensorsFile, TensorEntry
from grace_ds.plan import PlacementPlan
from grace_ds.runtime import GraceRuntime

logger = logging.getLogger(__name__)

_FUSED_PARTS = {"gate_up_proj": 2, "down_proj": 1}  # the fused expert tensors and how many source tensors each joins


@dataclass
class RankLoadStats:
    """What one rank read from the checkpoint (bytes as stored on disk) and how long it took."""
    dense_bytes: int = 0
    expert_bytes: int = 0
    skipped_expert_bytes: int = 0  # experts this rank does not hold, left unread
    seconds: float = 0.0
    files: int = 0
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes

    def describe(self) -> str:
        mib = 2 ** 20
        total = self.read_bytes + self.skipped_expert_bytes
        return (f"read {self.read_bytes / mib:,.1f} of {total / mib:,.1f} MiB from {self.files} file(s) in "
                f"{self.seconds:.1f} s (dense {self.dense_bytes / mib:,.1f} MiB, this rank's experts "
                f"{self.expert_bytes / mib:,.1f} MiB; other ranks' experts, {self.skipped_expert_bytes / mib:,.1f} "
                f"MiB, left unread)")


@dataclass(frozen=True)
class _ExpertSource:
    """A checkpoint tensor that feeds a block's fused `target` (gate_up_proj or down_proj): one expert's
    part `part` of `parts` (Hub checkpoints), or every expert's rows (expert None: a fused [E, ...] tensor)."""
    layer: int
    target: str
    expert: int | None
    part: int
    parts: int


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file that holds it (one model.safetensors, or a sharded index)."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(key): directory / str(name) for key, name in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise GraceInputError(f"{index}: not a safetensors index ({error.__class__.__name__}: {error})") from None
        missing = sorted({str(path) for path in files.values() if not path.is_file()})
        if missing:
            raise GraceInputError(f"{index}: names shard files that are missing: {', '.join(missing[:3])}")
        return files
    if single.is_file():
        with SafetensorsFile(single) as handle:
            return {key: single for key in handle.entries}
    if any(directory.glob("*.bin")):
        raise GraceInputError(f"{directory}: only safetensors checkpoints are read rank by rank (found .bin files: "
                              f"save the model again with save_pretrained, which writes safetensors)")
    raise GraceInputError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def checkpoint_config(directory: str | os.PathLike):
    """The transformers config of a checkpoint directory this module can read (quantized ones refused)."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise GraceInputError(f"{directory}: not a transformers checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise GraceInputError(f"{directory}/config.json: cannot read ({str(error).splitlines()[0][:200]})") from None
    if getattr(config, "quantization_config", None):
        raise GraceInputError(f"{directory}: quantized checkpoints (quantization_config in config.json) are not "
                              f"read rank by rank; dequantize to bf16 first")
    return config


def meta_model(directory: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model class built from its config on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    config = checkpoint_config(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = str(directory)
    return model


def empty_slot_experts(dtype: torch.dtype, device: torch.device | str,
                    slots_class: type[SlotExperts] = SlotExperts,
                    wrap: Callable[[GraceRuntime, int, SlotExperts], nn.Module] = GraceExperts):
    """make_experts for convert_model: this rank's slots allocated on the device, their weights left for
    load_for_rank to fill. slots_class / wrap: PerSlotExperts / GraceExpertsMoE for DeepSpeed training."""
    def make(runtime: GraceRuntime, layer: int, experts: nn.Module) -> nn.Module:
        _, two_i, hidden = experts.gate_up_proj.shape
        slots = slots_class(runtime.local_slots(layer), hidden, two_i // 2, experts.act_fn, dtype, device)
        return wrap(runtime, layer, slots)
    return make


def load_for_rank(directory: str | os.PathLike, runtime: GraceRuntime, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", make_experts: Callable | None = None,
                  progress: bool | None = None) -> tuple[nn.Module, RankLoadStats]:
    """The model of a transformers checkpoint directory with GRACE experts for `runtime`'s rank, every weight
    on `device` in `dtype`; only the dense weights and the experts of this rank's slots are read.

    Returns (model in eval mode, what was read). make_experts: as convert_model's (default: serving slots).
    progress: a progress bar over the bytes read (default: on the node's first rank)."""
    start = time.perf_counter()
    directory, device = Path(directory), torch.device(device)
    model = meta_model(directory, dtype)
    files = checkpoint_files(directory)
    blocks = find_moe_blocks(model)
    sources, dense_keys, unexpected = _map_keys(model, blocks, files)
    convert_model(model, runtime, make_experts or empty_slot_experts(dtype, device))
    _materialize(model, device)
    stats = RankLoadStats(files=len(set(files.values())), unexpected_keys=unexpected)
    if progress is None:
        progress = int(os.environ.get("LOCAL_RANK", "0")) == 0
    _read(model, runtime, files, dense_keys, sources, stats, progress)
    _initialize_buffers(model)
    _load_generation_config(model, directory)
    if unexpected:
        logger.warning("%s: %d checkpoint keys the model does not use were left unread (first: %s)",
                       directory, len(unexpected), ", ".join(unexpected[:3]))
    stats.seconds = time.perf_counter() - start
    return model.eval(), stats


def weights_per_gpu(directory: str | os.PathLike, plan: PlacementPlan) -> list[RankLoadStats]:
    """What each GPU of `plan` would read of the checkpoint (bytes as stored), from the files' headers alone:
    no weight is read (`grace-ds weights`)."""
    model = meta_model(directory, torch.float32)
    files = checkpoint_files(directory)
    blocks = find_moe_blocks(model)
    check_plan_fits(model, blocks, plan)
    sources, dense_keys, unexpected = _map_keys(model, blocks, files)
    headers = _headers(files)
    shares = []
    for gpu in range(plan.num_gpus):
        stats = RankLoadStats(files=len(headers), unexpected_keys=unexpected)
        _planned_reads(headers, files, dense_keys, sources, _held_slots(plan, gpu), stats)
        shares.append(stats)
    return shares


def _map_keys(model: nn.Module, blocks: list[tuple[str, nn.Module]], files: dict[str, Path]):
    """Checkpoint key -> an _ExpertSource, or the dense parameter / buffer name it loads; keys that match
    nothing of the model (transformers ignores them too, with a warning)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, apply_renamings, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    names = model.state_dict()  # meta tensors: names and shapes only
    fused = {f"{name}.experts.{target}": (layer, target) for layer, (name, _) in enumerate(blocks)
             for target in _FUSED_PARTS}
    sources: dict[str, _ExpertSource] = {}
    dense: dict[str, str] = {}
    unexpected: list[str] = []
    for key in files:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if name in fused:
            layer, target = fused[name]
            if pattern is None:
                sources[key] = _ExpertSource(layer, target, None, 0, 1)
                continue
            converter = next(c for c in converters if pattern in c.source_patterns)
            _check_expert_operations(key, converter, _FUSED_PARTS[target])
            expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), apply_renamings(key, renamings))
            if expert is None:
                raise GraceInputError(f"checkpoint key {key}: cannot tell its expert from pattern {pattern}")
            sources[key] = _ExpertSource(layer, target, int(expert.group(1)), converter.source_patterns.index(pattern),
                                         len(converter.source_patterns))
        elif name in names:
            if pattern is not None:
                raise GraceInputError(f"checkpoint key {key}: transformers converts it ({pattern} -> {name}); only "
                                      f"routed experts' conversions are read rank by rank")
            dense[key] = name
        else:
            unexpected.append(key)
    return sources, dense, unexpected


def _check_expert_operations(key: str, converter, parts: int) -> None:
    """A Hub checkpoint's experts are stacked (MergeModulelist, dim 0) and gate/up joined along the rows of
    each expert (Concatenate, dim 1 of [E, I, H]); other conversions are refused rather than misread."""
    kinds = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if parts == 2 else [])
    if kinds != expected or len(converter.source_patterns) != parts:
        raise GraceInputError(f"checkpoint key {key}: its experts are converted by {kinds} from "
                              f"{converter.source_patterns}, which grace_ds does not read rank by rank")


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Every meta parameter and buffer replaced by an uninitialised tensor on `device`; a tensor shared by
    several modules (tied embeddings) stays shared."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in made:
                    empty = torch.empty_like(tensor, device=device)
                    made[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
                store[name] = made[id(tensor)]


def _read(model: nn.Module, runtime: GraceRuntime, files: dict[str, Path], dense_keys: dict[str, str],
          sources: dict[str, _ExpertSource], stats: RankLoadStats, progress: bool) -> None:
    """Copy the dense tensors and the held experts' tensors into the model, file by file; check that every
    dense weight and every held expert was found."""
    from tqdm.auto import tqdm

    targets = model.state_dict(keep_vars=True)
    held = _held_slots(runtime.plan, runtime.rank)
    reads = _planned_reads(_headers(files), files, dense_keys, sources, held, stats)
    loaded: set[int] = set()
    found: set[tuple[int, int, str, int]] = set()
    bar = tqdm(total=stats.read_bytes, desc="grace_ds: reading this rank's weights", unit="B", unit_scale=True,
               disable=not progress, mininterval=1.0)
    with torch.no_grad():
        for path, keys in reads.items():
            with SafetensorsFile(path) as handle:
                for key, size in keys:
                    if key in dense_keys:
                        _copy(targets[dense_keys[key]], handle.read(key), key)
                        loaded.add(id(targets[dense_keys[key]]))
                    else:
                        source = sources[key]
                        _read_expert(handle, key, source, held[source.layer], runtime.slot_modules[source.layer], found)
                    bar.update(size)
    bar.close()
    slot_tensors = {id(t) for module in runtime.slot_modules.values()
                    for t in itertools.chain(module.parameters(), module.buffers())}
    missing = [name for name, tensor in targets.items() if id(tensor) not in loaded | slot_tensors]
    if missing:
        raise GraceInputError(f"{model.config.name_or_path}: the checkpoint lacks {len(missing)} weight(s) of the "
                              f"model (first: {', '.join(missing[:3])})")
    wanted = {(layer, expert, target, part) for layer, experts in held.items() for expert in experts
              for target, parts in _FUSED_PARTS.items() for part in range(parts)}
    absent = sorted(wanted - found)
    if absent:
        layer, expert, target, _ = absent[0]
        raise GraceInputError(f"{model.config.name_or_path}: the checkpoint lacks {len(absent)} expert tensor(s) "
                              f"this rank serves (first: plan layer {layer}, expert {expert}, {target})")


def _headers(files: dict[str, Path]) -> dict[Path, dict[str, TensorEntry]]:
    """Every file's tensor entries (dtype, shape, offset), from its header alone."""
    headers = {}
    for path in sorted(set(files.values())):
        with SafetensorsFile(path) as handle:
            headers[path] = handle.entries
    return headers


def _planned_reads(headers: dict[Path, dict[str, TensorEntry]], files: dict[str, Path], dense_keys: dict[str, str],
                   sources: dict[str, _ExpertSource], held: dict[int, dict[int, list[int]]],
                   stats: RankLoadStats) -> dict[Path, list[tuple[str, int]]]:
    """Per file, the keys to read with the bytes each read takes; `stats` gets the dense, held-expert and
    left-unread expert bytes."""
    reads: dict[Path, list[tuple[str, int]]] = {}
    for key in sorted(list(dense_keys) + list(sources), key=lambda k: (files[k], k)):
        path = files[key]
        entry = headers[path].get(key)
        if entry is None:
            raise GraceInputError(f"{path}: holds no tensor {key}, which the checkpoint's index places there")
        if key in dense_keys:
            stats.dense_bytes += entry.nbytes
            reads.setdefault(path, []).append((key, entry.nbytes))
            continue
        source = sources[key]
        in_tensor, per_expert = (entry.shape[0], entry.row_bytes) if source.expert is None else (1, entry.nbytes)
        wanted = len(held[source.layer]) if source.expert is None else int(source.expert in held[source.layer])
        stats.expert_bytes += per_expert * wanted
        stats.skipped_expert_bytes += per_expert * (in_tensor - wanted)
        if wanted:
            reads.setdefault(path, []).append((key, per_expert * wanted))
    return reads


def _read_expert(handle: SafetensorsFile, key: str, source: _ExpertSource, held: dict[int, list[int]],
                 slots: nn.Module, found: set) -> None:
    """Copy the held experts' share of one checkpoint tensor into their slots (held: logical expert -> this
    rank's slots holding it). A fused [E, ...] tensor is read a row per held expert."""
    if source.expert is None:
        tensors = {expert: handle.read_rows(key, expert, expert + 1)[0] for expert in sorted(held)}
        parts = range(_FUSED_PARTS[source.target])
    else:
        tensors = {source.expert: handle.read(key)}
        parts = (source.part,)
    for expert, tensor in tensors.items():
        for slot in held[expert]:
            gate_up, down = slots.slot_weights(slot)
            weights = gate_up if source.target == "gate_up_proj" else down
            rows = weights.shape[0] // source.parts
            _copy(weights[source.part * rows:(source.part + 1) * rows], tensor, key)
        found.update((source.layer, expert, source.target, part) for part in parts)


def _held_slots(plan: PlacementPlan, gpu: int) -> dict[int, dict[int, list[int]]]:
    """Plan layer -> logical expert -> the slots of `gpu` that hold it."""
    held: dict[int, dict[int, list[int]]] = {}
    for layer in range(plan.num_layers):
        held[layer] = {}
        for slot, expert in enumerate(plan.slot_expert[layer, gpu].tolist()):
            if expert >= 0:
                held[layer].setdefault(int(expert), []).append(slot)
    return held


def _copy(target: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise GraceInputError(f"checkpoint key {key}: shape {tuple(tensor.shape)} does not fit the model's "
                              f"{tuple(target.shape)} (config.json and weights disagree)")
    target.copy_(tensor)


def _initialize_buffers(model: nn.Module) -> None:
    """What from_pretrained initialises after loading: every loaded tensor is marked as such, then
    transformers' own initialisation fills the rest (non-persistent buffers: rotary frequencies)."""
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True
    model.initialize_weights()


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
