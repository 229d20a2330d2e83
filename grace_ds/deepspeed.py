"""DeepSpeed integration: `init_inference` and `initialize` with the `"grace_moe"` section
(grace_ds.deepspeed_config) of a DeepSpeed JSON.

`init_inference` pops the section, calls deepspeed.init_inference with the rest (dtype, ...), then gives
the model's sparse MoE blocks GRACE experts for this rank and wires the process group itself (DeepSpeed
0.19 leaves MoE groups unset in inference); given a checkpoint directory, it builds each rank's share first
(grace_ds.models.rank_load) and hands DeepSpeed that. `initialize` (training) converts transformers models for
training and keeps replicas in sync; `save_pretrained(engine, directory)` (grace_ds.models.export) writes
the unmodified transformers checkpoint back. Reporting (profiles, W&B): grace_ds.deepspeed_monitoring.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.deepspeed_config import MONITOR_SECTIONS, SECTION, GraceMoEConfig, split_config
from grace_ds.deepspeed_monitoring import attach_recorder, log_replan, save_profile
from grace_ds.errors import GraceInputError
from grace_ds.models import convert_model, find_moe_blocks
from grace_ds.models.export import save_pretrained
from grace_ds.models.generation import keep_ranks_in_step
from grace_ds.plan import PlacementPlan
from grace_ds.plan_agreement import agree_on_plan, broadcast_plan
from grace_ds.runtime import GraceRuntime
from grace_ds.topology import LinkModel, Topology

__all__ = ["attach_to_engine", "convert_for_training", "init_inference", "initialize", "load_for_training",
           "moe_param_groups", "save_pretrained", "save_profile"]


def job_topology(links: LinkModel | None = None, group=None) -> Topology:
    """The running job's nodes x GPUs (launcher variables, else host names); one rank without distributed."""
    if not faults.distributed():
        return Topology.uniform(1, 1, links)
    return Topology.discover(group, links=links)


def load_or_make_plan(section: GraceMoEConfig, topology: Topology) -> PlacementPlan:
    if section.plan is not None:
        plan = PlacementPlan.load(section.plan)
    elif section.profile is not None:
        from grace_ds.planners import make_plan
        from grace_ds.routing_profile import RoutingProfile

        from grace_ds.simulate import MODE_SAMPLE_TOKENS, modeled_times_by_mode

        profile = RoutingProfile.load(section.profile)
        plan = make_plan(section.policy, profile, topology, section.replica_slots)
        if profile.sample_topk_ids is not None:
            plan.options["modeled_layer_time_us"] = modeled_times_by_mode(plan, profile.sample_topk_ids[:MODE_SAMPLE_TOKENS])
    else:
        raise GraceInputError(f"DeepSpeed config '{SECTION}': needs 'plan' or 'profile' to serve with GRACE")
    if plan.topology.gpus_per_node != topology.gpus_per_node:
        raise GraceInputError(f"{section.plan or section.profile}: plan is for {plan.topology.describe()}, "
                              f"this job runs {topology.describe()}")
    return plan


def init_inference(model: torch.nn.Module | str | os.PathLike,
                   config: dict | str | os.PathLike | None = None, **kwargs: Any):
    """deepspeed.init_inference with GRACE-MoE. Returns the InferenceEngine; its module's MoE blocks
    hold this rank's expert slots. Each rank serves its own tokens (data-parallel attention).

    model: a transformers model, or its checkpoint directory (safetensors). A directory is read rank by
    rank (grace_ds.models.rank_load): each rank reads the dense weights and only its slots' experts, straight
    into its device in the config's dtype, so a model larger than one GPU can be served; what it read is in
    `engine.grace_load`. A model object is converted after DeepSpeed has moved the whole of it to the device.
    Its generate keeps the ranks in step (grace_ds.models.generation): ranks may finish at different steps,
    or have no prompt."""
    import deepspeed

    rest, section = split_config(config)
    tp = (rest.get("tensor_parallel") or {}).get("tp_size", 1) if isinstance(rest.get("tensor_parallel"), dict) else 1
    if section is not None and section.enabled and tp != 1:
        raise GraceInputError("grace_moe serves the dense part data-parallel: set tensor_parallel.tp_size to 1")
    # Monitor sections (wandb, ...) belong to training configs; the inference config rejects them.
    rest = {k: v for k, v in rest.items() if k not in MONITOR_SECTIONS}
    from_directory = isinstance(model, (str, os.PathLike))
    if section is None or not section.enabled:
        if from_directory:
            from grace_ds.profiling import load_model

            model = load_model(model, _inference_dtype(rest, kwargs))[0]
        return deepspeed.init_inference(model, config=rest, **kwargs)
    load_stats = None
    if from_directory:
        from deepspeed.accelerator import get_accelerator

        from grace_ds.models.rank_load import load_for_rank

        _start_job()
        runtime, group = _serving_runtime(section, torch.device(get_accelerator().current_device_name()))
        model, load_stats = load_for_rank(model, runtime, dtype=_inference_dtype(rest, kwargs), device=runtime.device)
        engine = deepspeed.init_inference(model, config=rest, **kwargs)
    else:
        engine = deepspeed.init_inference(model, config=rest, **kwargs)
        _single_process_group()
        runtime, group = _serving_runtime(section, next(engine.module.parameters()).device)
        convert_model(engine.module, runtime)
    engine.grace_runtime, engine.grace_config, engine.grace_group = runtime, section, group
    engine.grace_load = load_stats
    keep_ranks_in_step(engine.module, dist.get_world_size(group) if faults.distributed() else 1)
    if section.profiling:
        engine.grace_recorder = attach_recorder(engine.module, runtime)
    if section.online is not None and section.online.enabled:
        engine.grace_replanner = start_online_replanning(engine.module, runtime, section, group)
    return engine


def _serving_runtime(section: GraceMoEConfig, device: torch.device) -> tuple[GraceRuntime, Any]:
    """The job's fault-guarded group and the GraceRuntime serving its agreed plan on `device`."""
    group = faults.fault_group(section.fault_timeout_s) if faults.distributed() else None
    topology = job_topology(LinkModel(inter_node_bandwidth_Gbps=section.inter_node_gbps), group)
    plan = _agreed_plan(section, topology, group)
    runtime = GraceRuntime(plan, rank=faults.job_rank(), group=group, router=section.router,
                           router_sampling=section.router_sampling, communication=section.communication, device=device)
    return runtime, group


def _inference_dtype(rest: dict, kwargs: dict) -> torch.dtype:
    """The dtype deepspeed.init_inference gives the model for this config (DeepSpeed's own parsing)."""
    from deepspeed.inference.config import DeepSpeedInferenceConfig

    return DeepSpeedInferenceConfig(**{**rest, **kwargs}).dtype


def _start_job() -> None:
    """The job's process group before anything is built: DeepSpeed's under a launcher (WORLD_SIZE set), else
    one of this process alone."""
    if dist.is_available() and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))  # each local rank its own GPU
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    _single_process_group()


def _single_process_group() -> None:
    """Plain `python`, no launcher: a process group of this one process, so the job serves here alone
    (a plan for more GPUs is then refused by name). Launched processes (WORLD_SIZE set) make their own."""
    if dist.is_available() and not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        from deepspeed.accelerator import get_accelerator

        dist.init_process_group(get_accelerator().communication_backend_name(), store=dist.HashStore(), rank=0,
                                world_size=1)


def start_online_replanning(model: torch.nn.Module, runtime: GraceRuntime, section: GraceMoEConfig, group=None):
    """An OnlineReplanner ending a step after every forward of `model`; weights travel on a group of their
    own. Re-plans are logged to the active W&B run (rank 0) and kept in `history`."""
    from grace_ds.online import OnlineReplanner

    transfer_group = None
    if faults.distributed():
        transfer_group = faults.fault_group(section.fault_timeout_s)
        # NCCL wants every rank in a group's first call; later point-to-point batches may involve a few.
        faults.all_reduce(torch.zeros(1, device=faults.collective_device(transfer_group)), "online re-planning (set-up)", transfer_group)
    return OnlineReplanner(runtime, section.online.settings(), group, transfer_group, log_replan).attach(model)


def initialize(model: torch.nn.Module | str | os.PathLike, config: dict | str | os.PathLike | None = None,
               **kwargs: Any):
    """deepspeed.initialize with GRACE-MoE training. Returns DeepSpeed's tuple.

    A transformers model with a `grace_moe` plan (or profile) has its MoE blocks' experts converted to
    GRACE layers that DeepSpeed trains as its own MoE layers (grace_ds.deepspeed_moe.GraceExpertsMoE);
    given as its checkpoint directory, each rank reads only the dense weights and its slots' experts
    (grace_ds.models.rank_load; `engine.module.grace_load` says what). Models written with GraceMoE come
    as they are. Either way the engine keeps the copies of every replicated expert equal after each
    optimizer step and after load_checkpoint, and clips fp32 without ZeRO by the exact global norm
    (grace_ds.deepspeed_training). The optimizer must be built from the
    converted model: give it in the config, or as a callable (params -> optimizer). With
    `grace_moe.profiling` the engine carries `grace_recorder`."""
    import deepspeed

    rest, section = split_config(config)
    grace = section is not None and section.enabled and (section.plan or section.profile)
    if isinstance(model, (str, os.PathLike)):
        if grace:  # read rank by rank: the dense weights and this rank's slots' experts, in fp32 as from_pretrained
            model = load_for_training(model, section)
            kwargs = _converted_model_parameters(model, kwargs)
        else:
            from grace_ds.profiling import load_model

            model = load_model(model)[0]
    elif grace and find_moe_blocks(model):
        convert_for_training(model, section)
        kwargs = _converted_model_parameters(model, kwargs)
    result = deepspeed.initialize(model=model, config=rest, **kwargs)
    attach_to_engine(result[0], section)
    return result


def attach_to_engine(engine, section: GraceMoEConfig | None) -> None:
    """GRACE's training hooks on a DeepSpeed engine whose module has GRACE layers (grace_ds.deepspeed_training),
    and with `grace_moe.profiling` the routing recorder (`engine.grace_recorder`)."""
    from grace_ds.deepspeed_training import attach_training, runtimes_of

    runtimes = runtimes_of(engine.module)
    if runtimes:
        attach_training(engine, runtimes, (section or GraceMoEConfig()).monitor_interval_steps)
    if section is not None and section.enabled and section.profiling:
        # A converted transformers model routes through its one runtime; GraceMoE layers report per layer.
        engine.grace_recorder = attach_recorder(engine.module, runtimes[0] if len(runtimes) == 1 else None)
        engine.grace_config = section
        engine.grace_group = faults.fault_group(section.fault_timeout_s) if dist.is_initialized() else None


def convert_for_training(model: torch.nn.Module, section: GraceMoEConfig) -> GraceRuntime:
    """Give the model's transformers MoE blocks GRACE experts that DeepSpeed trains (this rank's slots), in
    DeepSpeed's expert-parallel group (made here as its MoE layers make it). Initialises distributed if needed."""
    from grace_ds.deepspeed_moe import GraceExpertsMoE

    runtime = _training_runtime(section, next(model.parameters()).device)
    convert_model(model, runtime, GraceExpertsMoE.convert)
    return runtime


def load_for_training(directory: str | os.PathLike, section: GraceMoEConfig) -> torch.nn.Module:
    """convert_for_training for a checkpoint directory: the model built with this rank's slots only, read
    rank by rank (grace_ds.models.rank_load) in fp32 onto the device DeepSpeed trains on, in train mode."""
    from deepspeed.accelerator import get_accelerator

    from grace_ds.deepspeed_moe import GraceExpertsMoE
    from grace_ds.experts import PerSlotExperts
    from grace_ds.models.rank_load import empty_slot_experts, load_for_rank

    _start_job()
    device = torch.device(get_accelerator().current_device_name())
    runtime = _training_runtime(section, device)
    make = empty_slot_experts(torch.float32, device, PerSlotExperts, GraceExpertsMoE)
    model, stats = load_for_rank(directory, runtime, dtype=torch.float32, device=device, make_experts=make)
    model.grace_load = stats
    return model.train()


def _training_runtime(section: GraceMoEConfig, device: torch.device) -> GraceRuntime:
    """The GraceRuntime of a training job: the agreed plan over DeepSpeed's expert-parallel group."""
    import deepspeed
    from deepspeed.utils import groups

    if not dist.is_initialized():
        deepspeed.init_distributed()
    world = dist.get_world_size()
    ep_size = section.expert_parallel_size or world
    if world % ep_size:
        raise GraceInputError(f"grace_moe.expert_parallel_size {ep_size} does not divide the job's {world} ranks")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)  # DeepSpeed's own groups, as its MoE layers make them
    ep_group = groups._get_expert_parallel_group(name)
    topology = job_topology(LinkModel(inter_node_bandwidth_Gbps=section.inter_node_gbps), ep_group)
    plan = _agreed_plan(section, topology, faults.fault_group(section.fault_timeout_s))
    # Training runs eagerly: no CUDA graphs (gather calls under autograd go flat anyway).
    communication = section.communication.model_copy(update={"cuda_graphs": False})
    return GraceRuntime(plan, group=ep_group, router=section.router, router_sampling=section.router_sampling,
                        communication=communication, device=device)


def _agreed_plan(section: GraceMoEConfig, topology: Topology, group) -> PlacementPlan:
    """The plan every rank serves: loaded and checked alike everywhere, or made on the first rank and
    broadcast (threaded BLAS may break the planner's ties apart on other ranks)."""
    if section.plan is None and faults.distributed():
        plan = load_or_make_plan(section, topology) if faults.job_rank() == 0 else None
        return broadcast_plan(plan, f"plan loading (planned at start-up from {section.profile})", group)
    plan = load_or_make_plan(section, topology)
    agree_on_plan(plan, str(section.plan or section.profile), group)
    return plan


def _converted_model_parameters(model: torch.nn.Module, kwargs: dict) -> dict:
    """deepspeed.initialize's keyword arguments for the converted model: its parameters in DeepSpeed's
    MoE parameter groups unless given; an optimizer built before the conversion is refused."""
    if isinstance(kwargs.get("optimizer"), torch.optim.Optimizer):
        raise GraceInputError("grace_moe converts the model's experts before DeepSpeed starts, so an optimizer built "
                              "on the model's parameters would miss them: give the optimizer in the config or as a "
                              "callable (params -> optimizer)")
    if kwargs.get("model_parameters") is not None:
        known = {id(p) for p in model.parameters()}
        given = kwargs["model_parameters"]
        params = [p for g in given for p in (g["params"] if isinstance(g, dict) else [g])]
        if any(id(p) not in known for p in params):
            raise GraceInputError("model_parameters hold parameters the converted model no longer has: leave "
                                  "model_parameters out (grace_ds groups the converted model's) or build them after")
        return kwargs
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {**kwargs, "model_parameters": moe_param_groups([{"params": trainable}])}


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the expert parameters in DeepSpeed's MoE groups (one per expert-data-
    parallel group, `moe: True`), each group's options kept: ZeRO reduces and partitions experts over their
    own group, and refuses an MoE model whose groups are not split so."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**group, "params": list(group["params"]),
              "name": group.get("name", "parameters" if index == 0 else f"parameters_{index}")}
             for index, group in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)
