"""Optimizer states of a DeepSpeed checkpoint under another expert layout: each slot gets its logical expert's.

DeepSpeed keeps optimizer states by physical slot. Without ZeRO they are per-parameter states (torch's
optimizer in fp32; FP16_UnfusedOptimizer's fp32 masters and the torch optimizer over them in bf16), one
file per expert-parallel rank, indexed by position in the optimizer (grace_ds records the names in that
order on save). Under ZeRO 1/2 they are flat fp32 partitions per parameter group, one
file per data-parallel rank, with the fragment of every named parameter (`param_slice_mappings`).
Under another layout those files are right for the dense parameters and wrong for the expert slots, so
while DeepSpeed loads (`optimizer_states_by_layout`) its optimizer's `load_state_dict` receives the saved
state rewritten for the served layout: each expert parameter's states and fp32 master are cut out of
the fragments of its logical expert's saved primary and placed where the served slot's parameter lives
(replicas get their primary's). DeepSpeed then loads it as a checkpoint of its own layout. In a job of
another size, ZeRO 1/2 (`zero_states_across_sizes`) cut every group anew at this rank's partitions, dense
ones too, each parameter joined by name from the saver ranks' fragments; per-parameter optimizers take
every parameter's state by name as at the same size, a larger job's extra ranks reading a saver rank's file.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from grace_ds.errors import GraceInputError

# DeepSpeed's keys in its ZeRO optimizers' state dicts (deepspeed.checkpoint.constants).
BASE_STATE, FP32_GROUPS, SLICES = "base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings"
PARAM_PADDINGS, GROUP_PADDINGS, PARTITION_COUNT = "param_alignment_paddings", "group_paddings", "partition_count"
FP32 = "fp32 master"  # beside the optimizer's own per-element state keys (exp_avg, momentum_buffer, ...)

Source = tuple[int, str]  # (the saver's expert-parallel rank, the parameter's name there)


def per_parameter_groups(optimizer) -> list[list[torch.nn.Parameter]] | None:
    """The parameter groups of an optimizer that keeps a state per parameter (a torch optimizer, DeepSpeed
    without ZeRO in fp32; FP16_UnfusedOptimizer, DeepSpeed's bf16 without ZeRO, over fp32 masters), in
    state-dict index order; None for flat-partition optimizers."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, torch.optim.Optimizer):
        return [group["params"] for group in optimizer.param_groups]
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return optimizer.fp16_groups
    return None


def parameter_order(engine) -> list[str]:
    """A per-parameter optimizer's parameter names in its state-dict index order."""
    return [engine.param_names[p] for group in per_parameter_groups(engine.optimizer) for p in group]


def expert_parallel_rank() -> int:
    """The expert-parallel rank whose optimizer file DeepSpeed reads for this rank (that of its largest
    expert group, as DeepSpeedEngine._load_checkpoint)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(groups._get_max_expert_size_name())


def remappable(engine) -> str:
    """'' when this engine's optimizer states can be remapped, else why not."""
    optimizer = engine.optimizer
    if per_parameter_groups(optimizer) is not None:
        return ""
    if engine.zero_optimization_stage() in (1, 2) and hasattr(optimizer, "single_partition_of_fp32_groups"):
        if getattr(optimizer, "elastic_checkpoint", False):
            return "ZeRO's elastic_checkpoint is on (its partitions are merged by DeepSpeed at load)"
        return ""
    return (f"{type(optimizer).__name__} at ZeRO stage {engine.zero_optimization_stage()} (remapped: torch "
            "optimizers and DeepSpeed's bf16 optimizer without ZeRO, and ZeRO stages 1 and 2)")


@contextlib.contextmanager
def optimizer_states_by_layout(engine, sources: dict[str, Source], saver_ep_size: int, load_dir: str, tag: str,
                               saved_order: dict[int, list[str]] | None) -> Iterator[None]:
    """During the block, the engine's optimizer loads the saved states rewritten for the served layout. A
    per-parameter optimizer in a job of another size reads its dense states from the file of expert-parallel
    rank (its own mod the saver's size): a larger job's extra ranks have none of their own, and dense states
    are alike on every saver rank; its groups keep their served names (DeepSpeed's MoE groups are named by
    expert-parallel size)."""
    optimizer = engine.optimizer
    original = optimizer.load_state_dict
    groups = per_parameter_groups(optimizer)
    swaps = []
    if groups is not None:
        if saved_order is None:
            raise GraceInputError(f"{Path(load_dir, tag)}: saved without the optimizer's parameter order (a "
                                  "checkpoint from an older grace_ds): its optimizer states cannot be remapped")
        file_name = engine._get_optimizer_ckpt_name  # DeepSpeed's own, before the swap below
        own_rank = expert_parallel_rank() % saver_ep_size
        served_names = [{key: group[key] for key in ("name", "moe") if key in group}
                        for group in _torch_param_groups(optimizer)]

        def read(expert_rank: int) -> dict:
            path = file_name(load_dir, tag, expert_rank)
            return engine.checkpoint_engine.load(path, map_location=torch.device("cpu"))["optimizer"]

        def load(state_dict, *args, **kwargs):
            where = _saved_positions(parameter_order(engine), sources, own_rank, saved_order)
            remapped = remap_per_parameter_state(state_dict, own_rank, where, [len(g) for g in groups], read)
            torch_state = remapped.get("optimizer_state_dict", remapped)
            torch_state["param_groups"] = [{**group, **names}
                                           for group, names in zip(torch_state["param_groups"], served_names)]
            return original(remapped, *args, **kwargs)

        if own_rank != expert_parallel_rank():
            swaps.append((engine, "_get_optimizer_ckpt_name",
                          lambda directory, tag_, _rank: file_name(directory, tag_, own_rank)))
    else:
        read = _zero_reader(engine, load_dir, tag)  # DeepSpeed reads only this rank's file; sources may be in others

        def load(state_dict_list=None, *args, **kwargs):
            if state_dict_list is not None:
                state_dict_list = remap_zero_states(optimizer, state_dict_list, sources, saver_ep_size, read)
            return original(state_dict_list, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        for instance, method, replacement in [(optimizer, "load_state_dict", load), *swaps]:
            stack.enter_context(_instead(instance, method, replacement))
        yield


def _torch_param_groups(optimizer) -> list[dict]:
    """The torch optimizer's groups: the optimizer's own, or those of the one inside FP16_UnfusedOptimizer."""
    return optimizer.param_groups if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer.param_groups


@contextlib.contextmanager
def zero_states_across_sizes(engine, sources: dict[str, Source], saver_ep_size: int) -> Iterator[None]:
    """During the block, the engine loads ZeRO 1/2 states saved by a job of another size (DeepSpeed
    refuses those): its _load_zero_checkpoint builds this rank's partitions from the saver's files,
    every parameter by name (expert ones from their logical expert's primary)."""

    def load_zero_checkpoint(load_dir, tag, load_optimizer_states=True):
        read = _zero_reader(engine, load_dir, tag)
        state_dict_list = zero_state_for_another_size(engine.optimizer, read, engine.loaded_checkpoint_dp_world_size,
                                                      sources, saver_ep_size)
        engine.optimizer.load_state_dict(state_dict_list=state_dict_list, load_optimizer_states=load_optimizer_states,
                                         load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                                         checkpoint_folder=None, load_serial=None,
                                         param_shapes=engine._get_zero_param_shapes())
        return True

    with _instead(engine, "_load_zero_checkpoint", load_zero_checkpoint):
        yield


@contextlib.contextmanager
def _instead(instance, method: str, replacement: Callable) -> Iterator[None]:
    """During the block `instance.<method>` is `replacement` (an instance attribute over the class's
    method, removed afterwards: nothing else changes for the rest of the run)."""
    setattr(instance, method, replacement)
    try:
        yield
    finally:
        delattr(instance, method)


def _zero_reader(engine, load_dir: str, tag: str) -> Callable[[int], dict]:
    """rank -> that saver rank's ZeRO optimizer state dict (either bit16 file naming, as DeepSpeed tries)."""

    def read(rank: int) -> dict:
        for bf16_mode in (engine.bfloat16_enabled(), not engine.bfloat16_enabled()):
            names = engine._get_all_zero_checkpoint_names(load_dir, tag, bf16_mode)
            if names is not None and Path(names[rank]).is_file():
                return engine.checkpoint_engine.load(names[rank], map_location="cpu")["optimizer_state_dict"]
        raise GraceInputError(f"{Path(load_dir, tag)}: no ZeRO optimizer file of rank {rank}")

    return read


def _saved_positions(order: list[str], sources: dict[str, Source], own_rank: int,
                     saved_order: dict[int, list[str]]) -> list[tuple[int, int]]:
    """(saver's expert-parallel rank, index in its optimizer) of each served parameter: dense ones from
    `own_rank` (the file DeepSpeed reads for this rank), expert ones from their logical expert's primary."""
    index = {rank: {name: i for i, name in enumerate(names)} for rank, names in saved_order.items()}
    out = []
    for name in order:
        rank, saved_name = sources.get(name, (own_rank, name))
        where = index.get(rank, {}).get(saved_name)
        if where is None:
            raise GraceInputError(f"the checkpoint's optimizer holds no parameter {saved_name!r} "
                                  f"(expert-parallel rank {rank}), wanted for {name!r}")
        out.append((rank, where))
    return out


def remap_per_parameter_state(own: dict, own_rank: int, where: list[tuple[int, int]], group_sizes: list[int],
                              read: Callable[[int], dict]) -> dict:
    """A per-parameter optimizer's state dict for the served parameters: position j takes the state saved
    at where[j] (`own` is the saved state dict of expert-parallel rank `own_rank`, `read(rank)` gives
    another's). A torch state dict, or FP16_UnfusedOptimizer's: a torch one inside, the fp32 masters beside.
    Another rank's file is read once and only the entries wanted from it are kept."""
    unfused = "fp32_groups" in own
    torch_state = own["optimizer_state_dict"] if unfused else own
    if len(torch_state["param_groups"]) != len(group_sizes):
        raise GraceInputError(f"the checkpoint's optimizer has {len(torch_state['param_groups'])} parameter "
                              f"groups, this engine's {len(group_sizes)}")
    wanted: dict[int, set[int]] = {}
    for rank, index in where:
        wanted.setdefault(rank, set()).add(index)
    states, masters = {}, {}
    for rank, indices in wanted.items():
        saved = own if rank == own_rank else read(rank)
        saved_states = (saved["optimizer_state_dict"] if unfused else saved)["state"]
        flat_masters = [m for group in saved["fp32_groups"] for m in group] if unfused else []
        for index in indices:
            if index in saved_states:  # a parameter never stepped has no state
                states[rank, index] = saved_states[index]
            if unfused:
                masters[rank, index] = flat_masters[index]
        del saved, saved_states, flat_masters
    state = {position: states[key] for position, key in enumerate(where) if key in states}
    positions = _split(range(len(where)), group_sizes)
    remapped = {"state": state, "param_groups": [{**group, "params": list(indices)}
                                                 for group, indices in zip(torch_state["param_groups"], positions)]}
    if not unfused:
        return remapped
    return {**own, "optimizer_state_dict": remapped,
            "fp32_groups": _split([masters[key] for key in where], group_sizes)}


def _split(items, sizes: list[int]) -> list[list]:
    """Consecutive runs of `items`, of the given sizes."""
    items, out, start = list(items), [], 0
    for size in sizes:
        out.append(items[start:start + size])
        start += size
    return out


def remap_zero_states(optimizer, state_dict_list: list[dict], sources: dict[str, Source], saver_ep_size: int,
                      read: Callable[[int], dict]) -> list[dict]:
    """ZeRO 1/2's per-rank state dicts (DeepSpeed fills only this rank's) with this rank's expert groups
    rewritten for the served layout; `read(rank)` gives another rank's saved state dict."""
    world = len(state_dict_list)
    rank = dist.get_rank(group=optimizer.dp_process_group)
    mine = state_dict_list[rank]
    out = list(state_dict_list)
    out[rank] = rebuilt_zero_state(optimizer, mine, lambda r: mine if r == rank else read(r), world, sources,
                                   saver_ep_size, expert_groups_only=True)
    return out


def zero_state_for_another_size(optimizer, read: Callable[[int], dict], saved_world: int,
                                sources: dict[str, Source], saver_ep_size: int) -> list[dict]:
    """What DeepSpeed's ZeRO 1/2 load takes (a state dict per rank of this job, this rank's filled) from a
    checkpoint of `saved_world` ranks: every group, dense ones too, cut anew at this rank's partitions."""
    rank = dist.get_rank(group=optimizer.dp_process_group)
    out: list[dict | None] = [None] * dist.get_world_size(group=optimizer.dp_process_group)
    out[rank] = rebuilt_zero_state(optimizer, read(0), read, saved_world, sources, saver_ep_size,
                                   expert_groups_only=False)
    return out


def rebuilt_zero_state(optimizer, template: dict, read: Callable[[int], dict], saved_world: int,
                       sources: dict[str, Source], saver_ep_size: int, expert_groups_only: bool) -> dict:
    """A ZeRO 1/2 state dict for this rank's partitions, built from the saver's (`template`: one saver
    rank's, for the groups not rebuilt and the scalars): each rebuilt group's per-element states and fp32
    master hold, at every served parameter's fragment, that parameter's saved values (expert parameters:
    their logical expert's primary's), joined from the saver ranks' fragments."""
    if saved_world % saver_ep_size:
        raise GraceInputError(f"{saved_world} ZeRO partitions cannot hold an expert-parallel size of {saver_ep_size}")
    base = template[BASE_STATE]
    if not isinstance(base, dict):
        raise GraceInputError("an elastic ZeRO checkpoint: its optimizer states cannot be remapped")
    if len(base["param_groups"]) != len(optimizer.bit16_groups):
        raise GraceInputError(f"the checkpoint's optimizer has {len(base['param_groups'])} parameter groups, "
                              f"this engine's {len(optimizer.bit16_groups)}")
    groups = {}  # parameter group -> its (parameter, where its values were saved) pairs
    for group, params in enumerate(optimizer.bit16_groups):
        names = [optimizer.param_names[p] for p in params]
        experts = [name in sources for name in names]
        if any(experts) and not all(experts):
            raise GraceInputError(f"optimizer parameter group {group} mixes expert and dense parameters")
        if any(experts):  # partitioned over the saver's expert-data-parallel group of the primary's rank
            groups[group] = [(p, (tuple(range(sources[n][0], saved_world, saver_ep_size)), sources[n][1]))
                             for p, n in zip(params, names)]
        elif not expert_groups_only:  # partitioned over every saver rank
            groups[group] = [(p, (tuple(range(saved_world)), n)) for p, n in zip(params, names)]
    keys = {group: [key for key, value in base["state"].get(group, {}).items()
                    if torch.is_tensor(value) and value.dim() > 0] for group in groups}
    saved = _saved_parameters(read, {group: {where for _, where in pairs} for group, pairs in groups.items()}, keys)
    state, fp32, slices = dict(base["state"]), list(template[FP32_GROUPS]), list(template[SLICES])
    for group, pairs in groups.items():
        partition = optimizer.single_partition_of_fp32_groups[group]
        target = {key: torch.zeros(partition.numel(), dtype=partition.dtype) for key in [FP32, *keys[group]]}
        for param, where in pairs:
            mapping = param._hp_mapping
            if mapping is None:
                continue  # this parameter lies wholly in another rank's partition
            full = saved[group, where]
            if full[FP32].numel() != param.numel():
                raise GraceInputError(f"{where[1]}: saved with {full[FP32].numel()} values, served with {param.numel()}")
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            for key, values in full.items():
                target[key][hp.start:hp.start + hp.numel] = values[lp.start:lp.start + lp.numel]
        state[group] = {**base["state"].get(group, {}), **{key: target[key] for key in keys[group]}}
        fp32[group] = target[FP32]
        slices[group] = optimizer._param_slice_mappings[group]
    out = {**template, BASE_STATE: {**base, "state": state}, FP32_GROUPS: fp32, SLICES: slices}
    if PARAM_PADDINGS in out:  # the served groups' alignment (DeepSpeed refuses a mismatch)
        out[PARAM_PADDINGS] = copy.deepcopy(optimizer.round_robin_bit16_padding)
    if not expert_groups_only:
        out.update({GROUP_PADDINGS: list(optimizer.groups_padding), PARTITION_COUNT: list(optimizer.partition_count)})
    return out


def _saved_parameters(read: Callable[[int], dict], wanted: dict[int, set[tuple[tuple[int, ...], str]]],
                      keys: dict[int, list[str]]) -> dict:
    """(group, (ranks, name)) -> {key: the saved parameter's flat values}, joined from its fragments in
    those saver ranks' partitions, in rank order (DeepSpeed partitions a group over its data-parallel
    ranks in rank order; an expert group's are the ranks r with r % ep_size its expert-parallel rank).
    Each file is read once, and only the fragments are kept."""
    pieces: dict = {}
    for other in sorted({r for entries in wanted.values() for ranks, _ in entries for r in ranks}):
        saved = read(other)
        for group, entries in wanted.items():
            flats = {FP32: saved[FP32_GROUPS][group],
                     **{key: saved[BASE_STATE]["state"][group][key] for key in keys[group]}}
            for where in entries:
                address = saved[SLICES][group].get(where[1]) if other in where[0] else None
                if address is None:
                    continue
                for key, flat in flats.items():
                    # A copy, not a view: the rest of the file is freed once it has been read.
                    part = flat.reshape(-1)[address.start:address.start + address.numel].to(torch.float32, copy=True)
                    pieces.setdefault((group, where), {}).setdefault(key, []).append(part)
        del saved
    out = {}
    for group, entries in wanted.items():
        for where in entries:
            if (group, where) not in pieces:
                raise GraceInputError(f"the checkpoint's ZeRO partitions hold no parameter {where[1]!r} "
                                      f"(saver ranks {list(where[0])})")
            out[group, where] = {key: torch.cat(parts) for key, parts in pieces[group, where].items()}
    return out
