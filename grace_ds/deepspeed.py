"""DeepSpeed integration: the `"grace_moe"` section of a DeepSpeed JSON, `init_inference` and `initialize`.

    {"dtype": "fp32", "grace_moe": {"plan": "plan.json", "router": "tar", "communication": "auto"}}

`init_inference` pops the section, calls deepspeed.init_inference with the rest (dtype, ...), then gives
the model's sparse MoE blocks GRACE experts for this rank and wires the process group itself (DeepSpeed
0.19 leaves MoE groups unset in inference). `initialize` (training) switches the profiling hooks on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, ValidationError, model_validator

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.exchange import CommunicationConfig
from grace_ds.layer import GraceRuntime
from grace_ds.models import convert_model, find_moe_blocks
from grace_ds.models.convert import top_k_of
from grace_ds.plan import PlacementPlan
from grace_ds.plan_agreement import agree_on_plan, broadcast_plan
from grace_ds.routing_stats import RoutingStats
from grace_ds.topology import LinkModel, Topology

SECTION = "grace_moe"
# Keys of the section that live under `communication` now (refused at the top level, naming the new place).
MOVED_TO_COMMUNICATION = ("hierarchical_min_tokens", "gather_max_tokens", "cuda_graphs", "hierarchical_gather",
                          "node_groups")
MONITOR_SECTIONS = ("wandb", "tensorboard", "csv_monitor", "comet")


class OnlineConfig(DeepSpeedConfigModel):
    """The `grace_moe.online` subsection: re-plan while serving (grace_ds.online)."""

    enabled: bool = True
    policy: Literal["incremental", "eplb-periodic", "grace-periodic"] = "incremental"
    """incremental: bounded moves when the routing drifts; *-periodic: a plan from scratch every interval."""
    window_steps: int = Field(64, ge=1)
    """Steps (model forwards) of routing the statistics cover."""
    interval_steps: int = Field(16, ge=1)
    """Steps between drift checks (one all-reduce of the window each)."""
    drift_threshold: float = Field(0.05, ge=0)
    """Re-plan when a layer's max/mean GPU load grew this much over what the plan expects."""
    max_moves_per_step: int = Field(8, ge=0)
    """Expert copies moved per re-plan, all layers together."""
    plan_delay_steps: int = Field(2, ge=1)
    """Steps between a check (planning starts on a thread) and posting its weight transfers."""
    transfer_chunk_mb: float = Field(16.0, gt=0)
    """Size of the point-to-point chunks expert weights travel in."""

    @model_validator(mode="after")
    def _window_buckets(self) -> "OnlineConfig":
        if self.window_steps % min(4, self.window_steps):
            raise ValueError("window_steps must be 1, 2, 3 or a multiple of 4 (the window slides by a quarter)")
        return self

    def settings(self):
        from grace_ds.online import OnlineSettings

        return OnlineSettings(policy=self.policy, window_steps=self.window_steps, window_buckets=min(4, self.window_steps),
                              interval_steps=self.interval_steps, plan_delay_steps=self.plan_delay_steps,
                              drift_threshold=self.drift_threshold,
                              max_moves_per_step=self.max_moves_per_step,
                              transfer_chunk_bytes=int(self.transfer_chunk_mb * (1 << 20)))


class GraceMoEConfig(DeepSpeedConfigModel):
    """The `grace_moe` section (DeepSpeed conventions: pydantic, unknown keys rejected)."""

    enabled: bool = True
    plan: str | None = None
    """Placement plan file (grace-ds plan). Either this or `profile`."""
    profile: str | None = None
    """Routing profile to plan from at start-up, with `policy` and `replica_slots`."""
    policy: Literal["grace", "contiguous", "eplb", "eplb-hierarchical", "uniform-affinity"] = "grace"
    replica_slots: int = Field(1, ge=0)
    router: Literal["tar", "wrr", "static", "modulo"] = "tar"
    router_sampling: Literal["swrr", "random"] = "swrr"
    communication: CommunicationConfig = CommunicationConfig()
    """A mode name ("auto", "flat", "hierarchical", "gather") or an object of grace_ds.exchange.CommunicationConfig's
    fields: {"mode": "auto", "hierarchical_min_tokens": 512, "gather_max_tokens": 128, "cuda_graphs": true,
    "hierarchical_gather": true, "node_groups": false}."""
    inter_node_gbps: float = Field(25.0, gt=0)
    profiling: bool = False
    """Record per-layer expert load and co-activation during every forward."""
    profile_out: str | None = None
    """Where `save_profile` writes the recorded profile."""
    expert_parallel_size: int | None = Field(None, ge=1)
    """Training (grace_ds.deepspeed.initialize): the ranks one plan spreads experts over; the job is a
    multiple of it (expert x data parallel, DeepSpeed's consecutive expert-parallel groups). Default: all."""
    fault_timeout_s: float = Field(faults.DEFAULT_TIMEOUT_S, gt=0)
    """A rank that dies or stalls makes the others stop after this many seconds, naming it and the phase."""
    online: OnlineConfig | None = None
    """Re-plan while serving when the routing drifts (moves a bounded number of expert copies)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, values):
        moved = [key for key in MOVED_TO_COMMUNICATION if isinstance(values, dict) and key in values]
        if moved:
            raise ValueError(f"{', '.join(moved)} moved under 'communication' (e.g. \"communication\": "
                             f"{{\"mode\": \"auto\", \"{moved[0]}\": ...}})")
        return values

    @model_validator(mode="after")
    def _one_source(self) -> "GraceMoEConfig":
        if self.plan is not None and self.profile is not None:
            raise ValueError("give either 'plan' or 'profile', not both")
        return self


def split_config(config: dict | str | os.PathLike | None) -> tuple[dict, GraceMoEConfig | None]:
    """(DeepSpeed config without the section, the validated section or None)."""
    if config is None:
        return {}, None
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
            raise GraceInputError(f"{path}: cannot read the DeepSpeed JSON ({error})") from None
    if not isinstance(config, dict):
        raise GraceInputError("DeepSpeed config: must be a JSON object")
    rest = dict(config)
    section = rest.pop(SECTION, None)
    if section is None:
        return rest, None
    if not isinstance(section, dict):
        raise GraceInputError(f"DeepSpeed config: '{SECTION}' must be an object")
    try:
        return rest, GraceMoEConfig(**section)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or SECTION}: {e['msg']}" for e in error.errors())
        raise GraceInputError(f"DeepSpeed config '{SECTION}': {problems}") from None


def job_topology(links: LinkModel | None = None, group=None) -> Topology:
    """The running job's nodes x GPUs (launcher variables, else host names); one rank without distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return Topology.uniform(1, 1, links)
    return Topology.discover(group, links=links)


def load_or_make_plan(section: GraceMoEConfig, topology: Topology) -> PlacementPlan:
    if section.plan is not None:
        plan = PlacementPlan.load(section.plan)
    elif section.profile is not None:
        from grace_ds.planners import make_plan
        from grace_ds.profile import RoutingProfile

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


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_inference(model: torch.nn.Module, config: dict | str | os.PathLike | None = None, **kwargs: Any):
    """deepspeed.init_inference with GRACE-MoE. Returns the InferenceEngine; its module's MoE blocks
    hold this rank's expert slots. Each rank serves its own tokens (data-parallel attention)."""
    import deepspeed

    rest, section = split_config(config)
    tp = (rest.get("tensor_parallel") or {}).get("tp_size", 1) if isinstance(rest.get("tensor_parallel"), dict) else 1
    if section is not None and section.enabled and tp != 1:
        raise GraceInputError("grace_moe serves the dense part data-parallel: set tensor_parallel.tp_size to 1")
    # Monitor sections (wandb, ...) belong to training configs; the inference config rejects them.
    rest = {k: v for k, v in rest.items() if k not in MONITOR_SECTIONS}
    engine = deepspeed.init_inference(model, config=rest, **kwargs)
    if section is None or not section.enabled:
        return engine
    _single_process_group()
    group = faults.fault_group(section.fault_timeout_s) if dist.is_available() and dist.is_initialized() else None
    topology = job_topology(LinkModel(inter_node_bandwidth_Gbps=section.inter_node_gbps), group)
    plan = _agreed_plan(section, topology, group)
    device = next(engine.module.parameters()).device
    runtime = GraceRuntime(plan, rank=_rank(), group=group, router=section.router, router_sampling=section.router_sampling,
                           communication=section.communication, device=device)
    convert_model(engine.module, runtime)
    engine.grace_runtime, engine.grace_config, engine.grace_group = runtime, section, group
    if section.profiling:
        engine.grace_recorder = attach_recorder(engine.module, runtime)
    if section.online is not None and section.online.enabled:
        engine.grace_replanner = start_online_replanning(engine.module, runtime, section, group)
    return engine


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
    if dist.is_available() and dist.is_initialized():
        transfer_group = faults.fault_group(section.fault_timeout_s)
        # NCCL wants every rank in a group's first call; later point-to-point batches may involve a few.
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(transfer_group) == "nccl"
                  else torch.device("cpu"))
        faults.all_reduce(torch.zeros(1, device=device), "online re-planning (set-up)", transfer_group)
    return OnlineReplanner(runtime, section.online.settings(), group, transfer_group, _log_replan).attach(model)


def _log_replan(record: dict) -> None:
    if _rank() != 0:
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


def initialize(model: torch.nn.Module, config: dict | str | os.PathLike | None = None, **kwargs: Any):
    """deepspeed.initialize with GRACE-MoE training. Returns DeepSpeed's tuple.

    A transformers model with a `grace_moe` plan (or profile) has its MoE blocks' experts converted to
    GRACE layers that DeepSpeed trains as its own MoE layers (grace_ds.deepspeed_moe.GraceExpertsMoE);
    models written with GraceMoE come as they are. Either way the engine keeps the copies of every
    replicated expert equal after each optimizer step and after load_checkpoint, and clips fp32 without
    ZeRO by the exact global norm (grace_ds.deepspeed_training). The optimizer must be built from the
    converted model: give it in the config, or as a callable (params -> optimizer). With
    `grace_moe.profiling` the engine carries `grace_recorder`."""
    import deepspeed

    from grace_ds.deepspeed_training import attach_training, runtimes_of

    rest, section = split_config(config)
    if section is not None and section.enabled and (section.plan or section.profile) and find_moe_blocks(model):
        _convert_for_training(model, section)
        kwargs = _converted_model_parameters(model, kwargs)
    result = deepspeed.initialize(model=model, config=rest, **kwargs)
    engine = result[0]
    runtimes = runtimes_of(engine.module)
    if runtimes:
        attach_training(engine, runtimes)
    if section is not None and section.enabled and section.profiling:
        engine.grace_recorder = attach_recorder(engine.module)
        engine.grace_config = section
        engine.grace_group = faults.fault_group(section.fault_timeout_s) if dist.is_initialized() else None
    return result


def _convert_for_training(model: torch.nn.Module, section: GraceMoEConfig) -> GraceRuntime:
    """Give the model's transformers MoE blocks GRACE experts that DeepSpeed trains (this rank's slots)."""
    import deepspeed
    from deepspeed.utils import groups

    from grace_ds.deepspeed_moe import GraceExpertsMoE

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
    device = next(model.parameters()).device
    # Training runs eagerly: no CUDA graphs (gather calls under autograd go flat anyway).
    communication = section.communication.model_copy(update={"cuda_graphs": False})
    runtime = GraceRuntime(plan, group=ep_group, router=section.router, router_sampling=section.router_sampling,
                           communication=communication, device=device)
    convert_model(model, runtime, GraceExpertsMoE.convert)
    return runtime


def _agreed_plan(section: GraceMoEConfig, topology: Topology, group) -> PlacementPlan:
    """The plan every rank serves: loaded and checked alike everywhere, or made on the first rank and
    broadcast (threaded BLAS may break the planner's ties apart on other ranks)."""
    if section.plan is None and dist.is_available() and dist.is_initialized():
        plan = load_or_make_plan(section, topology) if _rank() == 0 else None
        return broadcast_plan(plan, f"plan loading (planned at start-up from {section.profile})", group)
    plan = load_or_make_plan(section, topology)
    agree_on_plan(plan, str(section.plan or section.profile), group)
    return plan


def _converted_model_parameters(model: torch.nn.Module, kwargs: dict) -> dict:
    """deepspeed.initialize's keyword arguments for the converted model: its parameters in DeepSpeed's
    MoE parameter groups unless given; an optimizer built before the conversion is refused."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

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
    return {**kwargs, "model_parameters": split_params_into_different_moe_groups_for_optimizer(
        {"params": trainable, "name": "parameters"})}


def save_profile(engine, path: str | os.PathLike | None = None) -> Path:
    """Reduce the engine's recorder over all ranks and write the profile (rank 0 writes)."""
    recorder = getattr(engine, "grace_recorder", None)
    if recorder is None:
        raise GraceInputError("profiling is off: set grace_moe.profiling to true")
    target = path or getattr(getattr(engine, "grace_config", None), "profile_out", None)
    if target is None:
        raise GraceInputError("no path for the profile: pass one or set grace_moe.profile_out")
    profile = recorder.to_profile(getattr(engine, "grace_group", None))
    if _rank() == 0:
        profile.save(target)
    return Path(target)
