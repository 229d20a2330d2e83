"""The `"grace_moe"` section of a DeepSpeed JSON: its schema (pydantic, DeepSpeed's conventions) and
`split_config`, which takes it out of the config DeepSpeed itself reads.

    {"dtype": "fp32", "grace_moe": {"plan": "plan.json", "router": "tar", "communication": "auto"}}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import Field, ValidationError, model_validator

from grace_ds import faults
from grace_ds.errors import GraceInputError
from grace_ds.exchange import CommunicationConfig

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
    monitor_interval_steps: int = Field(10, ge=0)
    """Training with a DeepSpeed monitor on (wandb, tensorboard, csv_monitor, comet): GRACE's cross-node
    bytes and load written there every this many optimizer steps (grace_ds.training_monitor; 0: never)."""
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
